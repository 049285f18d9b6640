"""The prediction cache against real memcached servers and real gunicorn instances."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter

import numpy as np
import pytest
import requests

from conftest import metric_total
from tfwsgi import cache, codec

pytestmark = pytest.mark.e2e

PREDICT = "/v1/models/hp/versions/1:predict"


def env_for(model_config, *servers, **extra: str) -> dict[str, str]:
    env = {"TFWSGI_MODEL_CONFIG_FILE": str(model_config)}
    if servers:
        env["TFWSGI_MEMCACHED"] = ",".join(s.address for s in servers)
    env.update(extra)
    return env


def status(resp: requests.Response) -> str:
    assert resp.status_code == 200, resp.text
    return resp.headers["Cache-Status"]


def model_runs(srv, **labels: str) -> float:
    return metric_total(srv.get("/metrics").text, "tfwsgi_model_runs_total", **labels)


def hp_key(values: list[float], version: int = 1, prefix: str = "tfwsgi:") -> tuple[str, bytes]:
    inputs, _ = codec.decode_predict({"instances": values}, {"x": np.dtype(np.float32)})
    dig = cache.digest("hp", version, "serving_default", "predict", inputs)
    return prefix + dig.hex(), dig


@pytest.fixture
def shared(memcached, start_server, model_config):
    mc = memcached()
    srv = start_server(env_for(model_config, mc))
    srv.wait_ready()
    return mc, srv


def test_a_prediction_from_one_worker_is_a_hit_in_the_other(shared):
    mc, srv = shared
    a, b = sorted(srv.worker_pids())
    body = {"instances": [11.0]}
    os.kill(a, signal.SIGSTOP)  # only b can accept
    try:
        assert status(srv.post(PREDICT, json=body)) == "tfwsgi; fwd=miss; stored"
    finally:
        os.kill(a, signal.SIGCONT)
    os.kill(b, signal.SIGSTOP)  # only a can accept
    try:
        r = srv.post(PREDICT, json=body)
        assert status(r) == "tfwsgi; hit" and r.json() == {"predictions": [7.5]}
    finally:
        os.kill(b, signal.SIGCONT)
    assert int(mc.stats()["get_hits"]) >= 1


def test_a_second_instance_shares_the_cache(shared, start_server, model_config):
    mc, srv = shared
    assert status(srv.post(PREDICT, json={"instances": [21.0]})).startswith("tfwsgi; fwd=miss")
    other = start_server(env_for(model_config, mc))
    other.wait_ready()
    r = other.post(PREDICT, json={"instances": [21.0]})
    assert status(r) == "tfwsgi; hit" and r.json() == {"predictions": [12.5]}
    assert model_runs(other) == 0


def test_row_and_columnar_share_an_entry(shared):
    _, srv = shared
    assert "stored" in status(srv.post(PREDICT, json={"instances": [1.0, 2.0]}))
    r = srv.post(PREDICT, json={"inputs": {"x": [1.0, 2.0]}})
    assert status(r) == "tfwsgi; hit" and r.json() == {"outputs": [2.5, 3.0]}


def test_versions_labels_and_signatures_have_their_own_entries(shared):
    _, srv = shared
    body = {"instances": [31.0]}
    assert "stored" in status(srv.post(PREDICT, json=body))
    r = srv.post("/v1/models/hp/versions/2:predict", json=body)
    assert "fwd=miss" in status(r) and r.json() == {"predictions": [18.5]}
    r = srv.post("/v1/models/hp/labels/stable:predict", json=body)  # stable is version 1
    assert status(r) == "tfwsgi; hit" and r.json() == {"predictions": [17.5]}
    r = srv.post("/v1/models/hp:predict", json=body)  # latest is version 2
    assert status(r) == "tfwsgi; hit" and r.json() == {"predictions": [18.5]}
    body["signature_name"] = "tensorflow/serving/predict"
    assert "fwd=miss" in status(srv.post(PREDICT, json=body))


def test_cache_control(shared):
    _, srv = shared
    body = {"instances": [41.0]}
    srv.post(PREDICT, json=body)
    before = model_runs(srv, model_name="hp")
    assert status(srv.post(PREDICT, json=body, headers={"Cache-Control": "no-cache"})) == (
        "tfwsgi; fwd=request; stored")
    assert status(srv.post(PREDICT, json=body, headers={"Cache-Control": "no-store"})) == "tfwsgi; fwd=bypass"
    assert model_runs(srv, model_name="hp") == before + 2
    assert status(srv.post(PREDICT, json=body)) == "tfwsgi; hit"
    fresh = {"instances": [42.0]}
    r = srv.post(PREDICT, json=fresh, headers={"Cache-Control": "no-store"})
    assert status(r) == "tfwsgi; fwd=bypass"
    assert "fwd=miss" in status(srv.post(PREDICT, json=fresh))  # no-store wrote nothing


def test_classify_and_regress_are_cached(shared):
    _, srv = shared
    body = {"signature_name": "classify_with_classes", "examples": [{"x": 0.0}]}
    first = srv.post("/v1/models/multi:classify", json=body)
    second = srv.post("/v1/models/multi:classify", json=body)
    assert "stored" in status(first) and status(second) == "tfwsgi; hit"
    assert first.json() == second.json() == {"results": [[["neg", 0.5], ["pos", 0.5]]]}
    body = {"signature_name": "tensorflow/serving/regress", "examples": [{"x": 1.0}]}
    srv.post("/v1/models/hp/versions/1:regress", json=body)
    r = srv.post("/v1/models/hp/versions/1:regress", json=body)
    assert status(r) == "tfwsgi; hit" and r.json() == {"results": [2.5]}


@pytest.mark.parametrize("kind", ["garbage", "other-key", "wrong-format"])
def test_planted_values_are_detected_and_recomputed(shared, kind):
    mc, srv = shared
    values = [51.0 + len(kind)]
    key, dig = hp_key(values)
    _, other_dig = hp_key([0.0])
    planted = {
        "garbage": b"\x00not a tfwsgi value",
        # a well-formed value, but stored for another key: it must not answer this one
        "other-key": cache.encode_value(other_dig, {"y": np.array([666.0], np.float32)}),
        "wrong-format": b"TFWC\x02" + dig + b"\x00\x00\x00\x00",
    }[kind]
    mc.set(key, planted)
    r = srv.post(PREDICT, json={"instances": values})
    assert r.json() == {"predictions": [0.5 * values[0] + 2.0]}
    assert status(r) == "tfwsgi; fwd=miss; stored; detail=corrupt-value"
    repaired = mc.get(key)
    assert repaired is not None
    assert cache.decode_value(repaired, dig)["y"].tolist() == [0.5 * values[0] + 2.0]
    assert status(srv.post(PREDICT, json={"instances": values})) == "tfwsgi; hit"
    assert metric_total(srv.get("/metrics").text, "tfwsgi_cache_lookups_total", result="corrupt") >= 1


def test_too_large_predictions_are_served_not_cached(memcached, start_server, model_config):
    mc = memcached()
    srv = start_server(env_for(model_config, mc, TFWSGI_MEMCACHED_MAX_ITEM_BYTES="2000"), workers=1)
    srv.wait_ready()
    big = {"instances": [float(i) for i in range(1000)]}
    r = srv.post(PREDICT, json=big)
    assert r.status_code == 200 and len(r.json()["predictions"]) == 1000
    assert status(r) == "tfwsgi; fwd=miss; detail=too-large"
    assert "fwd=miss" in status(srv.post(PREDICT, json=big))
    assert metric_total(srv.get("/metrics").text, "tfwsgi_cache_stores_total", result="too_large") == 2


def test_two_servers_split_the_keys_and_losing_one_keeps_serving(memcached, start_server, model_config):
    mc1, mc2 = memcached(), memcached()
    srv = start_server(env_for(model_config, mc1, mc2))
    srv.wait_ready()
    bodies = [{"instances": [float(i)]} for i in range(40)]
    for b in bodies:
        assert "stored" in status(srv.post(PREDICT, json=b))
    items = [int(mc1.stats()["curr_items"]), int(mc2.stats()["curr_items"])]
    assert sum(items) == 40 and min(items) >= 5, items
    mc2.stop()
    hits = 0
    for i, b in enumerate(bodies):
        r = srv.post(PREDICT, json=b)
        assert r.status_code == 200 and r.json() == {"predictions": [0.5 * i + 2.0]}
        hits += status(r) == "tfwsgi; hit"
    assert hits >= items[0] - 2, (hits, items)  # what the live server held is still served from it
    # Once pymemcache sets the dead server aside, its keys are stored on the live one.
    deadline = time.monotonic() + 15
    while int(mc1.stats()["curr_items"]) < 40 and time.monotonic() < deadline:
        for i, b in enumerate(bodies):
            r = srv.post(PREDICT, json=b)
            assert r.status_code == 200 and r.json() == {"predictions": [0.5 * i + 2.0]}
        time.sleep(0.3)
    assert int(mc1.stats()["curr_items"]) == 40


def test_memcached_killed_under_load_then_restarted(memcached, start_server, model_config):
    mc = memcached()
    srv = start_server(env_for(model_config, mc, TFWSGI_MEMCACHED_DEAD_TIMEOUT_SECONDS="2"))
    srv.wait_ready()
    stop = threading.Event()
    results: list[tuple[int, float, str]] = []

    def client(n: int) -> None:
        i = 0
        with requests.Session() as s:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    r = s.post(srv.url + PREDICT, json={"instances": [float(n * 1000 + i % 50)]}, timeout=10)
                    cs = r.headers.get("Cache-Status", "")
                    results.append((r.status_code, time.monotonic() - started, cs))
                except requests.RequestException as exc:
                    results.append((0, time.monotonic() - started, str(exc)))
                i += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    time.sleep(2)
    port = mc.port
    mc.stop()
    time.sleep(3)
    down = len(results)
    mc2 = memcached(port)  # back on the same port, empty
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if any("hit" in cs for _, _, cs in results[down:]) and int(mc2.stats()["curr_items"]) > 0:
            break
        time.sleep(0.2)
    stop.set()
    for t in threads:
        t.join(30)
    codes = Counter(code for code, _, _ in results)
    assert set(codes) == {200}, codes
    slowest = max(d for _, d, _ in results)
    # The model takes ~1 ms; memcached connect and read timeouts are 100 ms each (0.5 s: CI slack).
    print("slowest request during the outage:", round(slowest, 3))
    assert slowest < 0.5, sorted(((round(d, 3), cs) for _, d, cs in results), reverse=True)[:8]
    assert any("cache-error" in cs for _, _, cs in results), "the outage was never seen"
    assert any("hit" in cs for _, _, cs in results[down:]), "hits did not resume after the restart"


def test_single_flight_in_one_threaded_worker(memcached, start_server, model_config):
    mc = memcached()
    srv = start_server(env_for(model_config, mc), workers=1, extra_args=("-k", "gthread", "--threads", "8"))
    srv.wait_ready()
    body = {"signature_name": "slow", "instances": [1.0]}
    barrier = threading.Barrier(8)
    out: list[requests.Response] = []

    def call() -> None:
        barrier.wait()
        out.append(requests.post(srv.url + "/v1/models/multi:predict", json=body, timeout=60))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r.json() for r in out] == [{"predictions": [2.0]}] * 8
    assert model_runs(srv, signature_name="slow") == 1


def test_stampede_across_instances_runs_the_model_once(memcached, start_server, model_config):
    mc = memcached()
    servers = [start_server(env_for(model_config, mc)) for _ in range(2)]
    for s in servers:
        s.wait_ready()
    body = {"signature_name": "slow", "instances": [5.0]}
    barrier = threading.Barrier(8)
    out: list[requests.Response] = []

    def call(i: int) -> None:
        barrier.wait()
        out.append(servers[i % 2].post("/v1/models/multi:predict", json=body))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r.json() for r in out] == [{"predictions": [6.0]}] * 8
    runs = sum(model_runs(s, signature_name="slow") for s in servers)
    assert runs == 1, runs


def test_local_lru_by_default(start_server, model_config):
    srv = start_server(env_for(model_config), workers=1)
    srv.wait_ready()
    assert "stored" in status(srv.post(PREDICT, json={"instances": [61.0]}))
    assert status(srv.post(PREDICT, json={"instances": [61.0]})) == "tfwsgi; hit"


def test_with_a_signing_key_a_forged_value_is_not_served(memcached, start_server, model_config, tmp_path):
    """Anyone who can write to memcached can plant a well-formed value under the right digest;
    without the key (from a file here) it is refused, counted as corrupt, recomputed and replaced."""
    from pymemcache.client.base import Client

    mc = memcached()
    key_file = tmp_path / "cache.key"
    key_file.write_text("a-secret-only-the-servers-know\n")
    srv = start_server(env_for(model_config, mc, TFWSGI_CACHE_HMAC_KEY_FILE=str(key_file)), workers=1)
    srv.wait_ready()
    values = [71.0]
    key, dig = hp_key(values)
    forged = cache.encode_value(dig, {"y": np.array([666.0], np.float32)})
    raw = Client(("127.0.0.1", mc.port), connect_timeout=5, timeout=5)
    try:
        assert raw.set(key, forged, noreply=False)
        r = srv.post(PREDICT, json={"instances": values})
        assert r.json() == {"predictions": [37.5]}, "the planted value was served"
        assert status(r) == "tfwsgi; fwd=miss; stored; detail=corrupt-value"
        repaired = raw.get(key)
    finally:
        raw.close()
    assert cache.decode_value(repaired, dig, b"a-secret-only-the-servers-know")["y"].tolist() == [37.5]
    r = srv.post(PREDICT, json={"instances": values})
    assert status(r) == "tfwsgi; hit" and r.json() == {"predictions": [37.5]}
    assert metric_total(srv.get("/metrics").text, "tfwsgi_cache_lookups_total", result="corrupt") == 1


def test_two_different_signing_keys_stop_the_start(start_server, model_config, tmp_path):
    key_file = tmp_path / "cache.key"
    key_file.write_text("one\n")
    srv = start_server(env_for(model_config, TFWSGI_CACHE_HMAC_KEY_FILE=str(key_file),
                               TFWSGI_CACHE_HMAC_KEY="two"), workers=1)
    deadline = time.monotonic() + 60
    while srv.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert srv.proc.returncode not in (None, 0)
    assert "TFWSGI_CACHE_HMAC_KEY and TFWSGI_CACHE_HMAC_KEY_FILE are both set and differ" in srv.log()
