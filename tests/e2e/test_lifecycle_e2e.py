"""Fork safety and worker lifecycle against the real gunicorn: TF only in workers, loads once, respawn."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import requests

from conftest import ROOT

pytestmark = pytest.mark.e2e


def mapped_files(pid: int) -> set[str]:
    with open(f"/proc/{pid}/maps") as f:
        return {line.split()[-1] for line in f if len(line.split()) >= 6}


def test_import_tfwsgi_and_config_stay_tensorflow_free():
    code = ("import sys, tfwsgi, gunicorn_conf, tfwsgi.hooks, tfwsgi.application, tfwsgi.api; "
            "sys.exit('tensorflow' in sys.modules)")
    env = {**os.environ, "TFWSGI_MODEL_BASE_PATH": "/nonexistent"}
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env).returncode == 0


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_master_imports_but_never_runs_tensorflow(server):
    # Imported before fork (shared pages) ...
    assert [p for p in mapped_files(server.pid) if "libtensorflow" in p]
    assert "TensorFlow imported in the master" in server.log()
    assert "(not initialised)" in server.log()
    # ... but never run: a TF runtime starts its inter/intra-op thread pools, which the master
    # never has, while every worker (which ran its models) does.
    assert threads(server.pid) <= 2, threads(server.pid)
    for pid in server.worker_pids():
        assert threads(pid) > threads(server.pid)


def test_without_preload_the_master_never_maps_tensorflow(start_server, model_root):
    srv = start_server({"TFWSGI_MODEL_NAME": "hp", "TFWSGI_MODEL_BASE_PATH": str(model_root / "hp"),
                        "TFWSGI_PRELOAD_TENSORFLOW": "false"}, workers=1)
    srv.wait_ready()
    assert not [p for p in mapped_files(srv.pid) if "tensorflow" in p], "the master mapped TensorFlow"
    for pid in srv.worker_pids():
        assert [p for p in mapped_files(pid) if "libtensorflow" in p], f"worker {pid} has no TF"
    assert srv.post("/v1/models/hp:predict", json={"instances": [1.0]}).json() == {"predictions": [4.5]}


def test_each_worker_loads_each_version_exactly_once(server):
    loads = Counter(re.findall(r"tfwsgi: pid (\d+) loaded model (\S+) version (\d+)", server.log()))
    expected = {("hp", "1"), ("hp", "2"), ("keras", "1"), ("multi", "7"), ("flaky", "1")}
    workers = {str(p) for p in server.worker_pids()}
    assert len(workers) == 2
    for pid in workers:
        mine = {(m, v): n for (p, m, v), n in loads.items() if p == pid}
        assert mine == dict.fromkeys(expected, 1), mine
    # The master loaded nothing at all.
    assert not [k for k in loads if k[0] == str(server.pid)]


def test_worker_killed_under_load_is_respawned_and_server_keeps_answering(start_server, model_root):
    srv = start_server({"TFWSGI_MODEL_NAME": "hp", "TFWSGI_MODEL_BASE_PATH": str(model_root / "hp")})
    srv.wait_ready()
    url = srv.url + "/v1/models/hp:predict"
    stop = threading.Event()
    results: list[tuple[float, int]] = []  # (time, 200 | -status for a wrong answer | 0 no answer)

    def client() -> None:
        with requests.Session() as s:
            while not stop.is_set():
                try:
                    r = s.post(url, json={"instances": [1.0]}, timeout=10)
                    right = r.status_code == 200 and r.json() == {"predictions": [4.5]}  # hp v3
                    results.append((time.monotonic(), 200 if right else -r.status_code))
                except requests.RequestException:
                    results.append((time.monotonic(), 0))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    victim = sorted(srv.worker_pids())[0]
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pids = srv.worker_pids()
        if victim not in pids and len(set(srv.ready_pids()) & pids) == 2:
            break
        time.sleep(0.2)
    respawned_at = time.monotonic()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join(timeout=30)

    assert victim not in srv.worker_pids() and len(srv.worker_pids()) == 2
    before = [s for t, s in results if t < killed_at]
    after = [s for t, s in results if t > respawned_at]
    assert before and all(s == 200 for s in before)
    assert len(after) > 10 and all(s == 200 for s in after), Counter(after)
    # Only requests that were inside the killed worker can fail: at most one per client.
    failures = [s for t, s in results if s != 200]
    assert len(failures) <= len(threads), Counter(failures)


def test_bad_config_stops_startup_with_a_clear_message(start_server, tmp_path: Path):
    cfg = tmp_path / "bad.config"
    cfg.write_text("model_config_list { config { name: 'x' base_path: '/tmp' model_platform: 'onnx' } }")
    srv = start_server({"TFWSGI_MODEL_CONFIG_FILE": str(cfg)})
    assert srv.proc.wait(timeout=60) != 0
    assert "model_platform 'onnx' is not supported" in srv.log()
