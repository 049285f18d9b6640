"""KServe v2 / Open Inference Protocol REST bodies ⇄ numpy: JSON tensors (flat or nested ``data``)
and the binary tensor data extension. Pure: no I/O, no Flask.

Sources: kserve/open-inference-protocol ``specification/protocol/inference_rest.md`` and
triton-inference-server/server ``docs/protocol/extension_binary_data.md``. The binary part of a
body follows its JSON header (``Inference-Header-Content-Length`` bytes long); each binary
tensor is raw little-endian row-major data, and a BYTES element is a 4-byte little-endian length
followed by its bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import codec
from .errors import InvalidArgument, Unimplemented

BYTES = "BYTES"
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(bool),
    "UINT8": np.dtype(np.uint8), "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32), "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8), "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32), "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16), "FP32": np.dtype(np.float32), "FP64": np.dtype(np.float64),
    BYTES: np.dtype(object),
}
_BY_DTYPE = {dtype: name for name, dtype in DATATYPES.items()}
# A signature_def's DataType names (TensorFlow's types.proto) → v2 datatypes, for metadata.
_TF_DATATYPES = {
    "DT_BOOL": "BOOL", "DT_UINT8": "UINT8", "DT_UINT16": "UINT16", "DT_UINT32": "UINT32",
    "DT_UINT64": "UINT64", "DT_INT8": "INT8", "DT_INT16": "INT16", "DT_INT32": "INT32",
    "DT_INT64": "INT64", "DT_HALF": "FP16", "DT_FLOAT": "FP32", "DT_DOUBLE": "FP64",
    "DT_STRING": BYTES, "DT_BFLOAT16": "BF16",
}
_LENGTH = 4  # a BYTES element's length prefix (uint32, little-endian)


def datatype_of(dtype: np.dtype) -> str:
    """The v2 datatype of a numpy dtype (TensorFlow strings are object arrays: BYTES)."""
    if dtype.kind in "OSU":
        return BYTES
    name = _BY_DTYPE.get(dtype)
    if name is None:
        raise InvalidArgument(f"tensor type {codec.tf_type_name(dtype)} has no KServe v2 datatype")
    return name


# ---------------------------------------------------------------------------------- requests

@dataclass
class InferRequest:
    """A parsed ``POST …/infer`` body: its tensors, their datatypes, and what to answer with."""

    inputs: dict[str, np.ndarray]
    datatypes: dict[str, str]
    id: str | None = None
    signature_name: str = ""  # the request parameter ``signature_name`` (tfwsgi's; "" is the default)
    binary_output: bool = False  # the request parameter ``binary_data_output``
    outputs: dict[str, bool | None] | None = None  # requested outputs → their ``binary_data`` (None: unset)
    parameters: dict[str, Any] = field(default_factory=dict)


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object, got {codec.debug_string(value)}")
    return value


def _string(doc: Mapping[str, Any], key: str, what: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must have a string '{key}'")
    return value


def _flag(params: Mapping[str, Any], key: str, what: str) -> bool | None:
    value = params.get(key)
    if value is not None and not isinstance(value, bool):
        raise InvalidArgument(
            f"parameter '{key}' of {what} must be a boolean, got {codec.debug_string(value)}")
    return value


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidArgument(f"{what} must be a non-negative integer, got {codec.debug_string(value)}")
    return value


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """The JSON header and the binary data of a body (``Inference-Header-Content-Length``)."""
    if header_length is None:
        return body, memoryview(b"")
    n = header_length.strip()
    if not (n.isascii() and n.isdigit()):  # not "²", which isdigit() takes and int() does not
        raise InvalidArgument(
            f"Inference-Header-Content-Length must be a non-negative integer, got {header_length!r}")
    if int(n) > len(body):
        raise InvalidArgument(
            f"Inference-Header-Content-Length {n} is larger than the body ({len(body)} bytes)")
    view = memoryview(body)
    return bytes(view[:int(n)]), view[int(n):]


def parse_infer(body: bytes, header_length: str | None = None) -> InferRequest:
    """An infer request body (JSON, or a JSON header then binary tensors) → InferRequest."""
    header, binary = split_body(body, header_length)
    doc = codec.parse_json(header)
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidArgument(f"'id' must be a string, got {codec.debug_string(request_id)}")
    params = _object(doc.get("parameters", {}), "'parameters'")
    signature_name = params.get("signature_name", "")
    if not isinstance(signature_name, str):
        raise InvalidArgument("parameter 'signature_name' must be a string")
    binary_output = bool(_flag(params, "binary_data_output", "the request"))

    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise InvalidArgument("the request must have 'inputs': a non-empty list of tensors")
    inputs: dict[str, np.ndarray] = {}
    datatypes: dict[str, str] = {}
    offset = 0
    for raw in raw_inputs:
        entry = _object(raw, "each of 'inputs'")
        name = _string(entry, "name", "each of 'inputs'")
        if name in inputs:
            raise InvalidArgument(f"input '{name}' is given more than once")
        datatype = _string(entry, "datatype", f"input '{name}'")
        shape = _shape(entry.get("shape"), name)
        input_params = _object(entry.get("parameters", {}), f"the parameters of input '{name}'")
        if "shared_memory_region" in input_params:
            raise Unimplemented(f"input '{name}': shared memory is not supported")
        if "binary_data_size" in input_params:
            if "data" in entry:
                raise InvalidArgument(f"input '{name}' has both 'data' and 'binary_data_size'")
            size = _count(input_params["binary_data_size"], f"'binary_data_size' of input '{name}'")
            if offset + size > len(binary):
                raise InvalidArgument(
                    f"input '{name}': binary_data_size {size} is past the end of the binary data "
                    f"({len(binary) - offset} bytes left)")
            inputs[name] = decode_binary(binary[offset:offset + size], datatype, shape, name)
            offset += size
        else:
            if "data" not in entry:
                raise InvalidArgument(f"input '{name}' has no 'data' (nor a 'binary_data_size' parameter)")
            inputs[name] = decode_json(entry["data"], datatype, shape, name)
        datatypes[name] = datatype
    if offset != len(binary):
        raise InvalidArgument(
            f"{len(binary) - offset} bytes of binary data follow the inputs that no input claims")

    outputs: dict[str, bool | None] | None = None
    if "outputs" in doc:
        raw_outputs = doc["outputs"]
        if not isinstance(raw_outputs, list):
            raise InvalidArgument("'outputs' must be a list")
        outputs = {}
        for raw in raw_outputs:
            entry = _object(raw, "each of 'outputs'")
            name = _string(entry, "name", "each of 'outputs'")
            if name in outputs:
                raise InvalidArgument(f"output '{name}' is requested more than once")
            output_params = _object(entry.get("parameters", {}), f"the parameters of output '{name}'")
            if "classification" in output_params:
                raise Unimplemented(f"output '{name}': the classification extension is not supported")
            if "shared_memory_region" in output_params:
                raise Unimplemented(f"output '{name}': shared memory is not supported")
            outputs[name] = _flag(output_params, "binary_data", f"output '{name}'")
    return InferRequest(inputs, datatypes, request_id, signature_name, binary_output, outputs, params)


def _shape(value: Any, name: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > 32:
        raise InvalidArgument(f"input '{name}' must have a 'shape': a list of at most 32 dimensions")
    return tuple(_count(d, f"each dimension of the shape of input '{name}'") for d in value)


def _dtype(datatype: str, name: str) -> np.dtype:
    dtype = DATATYPES.get(datatype)
    if dtype is None:
        raise InvalidArgument(f"input '{name}': unsupported datatype '{datatype}' "
                              f"(one of {', '.join(DATATYPES)})")
    return dtype


def _flatten(value: Any) -> Iterator[Any]:
    """The leaves of nested lists, in order; iterative, as JSON may nest deeper than Python recurses."""
    stack = [iter([value])]
    while stack:
        for v in stack[-1]:
            if isinstance(v, list):
                stack.append(iter(v))
                break
            yield v
        else:
            stack.pop()


def _count_error(name: str, shape: tuple[int, ...], n: int, got: int) -> InvalidArgument:
    return InvalidArgument(f"input '{name}': shape {list(shape)} has {n} elements, 'data' has {got}")


# numpy kinds np.array() may give JSON numbers of each datatype's family
_KINDS = {"b": "b", "i": "iu", "u": "iu", "f": "iuf"}


def decode_json(data: Any, datatype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    """One input's JSON ``data`` (flat or nested, row-major) as an array of its datatype and shape."""
    dtype = _dtype(datatype, name)
    n = math.prod(shape)
    if datatype == BYTES:
        flat = list(_flatten(data))
        if len(flat) != n:
            raise _count_error(name, shape, n, len(flat))
        if not all(isinstance(v, str) for v in flat):
            raise InvalidArgument(f"input '{name}': BYTES data must be strings")
        out = np.empty(n, dtype=object)
        out[:] = [v.encode("utf-8", "surrogatepass") for v in flat]
        return out.reshape(shape)
    if not isinstance(data, list):
        data = [data]
    try:
        arr = np.array(data)
    except (ValueError, OverflowError):  # ragged nesting
        raise InvalidArgument(f"input '{name}': 'data' is not a flat or evenly nested list") from None
    if arr.size != n:
        raise _count_error(name, shape, n, arr.size)
    if n and dtype.kind in "iu" and arr.dtype.kind in "Of":  # ints past int64 (UINT64's upper half)
        flat = list(_flatten(data))  # numpy read them as floats: take the JSON's ints
        if all(type(v) is int for v in flat):
            info = np.iinfo(dtype)
            if min(flat) < info.min or max(flat) > info.max:
                raise InvalidArgument(f"input '{name}': a value is out of the range of {datatype}")
            return np.array(flat, dtype=dtype).reshape(shape)
    if n and arr.dtype.kind not in _KINDS[dtype.kind]:
        raise InvalidArgument(f"input '{name}': 'data' holds values that are not {datatype}")
    if n and dtype.kind in "iu":
        info = np.iinfo(dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise InvalidArgument(f"input '{name}': a value is out of the range of {datatype}")
    with np.errstate(over="ignore"):  # a float past FP16/FP32's range: ±inf, as Triton's cast gives
        return arr.astype(dtype).reshape(shape)


def decode_binary(data: memoryview, datatype: str, shape: tuple[int, ...], name: str) -> np.ndarray:
    """One input's binary data (raw little-endian, or length-prefixed BYTES) as an array."""
    dtype = _dtype(datatype, name)
    n = math.prod(shape)
    if datatype == BYTES:
        items = list(_length_prefixed(bytes(data), name))
        if len(items) != n:
            raise _count_error(name, shape, n, len(items))
        out = np.empty(n, dtype=object)
        out[:] = items
        return out.reshape(shape)
    expected = n * dtype.itemsize
    if len(data) != expected:
        raise InvalidArgument(f"input '{name}': binary_data_size is {len(data)} bytes, shape "
                              f"{list(shape)} of {datatype} takes {expected}")
    if datatype == "BOOL":
        raw = np.frombuffer(data, dtype=np.uint8)
        if (raw > 1).any():
            raise InvalidArgument(f"input '{name}': BOOL bytes must be 0 or 1")
        return raw.view(bool).reshape(shape)
    return np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape(shape)


def _length_prefixed(data: bytes, name: str) -> Iterator[bytes]:
    i = 0
    while i < len(data):
        if i + _LENGTH > len(data):
            raise InvalidArgument(f"input '{name}': BYTES data ends inside an element's 4-byte length")
        length = int.from_bytes(data[i:i + _LENGTH], "little")
        i += _LENGTH
        if i + length > len(data):
            raise InvalidArgument(
                f"input '{name}': a BYTES element of {length} bytes is past the end of its data")
        yield data[i:i + length]
        i += length


def check_inputs(request: InferRequest, signature_inputs: Mapping[str, np.dtype], model: str) -> None:
    """Each input's datatype is its signature input's (Triton's words)."""
    codec.check_input_names(request.inputs, signature_inputs)
    for name, datatype in request.datatypes.items():
        expected = datatype_of(signature_inputs[name])
        if datatype != expected:
            raise InvalidArgument(f"inference input '{name}' data-type is '{datatype}', "
                                  f"but model '{model}' expects '{expected}'")


def check_outputs(request: InferRequest, signature_outputs: Mapping[str, Any], model: str) -> None:
    """Every requested output is one of the signature's (Triton's words)."""
    for name in request.outputs or ():
        if name not in signature_outputs:
            raise InvalidArgument(f"unexpected inference output '{name}' for model '{model}'")


# ---------------------------------------------------------------------------------- responses

def encode_infer(model_name: str, version: int, request: InferRequest,
                 outputs: Mapping[str, np.ndarray]) -> tuple[bytes, int | None]:
    """The response body and, when some output is binary, its JSON header's length. The outputs
    are the requested ones in the request's order, else all, by name."""
    names = list(request.outputs) if request.outputs is not None else sorted(outputs)
    entries = []
    chunks = []
    for name in names:
        arr = outputs[name]
        datatype = datatype_of(arr.dtype)
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        binary = request.outputs.get(name) if request.outputs is not None else None
        if binary is None:
            binary = request.binary_output
        if binary:
            raw = encode_binary(arr, datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _json_data(name, arr, datatype)
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": str(version)}
    if request.id is not None:
        doc["id"] = request.id
    doc["outputs"] = entries
    header = codec.dumps(doc)
    if not chunks:
        return header, None
    return header + b"".join(chunks), len(header)


def encode_binary(arr: np.ndarray, datatype: str) -> bytes:
    """A tensor's binary data: raw little-endian, or each BYTES element after its length."""
    if datatype == BYTES:
        parts = []
        for v in arr.reshape(-1):
            b = v.encode("utf-8") if isinstance(v, str) else bytes(v)
            parts.append(len(b).to_bytes(_LENGTH, "little"))
            parts.append(b)
        return b"".join(parts)
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


def _json_data(name: str, arr: np.ndarray, datatype: str) -> Any:
    if datatype == BYTES:
        out = []
        for v in arr.reshape(-1):
            if isinstance(v, str):
                out.append(v)
                continue
            try:
                out.append(bytes(v).decode("utf-8"))
            except UnicodeDecodeError:
                raise InvalidArgument(f"output '{name}' holds bytes that are not UTF-8, which JSON "
                                      "cannot carry: request it with the binary_data parameter") from None
        return out
    return codec.jsonable(name, arr.reshape(-1))


# ---------------------------------------------------------------------------------- metadata

def tensor_metadata(tensors: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A signature_def's inputs or outputs (json_format's TensorInfo) as v2 tensor metadata, by
    name. An unknown dimension is -1; a tensor of unknown rank is given as shape [-1]."""
    out = []
    for name in sorted(tensors):
        info = tensors[name]
        dt = info.get("dtype", "DT_INVALID")
        tensor_shape = info.get("tensor_shape") or {}
        if tensor_shape.get("unknown_rank"):
            shape = [-1]
        else:
            shape = [int(d.get("size", -1)) for d in tensor_shape.get("dim", [])]
        out.append({"name": name, "datatype": _TF_DATATYPES.get(dt, dt.removeprefix("DT_")),
                    "shape": shape})
    return out
