"""TF Serving's JSON ⇄ numpy, as ``tensorflow_serving/util/json_tensor.cc`` does it. Pure functions.

Decoding follows the signature's dtypes: a JSON value of the wrong type is an InvalidArgument
with TF Serving's message. Encoding writes row (``predictions``) or columnar (``outputs``) form,
``{"b64": …}`` for ``*_bytes`` string outputs, and NaN/Infinity/-Infinity for non-finite floats.

Known, deliberate differences from TF Serving, all about text rather than values:
- floats are written in the shortest form that round-trips to the same float32/float64
  (TF Serving prints 6 significant digits when they round-trip, else 9/17), so ``1e-07``
  is written ``1e-7``; parsed as the tensor's type, both give the same number;
- output is compact rather than pretty-printed;
- a string output that is not valid UTF-8 is written as ``{"b64": …}`` (TF Serving writes the
  raw bytes, which is not valid JSON);
- on the fast path a JSON ``true`` mixed into numbers is read as 1 (TF Serving rejects it).

Reading a body: orjson reads it; a body orjson refuses is read as TF Serving's RapidJSON reads it
(``jsonscan``), so a malformed body gets RapidJSON's message and offset. Differences there: a zero
with an exponent past 308 (``0e309``), which RapidJSON refuses as too big, is read as 0 (orjson
reads it); with duplicate keys the last one counts (RapidJSON's FindMember finds the first); see
``jsonscan`` for strings that are not UTF-8 and nesting deeper than 1024 levels.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orjson

from . import jsonscan
from .errors import InvalidArgument

ROW = "row"
COLUMNAR = "columnar"

_DUMPS_OPTS = orjson.OPT_SERIALIZE_NUMPY
_NONFINITE = re.compile(rb"NaN|Infinity")
_HIGH_SURROGATE = re.compile(rb"\\u[dD][89abAB]")
_RISKY_NUMBER = re.compile(r"[eE][+-]?[0-9]{3}|[0-9]{300}")
_MAX_DEBUG_BYTES = 256
_MAX_RANK = 32
STRING = np.dtype(object)

# numpy dtype → TF's DataTypeString, for messages.
_TF_TYPE_NAMES = {
    "float32": "float", "float64": "double", "float16": "half", "bfloat16": "bfloat16",
    "int8": "int8", "int16": "int16", "int32": "int32", "int64": "int64",
    "uint8": "uint8", "uint16": "uint16", "uint32": "uint32", "uint64": "uint64",
    "bool": "bool", "object": "string", "complex64": "complex64", "complex128": "complex128",
}


def tf_type_name(dtype: np.dtype) -> str:
    """TF's name for a numpy dtype (``float32`` → ``float``, object → ``string``)."""
    return _TF_TYPE_NAMES.get(dtype.name, dtype.name)


# ---------------------------------------------------------------------------------- parsing

def debug_string(value: Any) -> str:
    """A JSON rendering of ``value`` for error messages, cut at 256 bytes like TF Serving's."""
    try:
        text = orjson.dumps(value)
    except TypeError:  # NaN/Infinity read by the fallback parser, or deeper than orjson writes
        # Lazily, and only the part shown: a document nested a thousand deep (orjson reads up to
        # 1024 levels) would exhaust the recursion limit if written whole.
        text = b""
        for chunk in json.JSONEncoder().iterencode(value):
            text += chunk.encode()
            if len(text) >= _MAX_DEBUG_BYTES:
                break
    return text[:_MAX_DEBUG_BYTES].decode("utf-8", "replace")


def _json_type(value: Any) -> str:
    if value is None:
        return "Null"
    if value is True:
        return "True"
    if value is False:
        return "False"
    if isinstance(value, dict):
        return "Object"
    if isinstance(value, list):
        return "Array"
    if isinstance(value, str):
        return "String"
    return "Number"


class _NotSure(Exception):
    """Python's reading of a number or string might not be RapidJSON's: let jsonscan decide."""


def _plain_int(text: str) -> int:
    if len(text) > 18:  # past 64 bits RapidJSON reads a double (or refuses it as too big)
        raise _NotSure
    return int(text)


def _plain_float(text: str) -> float:
    if _RISKY_NUMBER.search(text):  # where RapidJSON's "Number too big" checks could fire
        raise _NotSure
    return float(text)


def _nonfinite(text: str) -> float:
    return float(text)  # NaN, Infinity, -Infinity


