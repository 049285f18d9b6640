"""Property tests of the codecs: any tensor written as TF Serving's JSON reads back as itself."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tfwsgi import cache, codec
from tfwsgi.errors import InvalidArgument

# Fast and reproducible: a few hundred examples per property, the same ones on every run.
FAST = settings(max_examples=200, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])

NUMERIC = [np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64,
           np.uint8, np.uint16, np.uint32, np.uint64, np.bool_]
# Shapes JSON can carry: every dimension but the last at least 1 (an empty outer list has no
# inner shape, in TF Serving's JSON too).
SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=1, max_side=4)


@st.composite
def numeric_tensors(draw: st.DrawFn, shape: tuple[int, ...] | None = None) -> np.ndarray:
    dtype = np.dtype(draw(st.sampled_from(NUMERIC)))
    shape = draw(SHAPES) if shape is None else shape
    if dtype.kind == "f":  # every float, NaN and ±Infinity included
        elements = st.floats(width=8 * dtype.itemsize, allow_nan=True, allow_infinity=True)
        return draw(hnp.arrays(dtype, shape, elements=elements))
    return draw(hnp.arrays(dtype, shape))


@st.composite
def string_tensors(draw: st.DrawFn, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """Object arrays of bytes: UTF-8 text, arbitrary binary, or empty."""
    shape = draw(SHAPES) if shape is None else shape
    item = st.one_of(st.binary(max_size=12), st.text(max_size=8).map(lambda t: t.encode("utf-8")))
    flat = draw(st.lists(item, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(shape)


tensors = st.one_of(numeric_tensors(), string_tensors())


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal dtype, shape and values (NaN equal to NaN, bytes by value)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.kind == "f":
        return bool(np.array_equal(a, b, equal_nan=True))
    return bool(np.array_equal(a, b))


def through_json(body: bytes, dtypes: dict[str, np.dtype]) -> dict[str, np.ndarray]:
    """An answer body read back as a request (its outputs renamed to inputs)."""
    doc = codec.parse_json(body)
    doc = {"inputs": doc["outputs"]} if "outputs" in doc else {"instances": doc["predictions"]}
    return codec.decode_predict(doc, dtypes)[0]


def output_name(arr: np.ndarray, as_bytes: bool) -> str:
    return "x_bytes" if as_bytes and arr.dtype.kind == "O" else "x"


@FAST
@given(tensors, st.booleans())
def test_columnar_round_trip(arr: np.ndarray, as_bytes: bool) -> None:
    """encode (outputs) → JSON → decode (inputs) gives the same tensor, for every dtype and shape,
    NaN and ±Infinity, and any bytes (as text where they are UTF-8, else as {"b64": …})."""
    name = output_name(arr, as_bytes)
    body = codec.encode_predict({name: arr}, codec.COLUMNAR)
    back = through_json(body, {name: arr.dtype})[name]
    assert same(back, arr), (arr, body, back)


@FAST
@given(st.one_of(numeric_tensors(), string_tensors()).filter(lambda a: a.ndim >= 1), st.booleans())
def test_row_round_trip(arr: np.ndarray, as_bytes: bool) -> None:
    name = output_name(arr, as_bytes)
    body = codec.encode_predict({name: arr}, codec.ROW)
    assert same(through_json(body, {name: arr.dtype})[name], arr), body


@FAST
@given(st.data())
def test_row_and_columnar_requests_give_the_same_tensors(data: st.DataObject) -> None:
    """One batch of several inputs sent as instances (objects per row) and as inputs (an object of
    tensors) decodes to the same tensors, and so to the same cache key."""
    batch = data.draw(st.integers(1, 4))
    names = data.draw(st.lists(st.sampled_from("abcd"), min_size=1, max_size=4, unique=True))
    tensors: dict[str, np.ndarray] = {}
    for n in names:
        inner = data.draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=3))
        kind = numeric_tensors if data.draw(st.booleans()) else string_tensors
        tensors[n] = data.draw(kind(shape=(batch, *inner)))
    dtypes = {n: t.dtype for n, t in tensors.items()}
    columnar = codec.parse_json(codec.encode_predict(tensors, codec.COLUMNAR))["outputs"]
    rows = codec.parse_json(codec.encode_predict(tensors, codec.ROW))["predictions"]
    if len(names) == 1:
        columnar = {names[0]: columnar}
        rows = [{names[0]: r} for r in rows]
    from_inputs, fmt_c = codec.decode_predict({"inputs": columnar}, dtypes)
    from_instances, fmt_r = codec.decode_predict({"instances": rows}, dtypes)
    assert (fmt_c, fmt_r) == (codec.COLUMNAR, codec.ROW)
    for n in names:
        assert same(from_inputs[n], tensors[n]) and same(from_instances[n], tensors[n]), n
    key = cache.digest("m", 1, "serving_default", "predict", from_inputs)
    assert key == cache.digest("m", 1, "serving_default", "predict", from_instances)


@FAST
@given(st.binary(max_size=64), st.booleans(), st.booleans())
def test_b64_decodes_standard_and_urlsafe_with_or_without_padding(raw: bytes, urlsafe: bool,
                                                                  pad: bool) -> None:
    import base64

    text = (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(raw).decode()
    text = text if pad else text.rstrip("=")
    assert codec.decode_b64({"b64": text}) == raw


@FAST
@given(st.text(max_size=16))
def test_b64_garbage_is_a_400_never_a_crash(text: str) -> None:
    try:
        codec.decode_b64({"b64": text})
    except InvalidArgument as exc:
        assert exc.status == 400


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=4), inner, max_size=4), max_leaves=20)


@FAST
@given(JSON, st.sampled_from([*NUMERIC, object]))
def test_any_json_value_decodes_or_is_invalid_argument(value: object, dtype: type) -> None:
    """to_tensor never raises anything but InvalidArgument (a 400), whatever the JSON."""
    try:
        out = codec.to_tensor(value, np.dtype(dtype))
    except InvalidArgument:
        return
    assert out.dtype == np.dtype(dtype)


@FAST
@given(JSON)
def test_any_request_document_decodes_or_is_invalid_argument(doc: object) -> None:
    body = {"instances": doc} if not isinstance(doc, dict) else doc
    try:
        codec.decode_predict(body, {"a": np.dtype(np.float32), "b": np.dtype(object)})
        codec.decode_examples(body)
    except InvalidArgument:
        pass


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_nonfinite_floats_written_as_tf_serving_writes_them(dtype: type) -> None:
    arr = np.array([np.nan, np.inf, -np.inf, 1.0], dtype=dtype)
    assert codec.encode_predict({"x": arr}, codec.COLUMNAR) == b'{"outputs":[NaN,Infinity,-Infinity,1.0]}'
