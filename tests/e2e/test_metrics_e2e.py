"""Metrics over real gunicorn workers: totals equal the requests sent, across worker restarts
(``--max-requests``) without piling up files; JSON lines logs."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import metric_total

pytestmark = pytest.mark.e2e


def test_totals_survive_worker_churn_and_files_stay_bounded(start_server, model_root: Path,
                                                             tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    srv = start_server({"TFWSGI_MODEL_NAME": "hp", "TFWSGI_MODEL_BASE_PATH": str(model_root / "hp"),
                        "TFWSGI_PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
                       workers=2, extra_args=("--max-requests", "20", "--max-requests-jitter", "0"))
    srv.wait_ready()
    sent, scrapes, failures = 0, [], []
    lock = threading.Lock()

    def client(k: int) -> None:
        nonlocal sent
        with requests.Session() as s:
            for i in range(100):
                r = s.post(srv.url + "/v1/models/hp:predict", data=json.dumps({"instances": [k * 1000 + i]}),
                           timeout=30)
                with lock:
                    sent += 1
                    if r.status_code != 200:
                        failures.append(r.text)

    def scraper(stop: threading.Event) -> None:
        while not stop.is_set():
            r = requests.get(srv.url + "/monitoring/prometheus/metrics", timeout=30)
            assert r.status_code == 200
            scrapes.append(metric_total(r.text, ":tensorflow:serving:request_count", model_name="hp"))
            time.sleep(0.05)

    stop = threading.Event()
    watcher = threading.Thread(target=scraper, args=(stop,))
    watcher.start()
    clients = [threading.Thread(target=client, args=(k,)) for k in range(3)]
    for t in clients:
        t.start()
    for t in clients:
        t.join(timeout=300)
    stop.set()
    watcher.join(timeout=60)
    assert sent == 300 and failures == []
    # Scrapes during the load only went up (a restart never loses or double-counts).
    assert scrapes == sorted(scrapes) and len(scrapes) >= 5
    deadline = time.monotonic() + 10  # each worker writes its counts out within a second
    while True:
        text = srv.get("/metrics").text
        total = metric_total(text, ":tensorflow:serving:request_count", model_name="hp", status="OK")
        if total == 300 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert total == 300
    assert metric_total(text, ":tensorflow:serving:request_latency_count", model_name="hp") == 300
    assert metric_total(text, "tfwsgi_cache_lookups_total", model_name="hp") == 300
    # (300 predicts + scrapes) / 20 per worker life: many restarts, each counted once. A retiring
    # worker still answers what its kept-alive connections send while it stops (Connection:
    # close), so a life may hold a few more than 20 requests: at least 10 exits, not 15.
    exits = metric_total(text, "tfwsgi_worker_exits_total")
    started = len(set(srv.ready_pids()))  # a scrape itself may just have retired a worker: ±1
    assert exits >= 10 and abs(exits - (started - 2)) <= 1
    # Live workers holding the version: both, once a worker a scrape just retired is replaced.
    deadline = time.monotonic() + 20
    while metric_total(text, "tfwsgi_model_version_state", model_name="hp", state="AVAILABLE") != 2:
        assert time.monotonic() < deadline, text
        time.sleep(0.3)
        text = srv.get("/metrics").text
    assert metric_total(text, "tfwsgi_model_load_seconds_count", model_name="hp", result="ok") >= exits
    # Files: the live workers', the master's, one archive per kind; not one set per dead worker.
    files = [n for n in os.listdir(metrics_dir) if n.endswith(".db")]
    assert len(files) <= 14, sorted(files)
    assert {"counter_archive.db", "histogram_archive.db"} <= set(files)


def test_json_logs(start_server, model_root: Path) -> None:
    srv = start_server({"TFWSGI_MODEL_NAME": "hp", "TFWSGI_MODEL_BASE_PATH": str(model_root / "hp"),
                        "TFWSGI_LOG_FORMAT": "json"},
                       workers=1, extra_args=("--access-logfile", "-"))
    srv.wait_ready()
    r = srv.post("/v1/models/hp:predict", data='{"instances": [1.0]}', headers={"X-Request-Id": "abc"})
    assert r.status_code == 200
    assert srv.post("/v1/models/nope:predict", data='{"instances": [1.0]}').status_code == 404
    deadline = time.monotonic() + 10
    while srv.log().count('"logger": "gunicorn.access"') < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = [line for line in srv.log().splitlines() if line.startswith("{")]
    docs = [json.loads(line) for line in lines]
    assert len(lines) == len([ln for ln in srv.log().splitlines() if ln.strip()
                              and not ln.startswith(("WARNING", "I0000", "E0000", "W0000"))])
    # An access line is written after its answer is sent, so two request threads may write the
    # lines of two back-to-back requests in either order.
    access = sorted((d for d in docs if d["logger"] == "gunicorn.access"), key=lambda d: d["path"])
    assert [(d["method"], d["path"], d["status"]) for d in access] == [
        ("POST", "/v1/models/hp:predict", 200), ("POST", "/v1/models/nope:predict", 404)]
    assert access[0]["request_id"] == "abc" and access[0]["duration_us"] > 0
    assert access[0]["cache_status"].startswith("tfwsgi")
    errors = [d for d in docs if d["logger"] in ("gunicorn.error", "tfwsgi")]
    assert any("ready in" in d["message"] for d in errors)  # tfwsgi's own lines too
    assert all({"time", "level", "pid", "message"} <= set(d) for d in docs)