def _python_json(body: bytes) -> Any:
    """The document by Python's (C) parser when it reads it as RapidJSON does, else _NotSure.
    For bodies with NaN or Infinity, which orjson refuses and which may be large."""
    if _HIGH_SURROGATE.search(body):  # RapidJSON refuses a lone one; Python takes it
        raise _NotSure
    try:
        return json.loads(body, parse_int=_plain_int, parse_float=_plain_float,
                          parse_constant=_nonfinite)
    except (ValueError, RecursionError):  # invalid, trailing values, not UTF-8, too deep
        raise _NotSure from None


# Bodies orjson refuses are read again as RapidJSON reads them (jsonscan, pure Python, about
# 0.5 µs a byte: 2 s of a worker's CPU for a 4 MB malformed body of objects) only up to this size;
# a larger one gets orjson's words, so a malformed body costs at most ~0.5 s to refuse.
SCAN_LIMIT = 1 << 20


def parse_json(body: bytes) -> dict[str, Any]:
    """Parse a request body into its top-level JSON object.

    orjson reads every body it can; only when it refuses one is the body read as TF Serving's
    RapidJSON reads it (``jsonscan``): that gives TF Serving's words and offset for a malformed
    body, and accepts what TF Serving accepts and orjson does not (NaN and Infinity, values after
    the root, a byte order mark), for bodies up to ``SCAN_LIMIT``."""
    if not body:  # TF Serving's own check, before RapidJSON's (json_tensor.cc, ParseJson)
        raise InvalidArgument("JSON Parse error: The document is empty")
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as orjson_error:
        if len(body) > SCAN_LIMIT:  # the pure-Python reader costs ~0.5 µs a byte: bounded
            raise InvalidArgument(f"JSON Parse error: {orjson_error}") from None
        try:
            if not _NONFINITE.search(body):
                raise _NotSure
            doc = _python_json(body)
        except _NotSure:
            try:
                doc = jsonscan.parse(body)
            except jsonscan.ParseError as exc:
                raise InvalidArgument(f"JSON Parse error: {exc}") from None
    if not isinstance(doc, dict):
        raise InvalidArgument(f"JSON Value: {debug_string(doc)} Is not object")
    return doc


def signature_name(doc: Mapping[str, Any]) -> str:
    """The request's ``signature_name``, or "" when absent."""
    name = doc.get("signature_name", "")
    if not isinstance(name, str):
        raise InvalidArgument(
            f"JSON Value: {debug_string(doc)} not formatted correctly. "
            "'signature_name' key must be a string value.")
    return name


# ---------------------------------------------------------------------------------- tensors

def _type_error(value: Any, dtype: np.dtype) -> InvalidArgument:
    return InvalidArgument(
        f"JSON Value: {debug_string(value)} Type: {_json_type(value)} "
        f"is not of expected type: {tf_type_name(dtype)}")


