"""A TensorFlow-free servable and the one factory that builds the real app around it.

The REST tests (``test_rest*.py``) drive the real WSGI app through Flask's test client, in process.
What is fake is only the model: ``FakeServable`` and ``FakeSignature`` do what a loaded SavedModel
version does for the app (signatures by name, typed inputs, ``run``, classify/regress, the
signature_def map for metadata), with numpy functions instead of graphs. The models mirror the
SavedModels of ``tests/models.py`` (same names, versions, signatures and answers), so the unit
and e2e tiers assert the same numbers and TF Serving's texts.

Versions are real directories under ``tmp_path`` found by the real source, loaded by the real
``ModelManager`` through a fake loader. When the app factory changes, ``make_app`` is the only
thing here that should have to change.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flask import Flask

from tfwsgi import codec, dense
from tfwsgi.application import create_app
from tfwsgi.errors import FailedPrecondition, InvalidArgument, TFWSGIError
from tfwsgi.interfaces import DEFAULT_SIGNATURE, signature_by_name
from tfwsgi.manager import ModelManager
from tfwsgi.settings import Settings, from_env
from tfwsgi.source import ALL, SPECIFIC, ModelConfig, VersionPolicy

F32, F64, I32, BOOL, STR = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.int32),
                            np.dtype(bool), np.dtype(object))

PREDICT_METHOD = "tensorflow/serving/predict"
CLASSIFY_METHOD = "tensorflow/serving/classify"
REGRESS_METHOD = "tensorflow/serving/regress"

_TF_NAMES = {"float16": "DT_HALF", "float32": "DT_FLOAT", "float64": "DT_DOUBLE", "bool": "DT_BOOL",
             "object": "DT_STRING",
             **{f"{t}{n}": f"DT_{t.upper()}{n}" for t in ("int", "uint") for n in (8, 16, 32, 64)}}

Shape = tuple[int | None, ...] | None  # None: unknown rank; None in a dimension: any size
Fn = Callable[..., Mapping[str, np.ndarray]]


def _shape_text(shape: Shape) -> str:
    if shape is None:
        return "[?]"
    return "[" + ",".join("-1" if d is None else str(d) for d in shape) + "]"


def op_error(message: str, node: str) -> TFWSGIError:
    """An op's INVALID_ARGUMENT as ``servable.Signature.run`` answers it (TF's status message)."""
    return TFWSGIError(f"{message}\n\t [[{{{{node {node}}}}}]]", 3)


def _tensor_info(name: str, dtype: np.dtype, shape: Shape) -> dict[str, Any]:
    """One input/output of a signature, as TF's json_format renders a TensorInfo."""
    tensor_shape: dict[str, Any] = (
        {"dim": [], "unknown_rank": True} if shape is None else
        {"dim": [{"size": str(-1 if d is None else d), "name": ""} for d in shape], "unknown_rank": False})
    return {"dtype": _TF_NAMES[dtype.name], "tensor_shape": tensor_shape, "name": f"{name}:0"}


@dataclass
class FakeSignature:
    """One signature: typed, shaped inputs and a numpy function, run as ``servable.Signature.run``
    runs a SavedModel function: the input names are checked, the declared shapes are not (as in
    TF Serving); a shape the function cannot take fails in it, with the op's message."""

    name: str
    inputs: dict[str, np.dtype]
    outputs: dict[str, np.dtype]
    fn: Fn
    input_shapes: dict[str, Shape] = field(default_factory=dict)
    method_name: str = PREDICT_METHOD
    runs: int = 0  # how often the model ran: a cache hit must not run it

    def run(self, inputs: Mapping[str, np.ndarray], deadline: float | None = None) -> dict[str, np.ndarray]:
        codec.check_input_names(inputs, self.inputs)
        self.runs += 1
        return {k: np.asarray(v) for k, v in self.fn(**inputs).items()}

    def signature_def(self) -> dict[str, Any]:
        return {
            "inputs": {k: _tensor_info(k, d, self.input_shapes.get(k)) for k, d in self.inputs.items()},
            "outputs": {k: _tensor_info(k, d, None) for k, d in self.outputs.items()},
            "method_name": self.method_name,
            "defaults": {},
        }


