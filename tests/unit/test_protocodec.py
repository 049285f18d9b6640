"""tfwsgi.protocodec: TensorProto ⇄ numpy, against TensorFlow's own encoder and decoder
(``tf.make_tensor_proto`` writes what tensorflow-serving-api clients send; ``tf.make_ndarray``
reads what they receive)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2, types_pb2

from tfwsgi import protocodec
from tfwsgi.dataplane import ProtoPredict
from tfwsgi.errors import InvalidArgument

ARRAYS = [
    np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    np.array([[1.5, -2.25]], dtype=np.float64),
    np.array([1, -2, 2**31 - 1], dtype=np.int32),
    np.array([0, 255], dtype=np.uint8),
    np.array([-3, 3], dtype=np.int16),
    np.array([-128, 127], dtype=np.int8),
    np.array([2**40, -(2**62)], dtype=np.int64),
    np.array([[True, False]], dtype=np.bool_),
    np.array([65535], dtype=np.uint16),
    np.array([0.5, -1.0, 65504.0], dtype=np.float16),
    np.array([1 + 2j, -3.5j], dtype=np.complex64),
    np.array([[1 - 1j]], dtype=np.complex128),
    np.array([2**32 - 1], dtype=np.uint32),
    np.array([2**64 - 1], dtype=np.uint64),
    np.array([[b"a", b"\xff\x00"], [b"", b"xyz"]], dtype=object),
    np.float32(3.0).reshape(()),
    np.zeros((0, 3), dtype=np.float32),
]


def _ids(a: np.ndarray) -> str:
    return f"{a.dtype}{list(a.shape)}"


@pytest.mark.parametrize("array", ARRAYS, ids=_ids)
def test_what_make_tensor_proto_writes_decodes_to_the_array(array: np.ndarray) -> None:
    got = protocodec.to_array(tf.make_tensor_proto(array))
    assert got.dtype == array.dtype and got.shape == array.shape
    np.testing.assert_array_equal(got, array)


@pytest.mark.parametrize("array", ARRAYS, ids=_ids)
def test_typed_fields_decode_like_tensor_content(array: np.ndarray) -> None:
    proto = tensor_pb2.TensorProto()
    protocodec.fill(proto, array)  # typed fields, as TF Serving answers
    assert proto.tensor_content == b""
    np.testing.assert_array_equal(tf.make_ndarray(proto), array)
    got = protocodec.to_array(proto)
    assert got.dtype == array.dtype and got.shape == array.shape
    np.testing.assert_array_equal(got, array)


@pytest.mark.parametrize("array", ARRAYS, ids=_ids)
def test_tensor_content_is_what_tensorflow_writes_and_reads(array: np.ndarray) -> None:
    proto = tensor_pb2.TensorProto()
    protocodec.fill_content(proto, array)  # --enable_serialization_as_tensor_content
    assert not (proto.float_val or proto.int_val or proto.string_val or proto.half_val)
    # TensorFlow's C++ Tensor::FromProto reads it back (strings too: port::DecodeStringList).
    dtype = tf.dtypes.as_dtype(proto.dtype)
    back = tf.io.parse_tensor(proto.SerializeToString(), dtype).numpy()
    assert back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    if array.dtype != object:
        # Tensor::AsProtoTensorContent's bytes (tf.io.serialize_tensor writes numbers with it).
        ref = tensor_pb2.TensorProto.FromString(tf.io.serialize_tensor(array).numpy())
        assert proto.tensor_content == ref.tensor_content
        np.testing.assert_array_equal(tf.make_ndarray(proto), array)


def test_long_strings_take_multi_byte_varint_lengths() -> None:
    array = np.array([b"x" * 300, b"", b"y" * 20000], dtype=object)
    proto = tensor_pb2.TensorProto()
    protocodec.fill_content(proto, array)
    assert proto.tensor_content[:2] == bytes([0xAC, 0x02])  # 300
    back = tf.io.parse_tensor(proto.SerializeToString(), tf.string).numpy()
    assert list(back) == list(array)


def _proto(dtype: int, shape: tuple[int, ...], **fields: object) -> tensor_pb2.TensorProto:
    proto = tensor_pb2.TensorProto(dtype=dtype, **fields)
    for d in shape:
        proto.tensor_shape.dim.add().size = d
    return proto


def test_few_values_repeat_the_last_and_none_give_zeros() -> None:
    # tensor.cc FromProtoField: the last value fills the shape; an empty field gives zeros.
    short = _proto(types_pb2.DT_FLOAT, (2, 3), float_val=[1.0, 2.0])
    got = protocodec.to_array(short)
    np.testing.assert_array_equal(got, [[1, 2, 2], [2, 2, 2]])
    np.testing.assert_array_equal(tf.make_ndarray(short), got)
    np.testing.assert_array_equal(protocodec.to_array(_proto(types_pb2.DT_INT64, (2,))), [0, 0])
    assert protocodec.to_array(_proto(types_pb2.DT_STRING, (2,), string_val=[b"x"])).tolist() == [b"x", b"x"]
    # int_val holds int32s; a narrower type takes them as C++'s static_cast does.
    assert protocodec.to_array(_proto(types_pb2.DT_UINT8, (2,), int_val=[300, -1])).tolist() == [44, 255]
    # No shape: a scalar (TF Serving's own tests send `float_val: 2.0` alone).
    assert protocodec.to_array(_proto(types_pb2.DT_FLOAT, (), float_val=[2.0])).shape == ()


@pytest.mark.parametrize("proto", [
    _proto(types_pb2.DT_FLOAT, (3,), tensor_content=b"\x00" * 8),  # 2 floats for 3
    _proto(types_pb2.DT_FLOAT, (-1,), float_val=[1.0]),
    _proto(types_pb2.DT_STRING, (1,), tensor_content=b"abc"),
    _proto(types_pb2.DT_RESOURCE, (1,)),
    _proto(types_pb2.DT_COMPLEX64, (1,), scomplex_val=[1.0]),
], ids=["short-content", "negative-dim", "string-content", "resource", "half-a-complex"])
def test_what_tensorflow_cannot_parse_is_a_parse_error(proto: tensor_pb2.TensorProto) -> None:
    with pytest.raises(protocodec.ParseError):
        protocodec.to_array(proto)


F32 = np.dtype(np.float32)


def test_decode_inputs_errors_are_tf_servings() -> None:
    x = tf.make_tensor_proto(np.ones((1, 2), np.float32))
    with pytest.raises(InvalidArgument, match=r"^input size does not match signature: 2!=1"):
        protocodec.decode_inputs({"x": x, "y": x}, {"x": F32})
    with pytest.raises(InvalidArgument, match=r"^input tensor alias not found in signature: y\. "
                                              r"Inputs expected to be in the set \{x\}\.$"):
        protocodec.decode_inputs({"y": x}, {"x": F32})
    with pytest.raises(InvalidArgument, match=r"^tensor parsing error: x$"):
        protocodec.decode_inputs({"x": _proto(types_pb2.DT_FLOAT, (3,), tensor_content=b"1")}, {"x": F32})
    with pytest.raises(InvalidArgument, match=r"^Expected input x to be float but get int64\.$"):
        protocodec.decode_inputs({"x": tf.make_tensor_proto(np.ones(2, np.int64))}, {"x": F32})
    out = protocodec.decode_inputs({"x": x}, {"x": F32})
    np.testing.assert_array_equal(out["x"], np.ones((1, 2), np.float32))


def test_output_filter_errors_are_tf_servings() -> None:
    outputs = {"y": {}, "z": {}}
    protocodec.check_output_filter(["z", "y"], outputs)
    with pytest.raises(InvalidArgument, match=r"^output tensor alias not found in signature: w Outputs "
                                              r"expected to be in the set \{y,z\}\.$"):
        protocodec.check_output_filter(["w"], outputs)
    with pytest.raises(InvalidArgument, match=r"^duplicate output tensor alias: y$"):
        protocodec.check_output_filter(["y", "y"], outputs)


def test_proto_predict_selects_the_filtered_outputs() -> None:
    out = {"y": np.ones(1), "z": np.zeros(1)}
    assert list(ProtoPredict({}, ["z"]).select(out)) == ["z"]
    assert ProtoPredict({}).select(out) is out