def is_b64_object(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def decode_b64(value: Any) -> bytes:
    """Bytes from a ``{"b64": "…"}`` object (standard or URL-safe alphabet, padding optional)."""
    if not is_b64_object(value):
        raise InvalidArgument(
            f"JSON Value: {debug_string(value)} not formatted correctly for base64 data")
    text = value["b64"]
    text += "=" * (-len(text) % 4)
    try:
        if "-" in text or "_" in text:
            return base64.b64decode(text, altchars=b"-_", validate=True)
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument("Unable to base64 decode") from None


def _leaf(value: Any, dtype: np.dtype) -> Any:
    kind = dtype.kind
    if isinstance(value, dict):
        if kind == "O":
            return decode_b64(value)
        raise _type_error(value, dtype)
    if kind == "O":
        if isinstance(value, str):
            return value.encode("utf-8", "surrogatepass")
        raise _type_error(value, dtype)
    if kind == "b":
        if isinstance(value, bool):
            return value
        raise _type_error(value, dtype)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type_error(value, dtype)
    if kind == "f":
        return value
    if kind in "iu" and isinstance(value, int):
        info = np.iinfo(dtype)
        if info.min <= value <= info.max:
            return value
    raise _type_error(value, dtype)


def _dense_shape(value: Any) -> list[int]:
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value or len(shape) > _MAX_RANK:
            break
        value = value[0]
    return shape


def _fill(value: Any, dtype: np.dtype) -> np.ndarray:
    """The strict path: walk the JSON like FillTensorProto, with its messages."""
    shape = _dense_shape(value)
    rank = len(shape)
    if rank > _MAX_RANK:
        raise InvalidArgument(f"Tensor rank exceeds the maximum of {_MAX_RANK}")
    flat: list[Any] = []

    def walk(v: Any, level: int) -> None:
        if not isinstance(v, list):
            if level != rank:
                raise InvalidArgument(
                    f"JSON Value: {debug_string(v)} found at incorrect level: {level + 1} "
                    f"in the JSON DOM. Expected at level: {rank}")
            flat.append(_leaf(v, dtype))
            return
        if level >= rank:
            raise InvalidArgument(
                f"Encountered list at unexpected level: {level} expected < {rank}")
        if len(v) != shape[level]:
            raise InvalidArgument(
                f"Encountered list at unexpected size: {len(v)} at level: {level} "
                f"expected size: {shape[level]}")
        for item in v:
            walk(item, level + 1)

    walk(value, 0)
    if dtype.kind == "O":
        out = np.empty(len(flat), dtype=object)
        out[:] = flat
        return out.reshape(shape)
    try:
        return np.array(flat, dtype=dtype).reshape(shape)
    except OverflowError:
        raise InvalidArgument(f"Value out of range for type: {tf_type_name(dtype)}") from None


def _fast(value: Any, dtype: np.dtype) -> np.ndarray | None:
    """Numbers and bools straight through numpy, or None when only the strict path can tell."""
    if dtype.kind not in "fiub" or not isinstance(value, (list, int, float)):
        return None
    try:
        arr = np.array(value)
    except (ValueError, OverflowError, TypeError):
        return None  # ragged or odd: the strict path says what is wrong
    if arr.ndim > _MAX_RANK:
        return None
    kind, got = dtype.kind, arr.dtype.kind
    if arr.size == 0 and got == "f":
        return arr.astype(dtype)
    if kind == "f" and got in "fiu":
        with np.errstate(over="ignore"):  # past the type's range: ±inf, as TF Serving's cast gives
            return arr.astype(dtype, copy=False)
    if kind == "b" and got == "b":
        return arr
    if kind in "iu" and got in "iu":
        info = np.iinfo(dtype)
        if arr.size == 0 or (arr.min() >= info.min and arr.max() <= info.max):
            return arr.astype(dtype, copy=False)
    return None


def to_tensor(value: Any, dtype: np.dtype) -> np.ndarray:
    """One JSON value (scalar or nested lists) as an array of ``dtype``."""
    arr = _fast(value, dtype)
    return arr if arr is not None else _fill(value, dtype)


def _status_text(exc: InvalidArgument) -> str:
    return f"INVALID_ARGUMENT: {exc.message}"


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _stack_instances(values: list[Any], dtype: np.dtype, key: str | None) -> np.ndarray:
    """Batch the instances of one input: each must give a tensor of the same shape."""
    arr = _fast(values, dtype)
    if arr is not None:
        return arr
    parts: list[np.ndarray] = []
    for i, v in enumerate(values):
        try:
            t = to_tensor(v, dtype)
            if parts and t.size != parts[0].size:
                raise InvalidArgument(f"Expecting tensor size: {parts[0].size} but got: {t.size}")
            if parts and t.shape != parts[0].shape:
                raise InvalidArgument(
                    f"Expecting shape {_shape_text(parts[0].shape)} but got: {_shape_text(t.shape)}")
        except InvalidArgument as exc:
            where = f"{i} key: {key}" if key is not None else f"{i}"
            raise InvalidArgument(
                f"Failed to process element: {where} of 'instances' list. "
                f"Error: {_status_text(exc)}") from None
        parts.append(t)
    if dtype.kind == "O":
        out = np.empty(len(parts) * parts[0].size, dtype=object)
        out[:] = [x for p in parts for x in p.reshape(-1)]
        return out.reshape((len(parts), *parts[0].shape))
    return np.stack(parts)


def check_input_names(inputs: Mapping[str, Any], signature_inputs: Mapping[str, Any]) -> None:
    """TF Serving's error when the fed tensors are not exactly the signature's inputs."""
    if set(inputs) != set(signature_inputs):
        raise InvalidArgument(
            f"input size does not match signature: {len(inputs)}!={len(signature_inputs)} "
            f"for inputs: {{{','.join(sorted(inputs))}}} vs signature "
            f"{{{','.join(sorted(signature_inputs))}}}")


def decode_predict(doc: Mapping[str, Any],
                   inputs: Mapping[str, np.dtype]) -> tuple[dict[str, np.ndarray], str]:
    """The input tensors of a predict request, and whether it was row or columnar."""
    if not inputs:
        name = doc.get("signature_name") or "DEFAULT"  # json_tensor.cc FillPredictRequestFromJson
        raise InvalidArgument(f"Failed to get input map for signature: {name}")
    has_instances = "instances" in doc
    has_inputs = "inputs" in doc
    if has_instances and has_inputs:
        raise InvalidArgument(
            f"JSON Value: {debug_string(doc)} Not formatted correctly expecting only one of "
            "'inputs' or 'instances' keys to exist ")
    if has_instances:
        return _decode_instances(doc, inputs), ROW
    if has_inputs:
        return _decode_inputs(doc["inputs"], inputs), COLUMNAR
    raise InvalidArgument("Missing 'inputs' or 'instances' key")


def _is_element_object(value: Any) -> bool:
    return isinstance(value, dict) and not is_b64_object(value)


def _decode_instances(doc: Mapping[str, Any], inputs: Mapping[str, np.dtype]) -> dict[str, np.ndarray]:
    instances = doc["instances"]
    if not isinstance(instances, list):
        raise InvalidArgument(
            f"JSON Value: {debug_string(doc)} Expecting 'instances' to be an list/array")
    if not instances:
        raise InvalidArgument(f"JSON Value: {debug_string(doc)} No values in 'instances' array")
    names = sorted(inputs)
    named = _is_element_object(instances[0])
    if not named:
        if len(names) > 1:
            raise InvalidArgument(
                "instances is a plain list, but expecting list of objects as multiple input "
                "tensors required as per tensorinfo_map")
        for i, elem in enumerate(instances):
            if _is_element_object(elem):
                raise InvalidArgument(
                    f"Expecting value/list but got object at item {i} of input list")
        return {names[0]: _stack_instances(instances, inputs[names[0]], None)}
    expected = set(names)
    for i, elem in enumerate(instances):
        if not _is_element_object(elem):
            raise InvalidArgument(f"Expecting object but got list at item {i} of input list")
        for key in elem:
            if key not in inputs:
                raise InvalidArgument(
                    f"Failed to process element: {i} key: {key} of 'instances' list. Error: "
                    f"INVALID_ARGUMENT: JSON object: does not have named input: {key}")
        if set(elem) != expected:
            raise InvalidArgument(
                f"Failed to process element: {i} of 'instances' list. JSON object: "
                f"{debug_string(elem)} keys must be equal to: {','.join(names)}")
    return {name: _stack_instances([e[name] for e in instances], inputs[name], name)
            for name in names}


def _decode_inputs(value: Any, inputs: Mapping[str, np.dtype]) -> dict[str, np.ndarray]:
    names = sorted(inputs)
    if not isinstance(value, dict) or is_b64_object(value):
        if len(names) > 1:
            raise InvalidArgument(
                "inputs is a plain value/list, but expecting an object as multiple input "
                "tensors required as per tensorinfo_map")
        return {names[0]: to_tensor(value, inputs[names[0]])}
    out = {}
    for name in names:
        if name not in value:
            raise InvalidArgument(f"Missing named input: {name} in 'inputs' object.")
        out[name] = to_tensor(value[name], inputs[name])
    return out


# ---------------------------------------------------------------------------------- encoding

def _strings(arr: np.ndarray, as_b64: bool) -> Any:
    def one(b: Any) -> Any:
        if isinstance(b, str):
            b = b.encode("utf-8")
        if not as_b64:
            try:
                return b.decode("utf-8")
            except UnicodeDecodeError:
                pass
        return {"b64": base64.b64encode(b).decode("ascii")}

    def walk(a: Any) -> Any:
        return [walk(x) for x in a] if isinstance(a, list) else one(a)

    return walk(arr.tolist())


_JSON_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_NAN = orjson.Fragment(b"NaN")
_INF = orjson.Fragment(b"Infinity")
_NINF = orjson.Fragment(b"-Infinity")


def _with_nonfinite(arr: np.ndarray) -> Any:
    if arr.ndim == 0:
        v = arr[()]
        if np.isnan(v):
            return _NAN
        if np.isinf(v):
            return _INF if v > 0 else _NINF
        return v
    return [_with_nonfinite(sub) for sub in arr]


def jsonable(name: str, arr: np.ndarray) -> Any:
    """What orjson should write for one output tensor."""
    kind = arr.dtype.kind
    if kind == "O" or kind in "SU":
        return _strings(arr, name.endswith("_bytes"))
    if kind == "c" or kind == "V":
        raise InvalidArgument(f"Failed to write JSON value for tensor type: {tf_type_name(arr.dtype)}")
    if kind == "f":
        if arr.dtype not in _JSON_FLOATS:
            arr = arr.astype(np.float32)  # bfloat16 and friends
        # isfinite + all, which never warns: half the time of a sum under np.errstate (measured
        # from 10 to 32,000 values).
        if not np.isfinite(arr).all():
            return _with_nonfinite(arr)
    if arr.ndim == 0:
        return arr[()]
    return np.ascontiguousarray(arr)


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, option=_DUMPS_OPTS)