class FakeServable:
    """One loaded version of a model, as ``servable.Servable`` looks to the app."""

    def __init__(self, name: str, version: int, path: str, signatures: Sequence[FakeSignature]) -> None:
        self.name = name
        self.version = version
        self.path = path
        self.signatures = {s.name: s for s in signatures}
        self.signature_def_map = {"signature_def": {k: s.signature_def() for k, s in self.signatures.items()}}
        self.takes_dense = any(dense.decodes(s.inputs) for s in self.signatures.values())

    def signature(self, name: str) -> FakeSignature:
        return signature_by_name(self.signatures, name)

    def classify(self, name: str, examples: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        out = self._example_signature(name).run({"inputs": examples})
        return out.get("classes"), out.get("scores")

    def regress(self, name: str, examples: np.ndarray) -> np.ndarray:
        sig = self._example_signature(name)
        if "outputs" not in sig.outputs:
            raise FailedPrecondition(f"No regression outputs found in SignatureDef: {sig.name}")
        return sig.run({"inputs": examples})["outputs"].reshape(len(examples))

    def _example_signature(self, name: str) -> FakeSignature:
        key = name or DEFAULT_SIGNATURE
        sig = self.signatures.get(key)
        if sig is None:
            raise InvalidArgument(f"No signature was found with the name: {key}")
        if set(sig.inputs) != {"inputs"} or sig.inputs["inputs"].kind != "O":
            raise InvalidArgument(
                f"No classification inputs found in SignatureDef: {key} "
                "(expected one DT_STRING input named 'inputs')")
        return sig


# ------------------------------------------------------------------ serialized tf.Examples

def features(serialized: np.ndarray, name: str, default: float | None = None) -> np.ndarray:
    """One float feature of serialized tf.Examples (as ``tf.io.parse_example`` with a
    FixedLenFeature([1]) reads it), as a float32 column."""
    # The REST layer serializes classify/regress examples with TensorFlow's protos today, so
    # TensorFlow is already imported when a fake signature gets examples.
    from tensorflow.core.example import example_pb2

    if serialized.ndim > 1:
        shape = _shape_text(serialized.shape)
        raise op_error(f"Expected serialized to be a scalar or vector, got shape: {shape}",
                       "ParseExample/ParseExampleV2")
    values = []
    for data in serialized:
        feature = example_pb2.Example.FromString(data).features.feature
        if name in feature:
            values.append(feature[name].float_list.value[0])
        elif default is not None:
            values.append(default)
        else:
            raise InvalidArgument(f"Feature: {name} (data type: float) is required but could not be found.")
    return np.array(values, dtype=np.float32).reshape(-1, 1)


# ------------------------------------------------------------------ the models of tests/models.py

def half_plus_two(name: str, version: int, path: str, b: float) -> FakeServable:
    """tfwsgi.demo's half_plus_two: y = 0.5·x + b, y3 = 0.5·x2 + 3, and its example signatures."""
    def predict(x: np.ndarray) -> dict[str, np.ndarray]:
        return {"y": np.float32(0.5) * x + np.float32(b)}

    def regress_y(inputs: np.ndarray) -> dict[str, np.ndarray]:
        return {"outputs": np.float32(0.5) * features(inputs, "x") + np.float32(b)}

    def regress_y3(inputs: np.ndarray) -> dict[str, np.ndarray]:
        return {"outputs": np.float32(0.5) * features(inputs, "x2", 0.0) + np.float32(3.0)}

    def classify(inputs: np.ndarray) -> dict[str, np.ndarray]:
        return {"scores": np.float32(0.5) * features(inputs, "x") + np.float32(b)}

    x = {"x": F32}
    examples = {"inputs": STR}
    return FakeServable(name, version, path, [
        FakeSignature(DEFAULT_SIGNATURE, x, {"y": F32}, predict, {"x": (None,)}),
        FakeSignature(PREDICT_METHOD, x, {"y": F32}, predict, {"x": (None,)}),
        FakeSignature(REGRESS_METHOD, examples, {"outputs": F32}, regress_y, {"inputs": (None,)},
                      REGRESS_METHOD),
        FakeSignature("regress_x_to_y", examples, {"outputs": F32}, regress_y, {"inputs": (None,)},
                      REGRESS_METHOD),
        FakeSignature("regress_x2_to_y3", examples, {"outputs": F32}, regress_y3, {"inputs": (None,)},
                      REGRESS_METHOD),
        FakeSignature(CLASSIFY_METHOD, examples, {"scores": F32}, classify, {"inputs": (None,)},
                      CLASSIFY_METHOD),
        FakeSignature("classify_x_to_y", examples, {"scores": F32}, classify, {"inputs": (None,)},
                      CLASSIFY_METHOD),
    ])


def multi(name: str, version: int, path: str) -> FakeServable:
    """tests/models.py's ``multi``: several signatures, dtypes, shapes and outputs."""
    def two_in_two_out(a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
        if a.ndim < 2:  # tf.reduce_sum(a, axis=1)
            raise op_error(f"Invalid reduction dimension (1 for input with {a.ndim} dimension(s)", "Sum")
        total = a.sum(axis=1)
        if total.shape != b.shape:  # + tf.cast(b, tf.float32), where neither broadcasts
            raise op_error(f"Incompatible shapes: {_shape_text(b.shape)} vs. {_shape_text(total.shape)}",
                           "add")
        return {"sum": total + b.astype(np.float32), "b_twice": b * 2}

    def strings(s: np.ndarray) -> dict[str, np.ndarray]:
        return {"upper": np.array([v.upper() for v in s.reshape(-1)], dtype=object).reshape(s.shape),
                "echo_bytes": s,
                "length": np.array([len(v) for v in s.reshape(-1)], dtype=np.int32).reshape(s.shape)}

    def positive_only(x: np.ndarray) -> dict[str, np.ndarray]:
        if not (x > 0).all():
            raise TFWSGIError("assertion failed: [x must be > 0]", 3)  # TF's InvalidArgumentError
        return {"y": np.log(x)}

    def unavailable(x: np.ndarray) -> dict[str, np.ndarray]:
        raise TFWSGIError("the device went away", 14)

    def crash(x: np.ndarray) -> dict[str, np.ndarray]:
        raise RuntimeError("boom")

    def classify_with_classes(inputs: np.ndarray) -> dict[str, np.ndarray]:
        p = 1.0 / (1.0 + np.exp(-features(inputs, "x")))
        classes = np.empty((len(inputs), 2), dtype=object)
        classes[:] = [b"neg", b"pos"]
        return {"classes": classes, "scores": np.concatenate([1.0 - p, p], axis=1).astype(np.float32)}

    x = {"x": F32}
    return FakeServable(name, version, path, [
        FakeSignature(DEFAULT_SIGNATURE, {"a": F32, "b": I32}, {"sum": F32, "b_twice": I32},
                      two_in_two_out, {"a": (None, 2), "b": (None,)}),
        FakeSignature("strings", {"s": STR}, {"upper": STR, "echo_bytes": STR, "length": I32}, strings,
                      {"s": (None,)}),
        FakeSignature("scalar", x, {"y": F32}, lambda x: {"y": x * np.float32(2.0)}, {"x": ()}),
        FakeSignature("boolean", {"flag": BOOL}, {"negated": BOOL}, lambda flag: {"negated": ~flag},
                      {"flag": (None,)}),
        FakeSignature("positive_only", x, {"y": F32}, positive_only, {"x": (None,)}),
        FakeSignature("double", {"x": F64}, {"y": F64}, lambda x: {"y": x / 3.0}, {"x": (None,)}),
        FakeSignature("unavailable", x, {"y": F32}, unavailable, {"x": (None,)}),
        FakeSignature("crash", x, {"y": F32}, crash, {"x": (None,)}),
        FakeSignature("classify_with_classes", {"inputs": STR}, {"classes": STR, "scores": F32},
                      classify_with_classes, {"inputs": (None,)}, CLASSIFY_METHOD),
    ])


def wide(name: str, version: int, path: str) -> FakeServable:
    """One float input of 16 features per row (wide enough for the dense decoder): y = Σ x, as
    ``tf.linalg.matmul(x, ones([16, 1]))[:, 0]`` computes it (and fails, with MatMul's message)."""
    def total(x: np.ndarray) -> dict[str, np.ndarray]:
        if x.ndim != 2:
            raise op_error(f"In[0] is not a matrix. Instead it has shape {_shape_text(x.shape)}", "MatMul")
        if x.shape[1] != 16:
            raise op_error(f"Matrix size-incompatible: In[0]: {_shape_text(x.shape)}, In[1]: [16,1]",
                           "MatMul")
        return {"y": x.sum(axis=1, dtype=np.float32)}

    return FakeServable(name, version, path, [
        FakeSignature(DEFAULT_SIGNATURE, {"x": F32}, {"y": F32}, total, {"x": (None, 16)})])


Builder = Callable[[str, int, str], FakeServable]


@dataclass
class FakeModel:
    """A model in the config: its versions on disk (each built by a function, or failing to load
    with an error), its version policy and labels."""

    name: str
    versions: dict[int, Builder | TFWSGIError]
    policy: VersionPolicy = field(default_factory=VersionPolicy)
    labels: dict[str, int] = field(default_factory=dict)


def standard_models() -> list[FakeModel]:
    """The models of tests/models.py's config: hp (versions 1 and 2 of 3, labelled), multi (7),
    flaky (2 fails to load, 1 serves) and wide."""
    def hp(b: float) -> Builder:
        return lambda name, version, path: half_plus_two(name, version, path, b)

    return [
        FakeModel("hp", {1: hp(2.0), 2: hp(3.0), 3: hp(4.0)}, VersionPolicy(SPECIFIC, versions=(1, 2)),
                  {"stable": 1, "canary": 2}),
        FakeModel("multi", {7: multi}),
        FakeModel("flaky", {1: hp(2.0), 2: TFWSGIError("Can't parse saved_model.pb as binary proto", 15)},
                  VersionPolicy(ALL)),
        FakeModel("wide", {1: wide}),
    ]


def make_settings(**values: Any) -> Settings:
    """tfwsgi's defaults (never the test process's ``TFWSGI_*`` environment), with ``values``."""
    return from_env({}).replace(**values)


def make_app(tmp_path: Path, models: Sequence[FakeModel] | None = None, **settings: Any) -> Flask:
    """The real app (``tfwsgi.application.create_app``) over the real ModelManager, whose versions are
    directories under ``tmp_path`` loaded by the fakes; ``settings`` override tfwsgi's defaults."""
    models = standard_models() if models is None else models
    builders: dict[tuple[str, int], Builder | TFWSGIError] = {}
    configs = []
    for model in models:
        base = tmp_path / "models" / model.name
        for version, build in model.versions.items():
            (base / str(version)).mkdir(parents=True, exist_ok=True)
            builders[model.name, version] = build
        configs.append(ModelConfig(model.name, str(base), model.policy, dict(model.labels)))

    loaded: dict[tuple[str, int], FakeServable] = {}

    def load(name: str, version: int, path: str) -> FakeServable:
        build = builders[name, version]
        if isinstance(build, TFWSGIError):
            raise build
        loaded[name, version] = build(name, version, path)
        return loaded[name, version]

    manager = ModelManager(configs, loader=load)
    manager.load_all()
    app = create_app(manager, make_settings(**settings))
    app.config[LOADED] = loaded
    return app


LOADED = "TFWSGI_TEST_FAKES"


def loaded(app: Flask, name: str, version: int) -> FakeServable:
    """The fake that ``make_app`` loaded for a version, to count its model runs."""
    return app.config[LOADED][name, version]


def ok(resp: Any) -> Any:
    """The JSON of a 200 answer, read with Python's parser (TF Serving writes NaN and Infinity)."""
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.headers["Content-Type"] == "application/json"
    return json.loads(resp.get_data())
