"""TensorFlow's ``TensorProto`` ⇄ numpy (pure, table-driven; the gRPC transport's codec).

TensorFlow-free: the functions read and fill any message with ``TensorProto``'s fields
(tensorflow/core/framework/tensor.proto), so importing this module imports no protobuf module
at all. Decoding follows ``Tensor::FromProto`` (tensorflow/core/framework/tensor.cc):
``tensor_content`` holds the raw little-endian values and must hold exactly the shape's number
of elements; otherwise the typed field (``float_val``, ``int_val``, ``string_val`` …) is read, an
empty one giving zeros, a shorter one repeating its last value over the shape, a longer one
cut to the shape (``FromProtoField``). Encoding follows TF Serving's default answer
(``Tensor::AsProtoField``: typed fields), or ``Tensor::AsProtoTensorContent`` with
``--enable_serialization_as_tensor_content`` (``fill_content``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import codec
from .errors import InvalidArgument


@dataclass(frozen=True)
class _Type:
    number: int  # tensorflow.DataType (tensorflow/core/framework/types.proto)
    name: str  # DataTypeString's, as TF Serving's messages write it
    dtype: np.dtype
    field: str  # the TensorProto field holding its values


_TYPES = (
    _Type(1, "float", np.dtype(np.float32), "float_val"),
    _Type(2, "double", np.dtype(np.float64), "double_val"),
    _Type(3, "int32", np.dtype(np.int32), "int_val"),
    _Type(4, "uint8", np.dtype(np.uint8), "int_val"),
    _Type(5, "int16", np.dtype(np.int16), "int_val"),
    _Type(6, "int8", np.dtype(np.int8), "int_val"),
    _Type(7, "string", np.dtype(object), "string_val"),
    _Type(8, "complex64", np.dtype(np.complex64), "scomplex_val"),
    _Type(9, "int64", np.dtype(np.int64), "int64_val"),
    _Type(10, "bool", np.dtype(np.bool_), "bool_val"),
    _Type(17, "uint16", np.dtype(np.uint16), "int_val"),
    _Type(18, "complex128", np.dtype(np.complex128), "dcomplex_val"),
    _Type(19, "half", np.dtype(np.float16), "half_val"),
    _Type(22, "uint32", np.dtype(np.uint32), "uint32_val"),
    _Type(23, "uint64", np.dtype(np.uint64), "uint64_val"),
)
BY_NUMBER: dict[int, _Type] = {t.number: t for t in _TYPES}
BY_DTYPE: dict[np.dtype, _Type] = {t.dtype: t for t in _TYPES}
DT_STRING = 7


def type_name(number: int) -> str:
    t = BY_NUMBER.get(number)
    return t.name if t is not None else f"DataType({number})"


class ParseError(ValueError):
    """``Tensor::FromProto`` would return false for this proto."""


def to_array(proto: Any) -> np.ndarray:
    """The numpy array a ``TensorProto`` holds; ParseError where TensorFlow cannot parse it."""
    t = BY_NUMBER.get(proto.dtype)
    if t is None:
        raise ParseError(f"unsupported dtype {proto.dtype}")
    shape_proto = proto.tensor_shape
    if shape_proto.unknown_rank:
        raise ParseError("unknown rank")
    shape = tuple(int(d.size) for d in shape_proto.dim)
    if any(d < 0 for d in shape):
        raise ParseError("negative dimension")
    n = math.prod(shape)
    content = proto.tensor_content
    if t.number == DT_STRING:
        if content:
            raise ParseError("strings in tensor_content")
        return _fill(np.array(list(proto.string_val) or [], dtype=object), n, b"").reshape(shape)
    if content:
        if len(content) != n * t.dtype.itemsize:
            raise ParseError(f"tensor_content holds {len(content)} bytes, not {n} × {t.dtype.itemsize}")
        little = np.frombuffer(content, dtype=t.dtype.newbyteorder("<"))
        return little.astype(t.dtype, copy=False).reshape(shape)
    values = getattr(proto, t.field)
    if t.number == 19:  # half_val: the float16 bit patterns, one per int32
        flat = np.array(values, dtype=np.int32).astype(np.uint16).view(np.float16)
    elif t.dtype.kind == "c":  # scomplex_val/dcomplex_val: real and imaginary parts, interleaved
        parts = np.array(values, dtype=t.dtype.type(0).real.dtype)
        if len(parts) % 2:
            raise ParseError("an odd number of complex parts")
        flat = parts.view(t.dtype)
    elif t.field == "int_val":  # int32 values, cast to the narrower type as C++ does (wrapping)
        flat = np.array(values, dtype=np.int32).astype(t.dtype)
    else:
        flat = np.array(values, dtype=t.dtype)
    return _fill(flat, n, t.dtype.type(0)).reshape(shape)


def _fill(flat: np.ndarray, n: int, zero: Any) -> np.ndarray:
    """``FromProtoField``: no value → zeros; fewer than n → the last repeated; more → the first n."""
    if len(flat) >= n:
        return flat[:n]
    out = np.empty(n, dtype=flat.dtype)
    out[:len(flat)] = flat
    out[len(flat):] = flat[-1] if len(flat) else zero
    return out


def decode_inputs(protos: Mapping[str, Any],
                  signature_inputs: Mapping[str, np.dtype]) -> dict[str, np.ndarray]:
    """A PredictRequest's ``inputs`` for a signature, with TF Serving's errors
    (tensorflow_serving/servables/tensorflow/predict_util.cc ``PreProcessPrediction``; the
    dtype check is tfrt_predict_util.cc's, which the session path leaves to the run)."""
    if len(protos) != len(signature_inputs):
        codec.check_input_names(protos, signature_inputs)
    out = {}
    for alias in sorted(protos):
        want = signature_inputs.get(alias)
        if want is None:
            raise InvalidArgument(f"input tensor alias not found in signature: {alias}. Inputs expected "
                                  f"to be in the set {{{','.join(sorted(signature_inputs))}}}.")
        proto = protos[alias]
        try:
            array = to_array(proto)
        except ParseError:
            raise InvalidArgument(f"tensor parsing error: {alias}") from None
        wanted = BY_DTYPE.get(np.dtype(want))
        if wanted is not None and wanted.number != proto.dtype:
            raise InvalidArgument(f"Expected input {alias} to be {wanted.name} but get "
                                  f"{type_name(proto.dtype)}.")
        out[alias] = array
    return out


def check_output_filter(output_filter: Any, outputs: Any) -> None:
    """predict_util.cc ``PreProcessPrediction``: every alias an output, none twice."""
    seen: set[str] = set()
    for alias in output_filter:
        if alias not in outputs:
            raise InvalidArgument(f"output tensor alias not found in signature: {alias} Outputs "
                                  f"expected to be in the set {{{','.join(sorted(outputs))}}}.")
        if alias in seen:
            raise InvalidArgument(f"duplicate output tensor alias: {alias}")
        seen.add(alias)


def _header(proto: Any, array: np.ndarray) -> tuple[_Type, np.ndarray]:
    """Set ``proto``'s dtype and shape for ``array``; its type and its values, flat."""
    array = np.asarray(array)
    if array.dtype.kind in "SU":
        array = array.astype(object)
    t = BY_DTYPE.get(array.dtype.newbyteorder("=")) if array.dtype.kind != "O" else BY_NUMBER[DT_STRING]
    if t is None:
        raise InvalidArgument(f"cannot answer a tensor of dtype {array.dtype}")
    proto.dtype = t.number
    for d in array.shape:
        proto.tensor_shape.dim.add().size = d
    return t, array.reshape(-1)


def _bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def fill_content(proto: Any, array: np.ndarray) -> None:
    """Write ``array`` into an empty ``TensorProto`` as ``Tensor::AsProtoTensorContent`` does
    (TF Serving's ``--enable_serialization_as_tensor_content``): the raw little-endian values in
    ``tensor_content``; strings as ``port::EncodeStringList`` writes them there (every length as
    a varint, then every string's bytes), which TensorFlow's C++ reads and ``tf.make_ndarray``
    does not."""
    t, flat = _header(proto, array)
    if t.number == DT_STRING:
        values = [_bytes(v) for v in flat]
        proto.tensor_content = b"".join(_varint(len(v)) for v in values) + b"".join(values)
    else:
        proto.tensor_content = flat.astype(t.dtype.newbyteorder("<"), copy=False).tobytes()


def fill(proto: Any, array: np.ndarray) -> None:
    """Write ``array`` into an empty ``TensorProto`` as ``Tensor::AsProtoField`` does."""
    t, flat = _header(proto, array)
    if t.number == DT_STRING:
        proto.string_val.extend(_bytes(v) for v in flat)
    elif t.number == 19:
        proto.half_val.extend(flat.view(np.uint16).astype(np.int32).tolist())
    elif t.dtype.kind == "c":
        getattr(proto, t.field).extend(flat.view(flat.real.dtype).tolist())
    else:
        getattr(proto, t.field).extend(flat.tolist())