def encode_predict(outputs: Mapping[str, np.ndarray], fmt: str) -> bytes:
    """A predict response body in the request's format."""
    if not outputs:
        raise InvalidArgument("Cannot convert empty tensor map to JSON")
    names = sorted(outputs)
    if fmt == COLUMNAR:
        if len(names) == 1:
            return dumps({"outputs": jsonable(names[0], outputs[names[0]])})
        return dumps({"outputs": {n: jsonable(n, outputs[n]) for n in names}})
    batch = -1
    for n in names:
        shape = outputs[n].shape
        if not shape:
            raise InvalidArgument(f"Tensor name: {n} has no shape information ")
        if batch >= 0 and shape[0] != batch:
            raise InvalidArgument(
                f"Tensor name: {n} has inconsistent batch size: {shape[0]} expecting: {batch}")
        batch = shape[0]
    if len(names) == 1:
        return dumps({"predictions": jsonable(names[0], outputs[names[0]])})
    columns = {n: jsonable(n, outputs[n]) for n in names}
    rows = [{n: columns[n][i] for n in names} for i in range(batch)]
    return dumps({"predictions": rows})


def encode_error(message: str) -> bytes:
    return dumps({"error": message})


# ---------------------------------------------------------------------------------- classify/regress

def _feature_value(value: Any, name: str) -> tuple[str, Any]:
    """The feature kind ("bytes"/"float"/"int64") of one JSON element, and its value."""
    if value is None or isinstance(value, list):
        raise InvalidArgument(
            f"Feature: {name} has element with unexpected JSON type: {_json_type(value)}")
    if isinstance(value, bool):
        return "int64", int(value)
    if isinstance(value, dict):
        if not is_b64_object(value):
            raise InvalidArgument(
                f"Feature: {name} has element with unexpected JSON type: {_json_type(value)}")
        return "bytes", decode_b64(value)
    if isinstance(value, str):
        return "bytes", value.encode("utf-8", "surrogatepass")
    if isinstance(value, float):
        return "float", value
    if not -(2**63) <= value < 2**63:
        raise InvalidArgument(f"Feature: {name} has uint64_t element. Only int64_t is supported.")
    return "int64", value


