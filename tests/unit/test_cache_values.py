"""tfwsgi.cache.values: the value format, its checks, signing, and where the signing key comes from."""

from __future__ import annotations

import numpy as np
import pytest

from tfwsgi.cache import keys, values
from tfwsgi.errors import ConfigError
from tfwsgi.settings import from_env

F32 = np.dtype(np.float32)
K = keys.digest("m", 1, "serving_default", "predict", {"x": np.zeros(1, F32)})
SECRET = b"0123456789abcdef0123456789abcdef"


def test_value_round_trip():
    outputs = {"y": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(7, np.int64),
               "s": np.array([b"a", b"\x00\xff"], dtype=object), "b": np.array([True, False])}
    for key in (None, SECRET):
        back = values.decode_value(values.encode_value(K, outputs, key), K, key)
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
@pytest.mark.parametrize("key", [None, SECRET], ids=["unsigned", "signed"])
def test_damaged_values_are_rejected(mangle, key):
    good = values.encode_value(K, {"y": np.array([1.0, 2.0], F32)}, key)
    with pytest.raises(values.CorruptValue):
        values.decode_value(mangle(good), K, key)


def test_value_of_another_key_is_rejected():
    other = keys.digest("m", 1, "serving_default", "predict", {"x": np.ones(1, F32)})
    for key in (None, SECRET):
        with pytest.raises(values.CorruptValue, match=r"digest|signature"):
            values.decode_value(values.encode_value(other, {"y": np.zeros(1, F32)}, key), K, key)


def _tampered(value: bytes) -> bytes:
    flipped = bytearray(value)
    flipped[-40] ^= 1  # one bit of the tensor data, under a MAC that was valid
    return bytes(flipped)


PLANTED = {"y": np.array([666.0], F32)}
FORGERIES = {
    "unsigned": values.encode_value(K, PLANTED),
    "another key": values.encode_value(K, PLANTED, b"not the secret"),
    "tampered": _tampered(values.encode_value(K, PLANTED, SECRET)),
}


@pytest.mark.parametrize("forged", FORGERIES.values(), ids=FORGERIES.keys())
def test_with_a_key_only_values_signed_with_it_are_accepted(forged):
    with pytest.raises(values.CorruptValue, match="signature"):
        values.decode_value(forged, K, SECRET)


def test_without_a_key_signed_values_are_not_taken_for_unsigned_ones():
    with pytest.raises(values.CorruptValue, match="not a tfwsgi value"):
        values.decode_value(values.encode_value(K, PLANTED, SECRET), K)


# ------------------------------------------------------------------ the signing key

def key_of(env):
    return values.signing_key(from_env(env))


def test_signing_key_from_the_environment_or_a_file(tmp_path):
    assert key_of({}) is None
    assert key_of({"TFWSGI_CACHE_HMAC_KEY": "s3cret"}) == b"s3cret"
    path = tmp_path / "key"
    path.write_bytes(b"from-a-file\n")
    assert key_of({"TFWSGI_CACHE_HMAC_KEY_FILE": str(path)}) == b"from-a-file"
    assert key_of({"TFWSGI_CACHE_HMAC_KEY_FILE": str(path), "TFWSGI_CACHE_HMAC_KEY": "from-a-file"}) == (
        b"from-a-file")


def test_signing_key_settings_that_cannot_start(tmp_path):
    path = tmp_path / "key"
    path.write_bytes(b"one\n")
    with pytest.raises(ConfigError, match="both set and differ"):
        key_of({"TFWSGI_CACHE_HMAC_KEY_FILE": str(path), "TFWSGI_CACHE_HMAC_KEY": "two"})
    with pytest.raises(ConfigError, match="cannot read"):
        key_of({"TFWSGI_CACHE_HMAC_KEY_FILE": str(tmp_path / "missing")})
    (tmp_path / "empty").write_bytes(b" \n")
    with pytest.raises(ConfigError, match="is empty"):
        key_of({"TFWSGI_CACHE_HMAC_KEY_FILE": str(tmp_path / "empty")})
