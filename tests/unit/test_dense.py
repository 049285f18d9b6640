"""The dense fast path (tfwsgi.dense) decodes exactly what the general path decodes, or declines."""

from __future__ import annotations

import json
import threading

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tfwsgi import codec, dense

FAST = settings(max_examples=300, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FLOATS = [np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)]
INNER = dense.MIN_INNER


def general(body: bytes, dtype: np.dtype) -> tuple[np.ndarray, str]:
    doc = codec.parse_json(body)
    inputs, fmt = codec.decode_predict(doc, {"x": dtype})
    return inputs["x"], fmt


def identical(a: np.ndarray, b: np.ndarray) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=True))
            and bool(np.array_equal(np.signbit(a), np.signbit(b))))


def check(body: bytes) -> dense.Dense | None:
    """Whatever the fast path takes, it decodes as the general path does, for every float dtype."""
    found = dense.parse(body)
    if found is None:
        return None
    for dtype in FLOATS:
        want, fmt = general(body, dtype)
        got = found.inputs({"x": dtype})
        assert got is not None and identical(got["x"], want), (body[:200], dtype)
        assert found.fmt == fmt
    return found


# Magnitudes below 2**53 (larger ones are declined: integers there are not exact as doubles).
numbers = st.one_of(
    st.floats(min_value=-1e15, max_value=1e15),
    st.floats(min_value=-1, max_value=1),  # subnormals, ±0.0
    st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1),
)


@st.composite
def arrays(draw: st.DrawFn) -> list:
    """Nested lists of numbers, rectangular, innermost at least MIN_INNER long."""
    lead = draw(hnp.array_shapes(min_dims=0, max_dims=3, min_side=1, max_side=3))
    shape = (*lead, draw(st.integers(INNER, INNER + 8)))
    flat = draw(st.lists(numbers, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    return np.array(flat, dtype=object).reshape(shape).tolist()


def write(doc: dict, spaced: bool) -> bytes:
    return json.dumps(doc, indent=1).encode() if spaced else orjson.dumps(doc)


@FAST
@given(arrays(), st.sampled_from(["instances", "inputs"]), st.booleans(), st.booleans())
def test_dense_arrays_take_the_fast_path_and_decode_as_the_general_path(
        value: list, key: str, named: bool, spaced: bool) -> None:
    doc = {key: value, **({"signature_name": "serving_default"} if named else {})}
    found = check(write(doc, spaced))
    assert found is not None, "a dense array of numbers must take the fast path"
    assert found.signature_name == ("serving_default" if named else "")


ODD = st.one_of(st.floats(), st.integers(-(2**63), 2**64 - 1), st.booleans(), st.none(),
                st.text(max_size=3), st.just([]), numbers.map(lambda n: [n]),
                st.dictionaries(st.text(max_size=3), numbers, max_size=2))


@FAST
@given(arrays(), st.data())
def test_damaged_arrays_decline_or_agree(value: list, data: st.DataObject) -> None:
    """One element replaced by something else, one list made longer or shorter: declined (None),
    unless still a dense array of numbers, and then decoded as the general path decodes it."""
    arr = np.array(value, dtype=object)
    rows = arr.reshape(-1, arr.shape[-1]).tolist()
    i = data.draw(st.integers(0, len(rows) - 1))
    how = data.draw(st.sampled_from(["replace", "drop", "add"]))
    odd = data.draw(ODD)
    number = isinstance(odd, (int, float)) and not isinstance(odd, bool)
    if how == "replace":
        rows[i][data.draw(st.integers(0, len(rows[i]) - 1))] = odd
    elif how == "drop":
        rows[i].pop()
    else:
        rows[i].append(data.draw(numbers))
    lead = arr.shape[:-1]
    nested: list = rows
    for n in reversed(lead[1:]):
        nested = [nested[j:j + n] for j in range(0, len(nested), n)]
    body = orjson.dumps({"instances": nested if lead else rows[0]})
    found = check(body)
    if (how == "replace" and not number) or (how != "replace" and len(rows) > 1):
        assert found is None  # (one row alone made longer or shorter is still dense)


@pytest.mark.parametrize("body", [
    b'{"instances": [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, [16]]]}',   # a list among numbers
    b'{"instances": [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [1]]}',  # ragged
    orjson.dumps({"instances": [list(range(16)), list(range(17)), list(range(15))]}),  # as many numbers
    b'{"instances": [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, true]]}',
    b'{"instances": [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, null]]}',
    b'{"instances": [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, "16"]]}',
    b'{"instances": [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, NaN]]}',
    b'{"instances": [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 1e400]]}',
    b'{"instances": [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 9007199254740993]]}',
    b'{"instances": [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, -9007199254740993]]}',
    b'{"instances": [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]], "instances": [[1]]}',
    b'{"instances": [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]], "signature_name": "a["}',
    b'{"instances": [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]], "signature_name": 1}',
    b'{"instances": [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]], "other": 1}',
    b'{"instances": [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]], "inputs": [[1]]}',
    b'{"instances": [{"x": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]}]}',
    b'{"inputs": {"x": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]}}',
    b'{"instances": [1, 2, 3]}',  # short rows: the general path is as fast
    b'{"instances": []}',
    b'[[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]',
    b'{"instances": [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]',  # truncated
    b'',
    b'{"instances": ' + b"[" * 100000 + b"]" * 100000 + b"}",  # simdjson: a RuntimeError
])
def test_what_the_fast_path_declines(body: bytes) -> None:
    assert dense.parse(body) is None


def test_only_one_floating_point_input_is_decoded_here() -> None:
    found = dense.parse(orjson.dumps({"instances": [list(range(INNER))]}))
    assert found is not None
    assert found.inputs({"x": np.dtype(np.int32)}) is None  # integers: no rounding through doubles
    assert found.inputs({"x": np.dtype(object)}) is None
    assert found.inputs({"x": np.dtype(np.float32), "y": np.dtype(np.float32)}) is None
    assert found.inputs({"x": np.dtype(np.float32)})["x"].dtype == np.float32
    assert dense.decodes({"x": np.dtype(np.float16)})
    assert not dense.decodes({"x": np.dtype(np.uint8)}) and not dense.decodes({})


def test_parsers_are_reused_and_bounded_however_many_threads_parse() -> None:
    body = orjson.dumps({"instances": [[0.5] * INNER] * 256})
    results: list[bool] = []

    def work() -> None:
        for _ in range(50):
            found = dense.parse(body)
            results.append(found is not None and found.array.shape == (256, INNER))

    threads = [threading.Thread(target=work) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 16 * 50 and all(results)
    assert dense._made <= dense._POOL_SIZE
    assert dense._pool.qsize() == dense._made  # every parser came back
