"""One loaded SavedModel version: its signatures and how to run them. The only TensorFlow code.

Import this module only in a worker, after fork: it imports TensorFlow.
"""

from __future__ import annotations

import importlib.abc
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf import json_format, text_format
from google.protobuf.message import DecodeError

from . import codec, dense
from .cudalog import quiet_cuda_probe
from .errors import (
    DEADLINE_MESSAGE,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    TFWSGIError,
    Unimplemented,
)
from .interfaces import DEFAULT_SIGNATURE, signature_by_name


class _KerasOnFirstUse(importlib.abc.MetaPathFinder):
    """Keeps ``import tensorflow`` from importing Keras 3 (and, through it, matplotlib, PIL, rich):
    ~500 modules and ~40 MB of heap that serving a SavedModel never uses. TensorFlow's own
    ``try: import keras.src.optimizers`` then fails as if Keras were absent; ``tf.keras`` and
    the SavedModel loader (for a saved optimizer) still import Keras when they need it."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "keras._tf_keras":  # the first thing keras/__init__.py imports
            raise ImportError("tfwsgi: Keras is imported on first use, not with TensorFlow")
        return None


_deferral = _KerasOnFirstUse()
sys.meta_path.insert(0, _deferral)
try:
    with quiet_cuda_probe():  # the import probes for CUDA: see cudalog
        import tensorflow as tf
        from tensorflow.core.example import example_pb2, feature_pb2
        from tensorflow.core.protobuf import saved_model_pb2
        from tensorflow_serving.apis import get_model_metadata_pb2
finally:
    sys.meta_path.remove(_deferral)

from tensorflow.core.protobuf import config_pb2  # noqa: E402
from tensorflow.python.saved_model.loader_impl import SavedModelLoader  # noqa: E402

log = logging.getLogger("tfwsgi")


SERVE_TAGS = ("serve",)  # TF Serving's default --saved_model_tags (tag_constants.h kSavedModelTagServe)
WARMUP_FILE = "tf_serving_warmup_requests"
INIT_OP_SIGNATURE = "__saved_model_init_op"  # TF2's init op, a SignatureDef of no inputs: not served
MAX_WARMUP_RECORDS = 1000
CLASSIFY_INPUTS = "inputs"
CLASSIFY_CLASSES = "classes"
CLASSIFY_SCORES = "scores"
REGRESS_OUTPUTS = "outputs"

_threads_configured = threading.Lock()
_configured: tuple[int, int] | None = None
# With one inter-op thread, a signature's graph runs in the thread that calls it (session_config),
# and this lock lets one run at a time into each worker, as TF Serving's one inter-op thread does.
_one_run: threading.Lock | None = None


def runtime_initialized() -> bool:
    """Whether TensorFlow's runtime has started in this process (it must not in gunicorn's master)."""
    from tensorflow.python.eager import context

    return bool(context.context()._initialized)


def initialize_runtime() -> None:
    """Start TensorFlow's runtime now (device discovery probes for CUDA: see cudalog); in a
    worker only, after configure_threads."""
    from tensorflow.python.eager import context

    with quiet_cuda_probe():
        context.ensure_initialized()


def session_config() -> Any:
    """The ConfigProto of a servable's Session: the worker's thread settings. One inter-op
    thread (the default) runs the graph in the calling thread (``inter_op_parallelism_threads
    = -1``, DirectSession's ``run_in_caller_thread``): the same one op at a time, without
    handing each run to a pool thread and back (~200 µs of CPU a run of the bench MLP).

    The calling threads then take turns (``_one_run``), as runs take turns on TF Serving's one
    inter-op thread: otherwise every request thread of a worker (batching off) computes at
    once on the worker's core, and the scheduler slices them, holder of the GIL included. At
    32 connections, batching off, that doubled the p99 (48–50 ms against 25–31 ms taking turns,
    at the same throughput)."""
    intra, inter = _configured or (0, 0)
    return config_pb2.ConfigProto(intra_op_parallelism_threads=intra,
                                  inter_op_parallelism_threads=-1 if inter == 1 else inter,
                                  allow_soft_placement=True)


def configure_threads(intra_op: int, inter_op: int) -> None:
    """Set TF's thread pools; must run before TensorFlow executes anything in this process."""
    global _configured, _one_run
    with _threads_configured:
        if _configured == (intra_op, inter_op):
            return
        tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        tf.config.threading.set_inter_op_parallelism_threads(inter_op)
        _configured = (intra_op, inter_op)
        _one_run = threading.Lock() if inter_op == 1 else None


def _numpy_dtype(tf_dtype: Any) -> np.dtype:
    dt = tf.dtypes.as_dtype(tf_dtype)
    if dt == tf.string:
        return np.dtype(object)
    return np.dtype(dt.as_numpy_dtype)


@dataclass
class Signature:
    """A signature's name, method, typed inputs and outputs, and the Session callable that runs
    it: its inputs fed, its outputs fetched, by their tensor names (as TF Serving runs it)."""

    name: str
    method_name: str
    inputs: dict[str, np.dtype]
    input_shapes: dict[str, Any]  # tf.TensorShape
    outputs: dict[str, np.dtype]
    call: Any  # Session callable: the inputs' arrays in ``feeds`` order -> outputs in ``fetches`` order
    feeds: tuple[str, ...]
    fetches: tuple[str, ...]

    def run(self, inputs: Mapping[str, np.ndarray], deadline: float | None = None) -> dict[str, np.ndarray]:
        """Run on decoded inputs (already of the signature's dtypes); TF errors keep their code.

        As TF Serving runs a signature: tensorflow_serving/servables/tensorflow/predict_util.cc
        (``PreProcessPrediction``) checks the input names and turns the request's tensors into
        Tensors (``saved_model::GetInputValues``), and ``session->Run`` feeds them into the graph
        by the signature's tensor names and fetches its outputs. The shapes a signature declares
        are not checked: a shape the graph cannot take fails in the op that cannot take it, with
        that op's status (INVALID_ARGUMENT, "Matrix size-incompatible: In[0]: [1,3], In[1]:
        [4,3]" …). The callable (``Session._make_callable_from_options``, TensorFlow 2.16 to
        2.21) feeds the arrays as they are, with no Python-side check of the placeholders'
        shapes, which ``Session.run`` would make.

        With one inter-op thread, a call waits for its turn (``_one_run``); one whose
        ``deadline`` (``time.monotonic()``) passes meanwhile is not run (DEADLINE_EXCEEDED), as
        the batcher drops a task whose deadline passed while it waited."""
        codec.check_input_names(inputs, self.inputs)
        gate = _one_run
        if gate is not None and not _take_turn(gate, deadline):
            raise DeadlineExceeded(DEADLINE_MESSAGE)
        try:
            outputs = self.call(*[inputs[key] for key in self.feeds])
        except tf.errors.OpError as exc:
            raise TFWSGIError(op_message(exc.message), exc.error_code) from None
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(str(exc)) from None
        finally:
            if gate is not None:
                gate.release()
        return {key: _array(value) for key, value in zip(self.fetches, outputs, strict=True)}


def _take_turn(gate: threading.Lock, deadline: float | None) -> bool:
    """Wait for the turn to run a graph: True once it is this caller's, False if ``deadline``
    passed first."""
    if deadline is None:
        return gate.acquire()
    left = deadline - time.monotonic()
    return left > 0 and gate.acquire(timeout=left)


# What Python's runtime adds around an op's status message (tensorflow/python/eager/execute.py:
# "Graph execution error:", the "Detected at node … defined at" trace, " [Op:…]"); TF Serving
# answers with the status message alone: "<the op's message>\n\t [[{{node <name>}}]]".
_NO_TRACES = "<stack traces unavailable>"
_EAGER_TAIL = re.compile(r" \[Op:[^\]]*\](?: name: [^\n]*)?\Z")


def op_message(message: str) -> str:
    """A TF error message as the op's status gives it (and TF Serving answers it)."""
    lines = message.split("\n")
    if lines[0] == "Graph execution error:":
        lines = lines[1:]
        while lines and not lines[0]:
            lines = lines[1:]
    if lines and lines[0].startswith("Detected at node ") and len(lines) > 1:
        lines = lines[1:]
        while lines and (not lines[0] or lines[0].startswith("  ") or lines[0] == _NO_TRACES):
            lines = lines[1:]
    return _EAGER_TAIL.sub("", "\n".join(lines)) if lines else message


def _array(value: Any) -> np.ndarray:
    """A tensor's value as an array: a scalar string's ``numpy()`` is bare ``bytes``."""
    if isinstance(value, bytes):
        out = np.empty((), dtype=object)
        out[()] = value
        return out
    return value


def _shape(shape: Any) -> str:
    dims = tf.TensorShape(shape).as_list() if shape is not None else None
    if dims is None:
        return "[?]"
    return "[" + ",".join("-1" if d is None else str(d) for d in dims) + "]"


def _read_meta_graph(path: str, tags: Collection[str] = SERVE_TAGS) -> Any:
    """The SavedModel's MetaGraphDef whose tags are exactly ``tags`` (TF Serving's
    ``--saved_model_tags``), found as TensorFlow's loader finds it."""
    sm = saved_model_pb2.SavedModel()
    pb = os.path.join(path, "saved_model.pb")
    pbtxt = os.path.join(path, "saved_model.pbtxt")
    if os.path.exists(pb):
        with open(pb, "rb") as f:
            data = f.read()
        try:
            sm.ParseFromString(data)
        except DecodeError:
            raise DataLoss(f"Can't parse {pb} as binary proto") from None
    elif os.path.exists(pbtxt):
        with open(pbtxt, encoding="utf-8") as f:
            text_format.Parse(f.read(), sm)
    else:
        raise NotFound(f"SavedModel file does not exist at: {path}")
    # tensorflow/cc/saved_model/reader.cc, FindMetaGraphDef: the first meta graph whose tag set
    # equals the supplied one; otherwise NOT_FOUND, worded as below.
    wanted = set(tags)
    for mg in sm.meta_graphs:
        if set(mg.meta_info_def.tags) == wanted:
            return mg
    raise NotFound(f"Could not find meta graph def matching supplied tags: {{ {' '.join(sorted(wanted))} }}. "
                   "To inspect available tag-sets in the SavedModel, please use the SavedModel CLI: "
                   "`saved_model_cli`")


def _callable(session: Any, sig_def: Any) -> tuple[Any, tuple[str, ...], tuple[str, ...]]:
    """A Session callable for one SignatureDef, its feeds and fetches by tensor name; for a
    signature with a sparse or composite tensor, which has no one name to feed or fetch, a
    function that refuses every call (the model still loads, its other signatures serve)."""
    feeds, fetches = tuple(sig_def.inputs), tuple(sig_def.outputs)
    for key, info in (*sig_def.inputs.items(), *sig_def.outputs.items()):
        encoding = info.WhichOneof("encoding")
        if encoding != "name":
            message = f"Signature tensor {key} is a {encoding} tensor: only dense tensors are served"

            def refuse(*_: Any, message: str = message) -> Any:
                raise Unimplemented(message)

            return refuse, feeds, fetches
    options = config_pb2.CallableOptions()
    options.feed.extend(sig_def.inputs[key].name for key in feeds)
    options.fetch.extend(sig_def.outputs[key].name for key in fetches)
    return session._make_callable_from_options(options), feeds, fetches


class Servable:
    """A loaded SavedModel version."""

    def __init__(self, name: str, version: int, path: str, tags: Collection[str] = SERVE_TAGS) -> None:
        self.name = name
        self.version = version
        self.path = path
        meta_graph = _read_meta_graph(path, tags)
        sig_map = get_model_metadata_pb2.SignatureDefMap()
        for key, sig in meta_graph.signature_def.items():
            sig_map.signature_def[key].CopyFrom(sig)
        self.signature_def_map: dict[str, Any] = json_format.MessageToDict(
            sig_map, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        # Loaded into a Session, as TF Serving loads it (tensorflow/cc/saved_model/loader.cc
        # LoadSavedModel: the meta graph, its variables restored, its init op run with the
        # assets fed), so that TF1 graphs, estimators and TF2/Keras exports all run as their
        # SignatureDefs say.
        # (SavedModelLoader's own steps: its load() would parse saved_model.pb once more.)
        self._session = tf.compat.v1.Session(graph=tf.Graph(), config=session_config())
        try:
            loader, tag_set = SavedModelLoader(path), list(meta_graph.meta_info_def.tags)
            saver, _ = loader.load_graph(self._session.graph, tag_set)
            loader.restore_variables(self._session, saver)
            loader.run_init_ops(self._session, tag_set)
            self.signatures: dict[str, Signature] = {}
            for key, sig_def in meta_graph.signature_def.items():
                if key == INIT_OP_SIGNATURE:
                    continue
                call, feeds, fetches = _callable(self._session, sig_def)
                self.signatures[key] = Signature(
                    name=key,
                    method_name=sig_def.method_name,
                    inputs={k: _numpy_dtype(info.dtype) for k, info in sig_def.inputs.items()},
                    input_shapes={k: tf.TensorShape(info.tensor_shape) for k, info in sig_def.inputs.items()},
                    outputs={k: _numpy_dtype(info.dtype) for k, info in sig_def.outputs.items()},
                    call=call, feeds=feeds, fetches=fetches)
        except BaseException as exc:
            self._session.close()
            if isinstance(exc, tf.errors.OpError):
                raise TFWSGIError(exc.message, exc.error_code) from None
            raise
        # Whether a predict body is worth trying on the dense path (tfwsgi/dense.py) at all.
        self.takes_dense = any(dense.decodes(s.inputs) for s in self.signatures.values())

    def warmup(self, iterations: int = 1) -> int:
        """Replay ``assets.extra/tf_serving_warmup_requests`` (TFRecord of PredictionLog, at most
        1000 records) as TF Serving does before a version is available; a failure fails the load."""
        path = os.path.join(self.path, "assets.extra", WARMUP_FILE)
        if not os.path.exists(path):
            return 0
        from tensorflow_serving.apis import prediction_log_pb2

        started = time.monotonic()
        records = 0
        try:
            for raw in tf.data.TFRecordDataset(path).take(MAX_WARMUP_RECORDS):
                entry = prediction_log_pb2.PredictionLog.FromString(raw.numpy())
                for _ in range(iterations):
                    self._replay(entry)
                records += 1
        except TFWSGIError as exc:
            raise TFWSGIError(f"Warmup of {path} failed: {exc.message}", exc.code) from None
        except (tf.errors.OpError, ValueError, DecodeError) as exc:
            raise InvalidArgument(f"Warmup of {path} failed: {exc}") from None
        log.info("tfwsgi: pid %d warmed up model %s version %d with %d records in %.2fs",
                 os.getpid(), self.name, self.version, records, time.monotonic() - started)
        return records

    def _replay(self, entry: Any) -> None:
        kind = entry.WhichOneof("log_type")
        if kind == "predict_log":
            req = entry.predict_log.request
            sig = self.signature(req.model_spec.signature_name)
            sig.run({k: tf.make_ndarray(v) for k, v in req.inputs.items()})
        elif kind in ("classify_log", "regress_log"):
            req = getattr(entry, kind).request
            examples = _serialized_input(req.input)
            if kind == "classify_log":
                self.classify(req.model_spec.signature_name, examples)
            else:
                self.regress(req.model_spec.signature_name, examples)
        else:
            raise Unimplemented(f"Unsupported log_type for warmup: {kind}")

    def signature(self, name: str) -> Signature:
        """A signature by name ("" is ``serving_default``)."""
        return signature_by_name(self.signatures, name)

    def classify(self, name: str, examples: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Run a classification signature on serialized tf.Examples: (classes, scores)."""
        sig = self._example_signature(name)
        if len(sig.outputs) not in (1, 2):
            raise InvalidArgument(f"Expected one or two output Tensors, found {len(sig.outputs)}")
        if CLASSIFY_CLASSES not in sig.outputs and CLASSIFY_SCORES not in sig.outputs:
            raise InvalidArgument(
                'Expected classification signature outputs to contain at least one of "classes" '
                f'or "scores". Signature was: {sig.name}')
        out = sig.run({CLASSIFY_INPUTS: examples})
        n = len(examples)
        classes, scores = out.get(CLASSIFY_CLASSES), out.get(CLASSIFY_SCORES)
        for label, t, kind in (("classes", classes, "O"), ("scores", scores, "f")):
            if t is None:
                continue
            if t.ndim != 2:
                raise InvalidArgument(
                    f"Expected Tensor shape: [batch_size num_classes] but got {_shape(t.shape)}")
            if t.dtype.kind != kind:
                want = "DT_STRING" if kind == "O" else "DT_FLOAT"
                raise InvalidArgument(f"Expected {label} Tensor of {want}. Got: {t.dtype}")
            if t.shape[0] != n:
                raise InvalidArgument(
                    f"Expected {label} output batch size of {n}. Got: {t.shape[0]}")
        if classes is not None and scores is not None and classes.shape[1] != scores.shape[1]:
            raise InvalidArgument(
                "Tensors class and score should match in dim_size(1). "
                f"Got {classes.shape[1]} vs. {scores.shape[1]}")
        return classes, scores

    def regress(self, name: str, examples: np.ndarray) -> np.ndarray:
        """Run a regression signature on serialized tf.Examples: one float per example."""
        sig = self._example_signature(name)
        if len(sig.outputs) != 1:
            raise InvalidArgument("Expected one output Tensor.")
        if REGRESS_OUTPUTS not in sig.outputs:
            raise FailedPrecondition(f"No regression outputs found in SignatureDef: {sig.name}")
        t = sig.run({CLASSIFY_INPUTS: examples})[REGRESS_OUTPUTS]
        n = len(examples)
        if not (t.ndim == 1 or (t.ndim == 2 and t.shape[1] == 1)):
            raise InvalidArgument(
                "Expected output Tensor shape to be either [batch_size] or [batch_size, 1] "
                f"but got {_shape(t.shape)}")
        if t.shape[0] != n:
            raise InvalidArgument(
                f"Input batch size did not match output batch size: {n} vs. {t.shape[0]}")
        if t.dtype != np.float32:
            raise InvalidArgument(f"Expected output Tensor of DT_FLOAT.  Got: {t.dtype}")
        return t.reshape(n)

    def _example_signature(self, name: str) -> Signature:
        key = name or DEFAULT_SIGNATURE
        sig = self.signatures.get(key)
        if sig is None:
            raise InvalidArgument(f"No signature was found with the name: {key}")
        if len(sig.inputs) != 1:
            raise InvalidArgument("Expected one input Tensor.")
        if CLASSIFY_INPUTS not in sig.inputs or sig.inputs[CLASSIFY_INPUTS].kind != "O":
            raise InvalidArgument(
                f"No classification inputs found in SignatureDef: {key} "
                "(expected one DT_STRING input named 'inputs')")
        return sig


def _serialized_input(inp: Any) -> np.ndarray:
    """The serialized examples of a tensorflow.serving.Input (with its context, if any)."""
    if inp.WhichOneof("kind") == "example_list_with_context":
        ctx = inp.example_list_with_context.context.SerializeToString()
        items = [ctx + e.SerializeToString() for e in inp.example_list_with_context.examples]
    else:
        items = [e.SerializeToString() for e in inp.example_list.examples]
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def _feature(kind: str, values: list[Any]) -> Any:
    f = feature_pb2.Feature()
    if kind == "bytes":
        f.bytes_list.value.extend(values)
    elif kind == "float":
        f.float_list.value.extend(values)
    elif kind == "int64":
        f.int64_list.value.extend(values)
    return f


def _example(features: Mapping[str, tuple[str, list[Any]]]) -> bytes:
    ex = example_pb2.Example()
    for name, (kind, values) in features.items():
        ex.features.feature[name].CopyFrom(_feature(kind, values))
    return ex.SerializeToString()


def serialize_examples(context: Mapping[str, tuple[str, list[Any]]] | None,
                       examples: Sequence[Mapping[str, tuple[str, list[Any]]]]) -> np.ndarray:
    """Serialized tf.Examples; with a context, context bytes + example bytes as TF Serving does
    (protobuf merges the two, so an example's feature overrides the context's)."""
    prefix = _example(context) if context is not None else b""
    out = np.empty(len(examples), dtype=object)
    out[:] = [prefix + _example(e) for e in examples]
    return out
