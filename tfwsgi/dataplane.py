"""The core every transport calls once per request: resolve the servable once, decode the body
for its signature (dense or general JSON), then cache → batcher → signature.

A transport parses its protocol (paths, body limits, Cache-Control → policy, deadline) and
renders what comes back; it never reaches into the manager, the batcher or TensorFlow.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from . import codec, dense, metrics, protocodec, v2codec
from .batching import Batcher
from .cache import Outcome, Policy, PredictionCache
from .errors import DEADLINE_MESSAGE, DeadlineExceeded, Internal, TFWSGIError
from .interfaces import DEFAULT_SIGNATURE, Servable, Signature, Tensors
from .manager import ModelManager, VersionState

SIGNATURE_METHODS = ("tensorflow/serving/predict", "tensorflow/serving/classify",
                     "tensorflow/serving/regress")


@dataclass(frozen=True)
class ModelSpec:
    """Which servable a request names: the latest version, a specific one, or a label's."""

    name: str
    version: int | None = None
    label: str | None = None


@dataclass(frozen=True)
class Options:
    """How to answer: the cache policy and the deadline (``time.monotonic()``; None: none)."""

    policy: Policy = Policy.NORMAL
    deadline: float | None = None


@dataclass
class Prediction:
    outputs: Tensors
    fmt: str  # codec.ROW or codec.COLUMNAR: how the request was written, so the answer matches
    outcome: Outcome
    version: int = 0  # of the servable that answered, and the signature it ran (gRPC's model_spec)
    signature_name: str = ""


@dataclass
class Inference:
    """A classify or regress answer: its tensors and what the cache did."""

    outputs: Tensors
    outcome: Outcome
    version: int = 0  # of the servable that answered, and the signature it ran (gRPC's model_spec)
    signature_name: str = ""


class JsonPredict:
    """A TF Serving JSON predict body, decoded for the servable the core resolved: one dense
    array of numbers without a Python float each when the signature takes it, else the
    general decoder (TF Serving's order of errors: the body's own, then the model's)."""

    __slots__ = ("_doc", "raw")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._doc: dict[str, Any] | None = None

    def doc(self) -> dict[str, Any]:
        if self._doc is None:
            self._doc = codec.parse_json(self.raw)
        return self._doc

    def check(self) -> None:
        """Raise the body's own error, if any (asked when the model is not found)."""
        codec.signature_name(self.doc())

    def decode(self, servable: Servable) -> tuple[Signature, dict[str, np.ndarray], str]:
        if servable.takes_dense:
            found = dense.parse(self.raw)
            if found is not None:
                sig = servable.signature(found.signature_name)
                inputs = found.inputs(sig.inputs)
                if inputs is not None:
                    return sig, inputs, found.fmt
        doc = self.doc()
        sig = servable.signature(codec.signature_name(doc))
        inputs, fmt = codec.decode_predict(doc, sig.inputs)
        return sig, inputs, fmt


class ProtoPredict:
    """A gRPC PredictRequest's inputs (``TensorProto``s) and ``output_filter``, decoded for the
    servable the core resolved (tfwsgi/protocodec.py); the answer keeps the filter's outputs."""

    __slots__ = ("inputs", "output_filter", "signature_name")

    def __init__(self, inputs: Mapping[str, Any], output_filter: Sequence[str] = (),
                 signature_name: str = "") -> None:
        self.inputs = inputs
        self.output_filter = output_filter
        self.signature_name = signature_name

    def check(self) -> None:
        """A proto body has no error of its own before the model is found."""

    def decode(self, servable: Servable) -> tuple[Signature, dict[str, np.ndarray], str]:
        sig = servable.signature(self.signature_name)
        inputs = protocodec.decode_inputs(self.inputs, sig.inputs)
        if self.output_filter:
            outputs = servable.signature_def_map["signature_def"][sig.name]["outputs"]
            protocodec.check_output_filter(self.output_filter, outputs)
        return sig, inputs, codec.COLUMNAR

    def select(self, outputs: Tensors) -> Tensors:
        """The outputs ``output_filter`` names (all when it is empty)."""
        if not self.output_filter:
            return outputs
        return {alias: outputs[alias] for alias in self.output_filter}


