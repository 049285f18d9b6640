"""tfwsgi.cache.prediction: policies, fail-open, single flight and signed values, over an LRU."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from conftest import metric_total
from tfwsgi import cache, metrics
from tfwsgi.cache import Policy
from tfwsgi.cachecontrol import cache_status
from tfwsgi.errors import ConfigError, InvalidArgument
from tfwsgi.settings import from_env

F32 = np.dtype(np.float32)


def test_parse_model_ttls():
    assert cache.parse_model_ttls("a=60, b=off,c=0") == {"a": 60, "b": None, "c": 0}
    for bad in ("a", "a=soon", "=5"):
        with pytest.raises(ConfigError):
            cache.parse_model_ttls(bad)


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
    assert cache_status(o1) == "tfwsgi; fwd=miss; stored" and cache_status(o2) == "tfwsgi; hit"
    assert len(compute.calls) == 1 and out2["y"].tolist() == out["y"].tolist() == [2.0]


def test_no_cache_recomputes_and_refreshes_no_store_bypasses():
    c = make()
    c.get_or_compute("m", 1, "s", "predict", X, counter([1.0]))
    out, o = c.get_or_compute("m", 1, "s", "predict", X, counter([5.0]), Policy.REFRESH)
    assert cache_status(o) == "tfwsgi; fwd=request; stored" and out["y"].tolist() == [5.0]
    out, o = c.get_or_compute("m", 1, "s", "predict", X, counter([9.0]), Policy.BYPASS)
    assert cache_status(o) == "tfwsgi; fwd=bypass" and out["y"].tolist() == [9.0]
    out, o = c.get_or_compute("m", 1, "s", "predict", X, counter([0.0]))
    assert o.hit and out["y"].tolist() == [5.0]  # the refreshed value, untouched by no-store


def test_disabled_globally_and_per_model():
    c = make({"TFWSGI_CACHE_MODEL_TTL": "noisy=off"})
    for _ in range(2):
        _, o = c.get_or_compute("noisy", 1, "s", "predict", X, counter([1.0]))
        assert cache_status(o) == "tfwsgi; fwd=bypass"
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


def lookups(model: str, result: str) -> float:
    return metric_total(metrics.render()[0].decode(), "tfwsgi_cache_lookups_total",
                        model_name=model, result=result)


def test_every_policy_counts_one_lookup_no_cache_as_refresh():
    """Regression: a no-cache request counted no lookup, though the metric promises "refresh"."""
    c = make()
    c.get_or_compute("counted", 1, "s", "predict", X, counter([1.0]))
    assert lookups("counted", "miss") == 1
    c.get_or_compute("counted", 1, "s", "predict", X, counter([1.0]), Policy.REFRESH)
    assert lookups("counted", "refresh") == 1
    c.get_or_compute("counted", 1, "s", "predict", X, counter([1.0]), Policy.BYPASS)
    c.get_or_compute("counted", 1, "s", "predict", X, counter([1.0]))
    assert [lookups("counted", r) for r in ("miss", "refresh", "bypass", "hit")] == [1, 1, 1, 1]


def plant_forgery(lru: cache.LocalLRU) -> str:
    """What anyone who can write to memcached can do: a well-formed value, for the right key
    digest, saying what they like."""
    dig = cache.digest("m", 1, "s", "predict", X)
    key = "tfwsgi:" + dig.hex()
    lru.set(key, cache.encode_value(dig, {"y": np.array([666.0], F32)}), 0)
    return key


def test_with_a_signing_key_a_forged_value_is_refused_and_recomputed():
    lru = cache.LocalLRU(1 << 20)
    c = make({"TFWSGI_CACHE_HMAC_KEY": "s3cret"}, backend=lru)
    key = plant_forgery(lru)
    corrupt = lookups("m", "corrupt")
    out, o = c.get_or_compute("m", 1, "s", "predict", X, counter([3.0]))
    assert out["y"].tolist() == [3.0], "the forged value was served"
    assert cache_status(o) == "tfwsgi; fwd=miss; stored; detail=corrupt-value"
    assert lookups("m", "corrupt") == corrupt + 1
    dig = bytes.fromhex(key[len("tfwsgi:"):])
    assert cache.decode_value(lru.get(key), dig, b"s3cret")["y"].tolist() == [3.0]  # overwritten, signed
    out, o = c.get_or_compute("m", 1, "s", "predict", X, counter([0.0]))
    assert o.hit and out["y"].tolist() == [3.0]


def test_without_a_key_a_well_formed_value_is_trusted():
    """The default, unchanged: whoever can write to the cache decides the answer (hence the key)."""
    lru = cache.LocalLRU(1 << 20)
    c = make(backend=lru)
    plant_forgery(lru)
    out, o = c.get_or_compute("m", 1, "s", "predict", X, counter([3.0]))
    assert o.hit and out["y"].tolist() == [666.0]


def test_backend_errors_fail_open():
    c = make(backend=FailingBackend())
    out, o = c.get_or_compute("m", 1, "s", "predict", X, counter([4.0]))
    assert out["y"].tolist() == [4.0] and cache_status(o) == "tfwsgi; fwd=miss; detail=cache-error"


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