def example_features(obj: Any) -> dict[str, tuple[str, list[Any]]]:
    """One JSON example as ``{feature: (kind, values)}``, with TF Serving's type rules."""
    if not isinstance(obj, dict):
        raise InvalidArgument(f"Example must be JSON object but got JSON {_json_type(obj)}")
    features: dict[str, tuple[str, list[Any]]] = {}
    for name, content in obj.items():
        kind = ""
        values: list[Any] = []
        for item in (content if isinstance(content, list) else [content]):
            item_kind, item_value = _feature_value(item, name)
            if kind and item_kind != kind:
                raise InvalidArgument(
                    f"Unexpected element type in feature: {name} expecting type: {kind}")
            kind = item_kind
            values.append(item_value)
        features[name] = (kind, values)
    return features


def decode_examples(doc: Mapping[str, Any]) -> tuple[dict[str, tuple[str, list[Any]]] | None,
                                                       list[dict[str, tuple[str, list[Any]]]]]:
    """The ``context`` (or None) and ``examples`` of a classify/regress request."""
    context = example_features(doc["context"]) if "context" in doc else None
    if "examples" not in doc:
        raise InvalidArgument(
            f"JSON Value: {debug_string(doc)} When method is classify, key 'examples' "
            "is expected and was not found")
    examples = doc["examples"]
    if not isinstance(examples, list):
        raise InvalidArgument(
            f"JSON Value: {debug_string(doc)} Expecting 'examples' value to be an list/array")
    if not examples:
        raise InvalidArgument(f"JSON Value: {debug_string(doc)} 'examples' value is an empty array")
    return context, [example_features(e) for e in examples]


def encode_classify(classes: np.ndarray | None, scores: np.ndarray | None, n: int) -> bytes:
    """``{"results": [[[label, score], …], …]}`` from the classify outputs."""
    num = classes.shape[1] if classes is not None else scores.shape[1] if scores is not None else 0
    zero = np.float32(0.0)
    labels = _strings(classes, False) if classes is not None else None
    results = []
    for i in range(n):
        row = []
        for c in range(num):
            label = labels[i][c] if labels is not None else ""
            if isinstance(label, dict):  # not UTF-8: keep it lossless
                label = label["b64"]
            score = scores[i, c] if scores is not None else zero
            row.append([label, _NAN if np.isnan(score) else score])
        results.append(row)
    return dumps({"results": results})


def encode_regress(values: np.ndarray) -> bytes:
    return dumps({"results": jsonable("outputs", values.reshape(-1))})
