"""Unit tests of the prediction cache's pure parts: keys, values, policy, LRU, fail-open logic."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from tfwsgi import cache, codec
from tfwsgi.errors import ConfigError, InvalidArgument
from tfwsgi.settings import from_env

F32 = np.dtype(np.float32)


def d(inputs, model="m", version=1, signature="serving_default", method="predict"):
    return cache.digest(model, version, signature, method, inputs)


# ------------------------------------------------------------------ keys

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
    with pytest.raises(ConfigError):
        cache.validate_prefix("has space")
    with pytest.raises(ConfigError):
        cache.validate_prefix("x" * 200)


# ------------------------------------------------------------------ values

def test_value_round_trip():
    k = d({"x": np.zeros(1, F32)})
    outputs = {"y": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(7, np.int64),
               "s": np.array([b"a", b"\x00\xff"], dtype=object), "b": np.array([True, False])}
    back = cache.decode_value(cache.encode_value(k, outputs), k)
    assert set(back) == set(outputs)
    for name, arr in outputs.items():
        assert back[name].dtype == arr.dtype and back[name].shape == arr.shape
        assert back[name].tolist() == arr.tolist()


@pytest.mark.parametrize("mangle", [
    lambda v: b"",
    lambda v: b"garbage that is not a value at all, but long enough to have a header" * 2,
    lambda v: b"XXXX" + v[4:],                    # magic
    lambda v: v[:4] + b"\x09" + v[5:],            # format
    lambda v: v[:5] + bytes(32) + v[37:],         # digest of another key
    lambda v: v[:-1],                             # truncated
    lambda v: v + b"\x00",                        # trailing bytes
])
def test_damaged_values_are_rejected(mangle):
    k = d({"x": np.zeros(1, F32)})
    good = cache.encode_value(k, {"y": np.array([1.0, 2.0], F32)})
    with pytest.raises(cache.CorruptValue):
        cache.decode_value(mangle(good), k)


def test_value_of_another_key_is_rejected():
    k1, k2 = d({"x": np.zeros(1, F32)}), d({"x": np.ones(1, F32)})
    with pytest.raises(cache.CorruptValue, match="digest"):
        cache.decode_value(cache.encode_value(k2, {"y": np.zeros(1, F32)}), k1)


# ------------------------------------------------------------------ policy and settings

@pytest.mark.parametrize(("header", "policy"), [
    (None, cache.NORMAL), ("", cache.NORMAL), ("max-age=60", cache.NORMAL),
    ("no-cache", cache.NO_CACHE), ("No-Cache, max-age=5", cache.NO_CACHE), ("max-age=0", cache.NO_CACHE),
    ("no-store", cache.NO_STORE), ("no-cache, no-store", cache.NO_STORE),
])
def test_request_policy(header, policy):
    assert cache.request_policy(header) == policy


def test_parse_model_ttls_and_servers():
    assert cache.parse_model_ttls("a=60, b=off,c=0") == {"a": 60, "b": None, "c": 0}
    for bad in ("a", "a=soon", "=5"):
        with pytest.raises(ConfigError):
            cache.parse_model_ttls(bad)
    assert cache.parse_servers("127.0.0.1:11211, mc2:11212,[::1]:11213") == [
        ("127.0.0.1", 11211), ("mc2", 11212), ("::1", 11213)]
    for bad in ("", "host", "host:port", "h:70000"):
        with pytest.raises(ConfigError):
            cache.parse_servers(bad)


def test_outcome_headers():
    assert cache.Outcome(hit=True).header() == "tfwsgi; hit"
    assert cache.Outcome(fwd="miss", stored=True).header() == "tfwsgi; fwd=miss; stored"
    assert cache.Outcome(fwd="miss", detail="cache-error").header() == "tfwsgi; fwd=miss; detail=cache-error"


# ------------------------------------------------------------------ LRU

def test_lru_is_bounded_in_bytes_and_evicts_least_recent():
    lru = cache.LocalLRU(max_bytes=300)
    for i in range(3):
        lru.set(f"k{i}", b"x" * 90, 0)
    lru.get("k0")  # k0 is now the most recent
    lru.set("k3", b"x" * 90, 0)
    assert lru.get("k1") is None and lru.get("k0") is not None and lru.get("k3") is not None
    assert lru._bytes <= 300
    lru.set("huge", b"x" * 1000, 0)
    assert lru.get("huge") is None


def test_lru_expiry_and_add():
    lru = cache.LocalLRU(1000)
    lru.set("k", b"v", 1)
    assert lru.get("k") == b"v"
    assert not lru.add("k", b"w", 1)
    lru._items["k"] = (b"v", time.monotonic() - 1)
    assert lru.get("k") is None
    assert lru.add("k", b"w", 0) and lru.get("k") == b"w"


# ------------------------------------------------------------------ PredictionCache over fakes

class FailingBackend:
    shared = True

    def get(self, key):
        raise cache.BackendError("connection refused")

    set = add = delete = get


def make(env=None, backend=None):
    return cache.PredictionCache(from_env(env or {}), backend=backend or cache.LocalLRU(1 << 20))


X = {"x": np.array([1.0], F32)}


def counter(result):
    calls = []

    def compute():
        calls.append(1)
        return {"y": np.array(result, F32)}

    compute.calls = calls  # type: ignore[attr-defined]
    return compute


def test_miss_then_hit():
    c, compute = make(), counter([2.0])
    out, o1 = c.get_or_compute("m", 1, "s", "predict", X, compute)
    out2, o2 = c.get_or_compute("m", 1, "s", "predict", X, compute)
    assert o1.header() == "tfwsgi; fwd=miss; stored" and o2.header() == "tfwsgi; hit"
    assert len(compute.calls) == 1 and out2["y"].tolist() == out["y"].tolist() == [2.0]


def test_no_cache_recomputes_and_refreshes_no_store_bypasses():
    c = make()
    c.get_or_compute("m", 1, "s", "predict", X, counter([1.0]))
    out, o = c.get_or_compute("m", 1, "s", "predict", X, counter([5.0]), cache.NO_CACHE)
    assert o.header() == "tfwsgi; fwd=request; stored" and out["y"].tolist() == [5.0]
    out, o = c.get_or_compute("m", 1, "s", "predict", X, counter([9.0]), cache.NO_STORE)
    assert o.header() == "tfwsgi; fwd=bypass" and out["y"].tolist() == [9.0]
    out, o = c.get_or_compute("m", 1, "s", "predict", X, counter([0.0]))
    assert o.hit and out["y"].tolist() == [5.0]  # the refreshed value, untouched by no-store


def test_disabled_globally_and_per_model():
    c = make({"TFWSGI_CACHE_MODEL_TTL": "noisy=off"})
    for _ in range(2):
        _, o = c.get_or_compute("noisy", 1, "s", "predict", X, counter([1.0]))
        assert o.header() == "tfwsgi; fwd=bypass"
    c = make({"TFWSGI_CACHE_ENABLED": "false"})
    _, o = c.get_or_compute("m", 1, "s", "predict", X, counter([1.0]))
    assert o.fwd == "bypass"


def test_per_model_ttl_override_reaches_the_backend():
    seen = {}

    class Recording(cache.LocalLRU):
        def set(self, key, value, ttl):
            seen[key] = ttl
            super().set(key, value, ttl)

    c = make({"TFWSGI_CACHE_TTL_SECONDS": "100", "TFWSGI_CACHE_MODEL_TTL": "short=5"}, Recording(1 << 20))
    c.get_or_compute("short", 1, "s", "predict", X, counter([1.0]))
    c.get_or_compute("long", 1, "s", "predict", X, counter([1.0]))
    assert sorted(seen.values()) == [5, 100]


def test_too_large_is_served_not_stored():
    c = make({"TFWSGI_MEMCACHED_MAX_ITEM_BYTES": "200"})
    out, o = c.get_or_compute("m", 1, "s", "predict", X, counter([1.0] * 100))
    assert len(out["y"]) == 100 and not o.stored and o.detail == "too-large"
    _, o = c.get_or_compute("m", 1, "s", "predict", X, counter([1.0] * 100))
    assert not o.hit


def test_corrupt_value_is_a_miss_and_is_overwritten():
    lru = cache.LocalLRU(1 << 20)
    c = make(backend=lru)
    key = "tfwsgi:" + cache.digest("m", 1, "s", "predict", X).hex()
    lru.set(key, b"planted garbage", 0)
    out, o = c.get_or_compute("m", 1, "s", "predict", X, counter([3.0]))
    assert out["y"].tolist() == [3.0] and o.detail == "corrupt-value" and o.stored
    assert cache.decode_value(lru.get(key), bytes.fromhex(key[len("tfwsgi:"):]))["y"].tolist() == [3.0]


def test_backend_errors_fail_open():
    c = make(backend=FailingBackend())
    out, o = c.get_or_compute("m", 1, "s", "predict", X, counter([4.0]))
    assert out["y"].tolist() == [4.0] and o.header() == "tfwsgi; fwd=miss; detail=cache-error"


def test_compute_errors_propagate_and_are_not_cached():
    c = make()

    def bad():
        raise InvalidArgument("nope")

    with pytest.raises(InvalidArgument):
        c.get_or_compute("m", 1, "s", "predict", X, bad)
    _, o = c.get_or_compute("m", 1, "s", "predict", X, counter([1.0]))
    assert not o.hit


def start_blocked(n: int, target, gate: threading.Event) -> None:
    """Start ``n`` threads running ``target`` while the computation waits on ``gate``; let it go
    once they are all in, and wait for them."""
    threads = [threading.Thread(target=target) for _ in range(n)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    gate.set()
    for t in threads:
        t.join(10)


def test_single_flight_computes_once_for_concurrent_identical_misses():
    c = make()
    calls = []
    gate = threading.Event()

    def slow():
        calls.append(1)
        gate.wait(5)
        return {"y": np.array([1.0], F32)}

    results = []
    start_blocked(8, lambda: results.append(c.get_or_compute("m", 1, "s", "predict", X, slow)), gate)
    assert len(calls) == 1 and len(results) == 8
    assert sum(o.collapsed for _, o in results) == 7


def test_single_flight_fans_an_error_out_to_every_waiter():
    c = make()
    gate = threading.Event()

    def failing():
        gate.wait(5)
        raise InvalidArgument("bad batch")

    errors = []

    def call() -> None:
        try:
            c.get_or_compute("m", 1, "s", "predict", X, failing)
        except InvalidArgument as exc:
            errors.append(exc.message)

    start_blocked(4, call, gate)
    assert errors == ["bad batch"] * 4