class V2Predict:
    """A KServe v2 infer request (parsed by ``v2codec``), decoded for the servable the core
    resolved: the signature its ``signature_name`` parameter names (default ``serving_default``),
    each tensor of the datatype that signature takes, the requested outputs among its outputs."""

    __slots__ = ("request",)

    def __init__(self, request: v2codec.InferRequest) -> None:
        self.request = request

    def check(self) -> None:
        """Nothing: the body was parsed, and its own errors raised, before the core was called."""

    def decode(self, servable: Servable) -> tuple[Signature, dict[str, np.ndarray], str]:
        sig = servable.signature(self.request.signature_name)
        v2codec.check_inputs(self.request, sig.inputs, servable.name)
        v2codec.check_outputs(self.request, sig.outputs, servable.name)
        return sig, self.request.inputs, codec.COLUMNAR


class PredictBody(Protocol):
    """A predict request's body as the core takes it: JsonPredict, ProtoPredict, V2Predict."""

    def check(self) -> None: ...

    def decode(self, servable: Servable) -> tuple[Signature, dict[str, np.ndarray], str]: ...


class DataPlane:
    """predict, classify, regress, metadata and status on a model spec."""

    def __init__(self, manager: ModelManager, cache: PredictionCache,
                 batcher: Batcher | None = None, check_method_names: bool = False) -> None:
        self.manager = manager
        self.cache = cache
        self.batcher = batcher
        self.check_method_names = check_method_names  # --enable_signature_method_name_check

    def servable(self, spec: ModelSpec) -> Servable:
        servable: Servable = self.manager.servable(spec.name, spec.version, spec.label)
        return servable

    def predict(self, spec: ModelSpec, body: PredictBody, options: Options = Options()) -> Prediction:
        try:
            servable = self.servable(spec)
        except TFWSGIError:
            body.check()  # a malformed body is answered as such before a missing model
            raise
        sig, inputs, fmt = body.decode(servable)
        if self.check_method_names and sig.method_name not in SIGNATURE_METHODS:
            # tensorflow_serving/servables/tensorflow/predict_util.cc, VerifySignature
            raise Internal(f"Expected prediction signature method_name to be one of "
                           f"{{{', '.join(SIGNATURE_METHODS)}}}. Was: {sig.method_name}")
        batcher = self.batcher
        if batcher is None:
            run: Callable[[], Tensors] = lambda: sig.run(inputs, options.deadline)  # noqa: E731
        else:
            key = (servable.name, servable.version, sig.name)
            run = lambda: batcher.run(key, inputs, sig.run, options.deadline)  # noqa: E731
        outputs, outcome = self._answer(servable, sig.name, "predict", inputs, run, options)
        return Prediction(outputs, fmt, outcome, servable.version, sig.name)

    def classify(self, spec: ModelSpec, signature_name: str, examples: np.ndarray,
                 options: Options = Options()) -> Inference:
        servable = self.servable(spec)
        name = signature_name or DEFAULT_SIGNATURE

        def run() -> Tensors:
            classes, scores = servable.classify(name, examples)
            out = {}
            if classes is not None:
                out["classes"] = classes
            if scores is not None:
                out["scores"] = scores
            return out

        return Inference(*self._answer(servable, name, "classify", {"inputs": examples}, run, options),
                         servable.version, name)

    def regress(self, spec: ModelSpec, signature_name: str, examples: np.ndarray,
                options: Options = Options()) -> Inference:
        servable = self.servable(spec)
        name = signature_name or DEFAULT_SIGNATURE
        return Inference(*self._answer(servable, name, "regress", {"inputs": examples},
                                       lambda: {"outputs": servable.regress(name, examples)}, options),
                         servable.version, name)

    def metadata(self, spec: ModelSpec) -> tuple[Servable, dict[str, Any]]:
        """The servable answering and its signature_def map (TF Serving's GetModelMetadata)."""
        servable = self.servable(spec)
        return servable, servable.signature_def_map

    def status(self, spec: ModelSpec) -> list[VersionState]:
        """TF Serving's GetModelStatus: it looks only at the version (with a label, every version)."""
        return self.manager.status(spec.name, spec.version)

    def _answer(self, servable: Servable, signature: str, method: str, inputs: Mapping[str, np.ndarray],
                run: Callable[[], Tensors], options: Options) -> tuple[Tensors, Outcome]:
        def counted() -> Tensors:
            out = run()
            metrics.MODEL_RUNS.labels(servable.name, str(servable.version), signature, method).inc()
            return out

        answer = self.cache.get_or_compute(servable.name, servable.version, signature, method,
                                           inputs, counted, options.policy)
        if options.deadline is not None and time.monotonic() > options.deadline:
            raise DeadlineExceeded(DEADLINE_MESSAGE)  # too late: the connection layer answered
        return answer
