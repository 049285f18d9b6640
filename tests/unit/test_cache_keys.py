"""tfwsgi.cache.keys: the digest that names a prediction, and the key prefix."""

from __future__ import annotations

import numpy as np
import pytest

from tfwsgi import codec
from tfwsgi.cache import keys
from tfwsgi.errors import ConfigError

F32 = np.dtype(np.float32)


def d(inputs, model="m", version=1, signature="serving_default", method="predict"):
    return keys.digest(model, version, signature, method, inputs)


def test_row_and_columnar_requests_share_a_key():
    row, _ = codec.decode_predict({"instances": [{"a": [1, 2], "b": 3}]}, {"a": F32, "b": np.dtype(np.int32)})
    col, _ = codec.decode_predict({"inputs": {"b": [3], "a": [[1.0, 2.0]]}},
                                  {"a": F32, "b": np.dtype(np.int32)})
    assert d(row) == d(col)


@pytest.mark.parametrize("change", [
    {"model": "other"}, {"version": 2}, {"signature": "s2"}, {"method": "classify"},
])
def test_key_covers_model_version_signature_method(change):
    x = {"x": np.array([1.0], F32)}
    assert d(x) != d(x, **change)


@pytest.mark.parametrize("other", [
    {"x": np.array([1.0], np.float64)},          # dtype
    {"x": np.array([[1.0]], F32)},               # shape
    {"y": np.array([1.0], F32)},                 # name
    {"x": np.array([1.0000001], F32)},           # bytes
    {"x": np.array([1.0], F32), "z": np.array([0.0], F32)},  # another input
])
def test_key_covers_name_dtype_shape_bytes(other):
    assert d({"x": np.array([1.0], F32)}) != d(other)


def test_key_is_unambiguous_for_strings():
    a = np.array([b"ab", b"c"], dtype=object)
    b = np.array([b"a", b"bc"], dtype=object)
    assert d({"s": a}) != d({"s": b})


def test_key_fits_memcached():
    key = "tfwsgi:" + d({"x": np.zeros(3, F32)}).hex()
    assert len(key) < 250 and " " not in key
    assert keys.validate_prefix("tfwsgi:") == "tfwsgi:"
    with pytest.raises(ConfigError):
        keys.validate_prefix("has space")
    with pytest.raises(ConfigError):
        keys.validate_prefix("x" * 200)
