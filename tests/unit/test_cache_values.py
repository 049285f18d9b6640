"""tfwsgi.cache.values: the value format and its checks."""

from __future__ import annotations

import numpy as np
import pytest

from tfwsgi.cache import keys, values

F32 = np.dtype(np.float32)
K = keys.digest("m", 1, "serving_default", "predict", {"x": np.zeros(1, F32)})


def test_value_round_trip():
    outputs = {"y": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(7, np.int64),
               "s": np.array([b"a", b"\x00\xff"], dtype=object), "b": np.array([True, False])}
    back = values.decode_value(values.encode_value(K, outputs), K)
    assert set(back) == set(outputs)
    for name, arr in outputs.items():
        assert back[name].dtype == arr.dtype and back[name].shape == arr.shape
        assert back[name].tolist() == arr.tolist()


MANGLERS = [
    lambda v: b"",
    lambda v: b"garbage that is not a value at all, but long enough to have a header" * 2,
    lambda v: b"XXXX" + v[4:],                    # magic
    lambda v: v[:4] + b"\x09" + v[5:],            # format
    lambda v: v[:5] + bytes(32) + v[37:],         # digest of another key
    lambda v: v[:-1],                             # truncated
    lambda v: v + b"\x00",                        # trailing bytes
]


@pytest.mark.parametrize("mangle", MANGLERS)
def test_damaged_values_are_rejected(mangle):
    good = values.encode_value(K, {"y": np.array([1.0, 2.0], F32)})
    with pytest.raises(values.CorruptValue):
        values.decode_value(mangle(good), K)


def test_value_of_another_key_is_rejected():
    other = keys.digest("m", 1, "serving_default", "predict", {"x": np.ones(1, F32)})
    with pytest.raises(values.CorruptValue, match="digest"):
        values.decode_value(values.encode_value(other, {"y": np.zeros(1, F32)}), K)
