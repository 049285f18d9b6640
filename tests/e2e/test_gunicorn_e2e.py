"""gunicorn_conf.py's values, the flags that override them, and the TF threads a worker gets."""

from __future__ import annotations

import re

import pytest
import requests

pytestmark = pytest.mark.e2e


def hp_env(model_root, **extra: str) -> dict[str, str]:
    return {"TFWSGI_MODEL_NAME": "hp", "TFWSGI_MODEL_BASE_PATH": str(model_root / "hp"), **extra}


def test_worker_class_flag_overrides_config(start_server, model_root):
    srv = start_server(hp_env(model_root), workers=1, extra_args=("-k", "gthread", "--threads", "4"))
    srv.wait_ready()
    assert "Using worker: gthread" in srv.log()
    with requests.Session() as s:  # gthread keeps the connection alive
        for _ in range(3):
            r = s.post(srv.url + "/v1/models/hp:predict", json={"instances": [1.0]}, timeout=30)
            assert r.json() == {"predictions": [4.5]}  # latest of hp is version 3: 0.5x + 4


def test_loading_longer_than_timeout_does_not_kill_the_worker(start_server, model_config):
    # Importing TensorFlow in the worker (no preload) and loading five versions takes seconds;
    # the timeout is one second.
    srv = start_server({"TFWSGI_MODEL_CONFIG_FILE": str(model_config),
                        "TFWSGI_PRELOAD_TENSORFLOW": "false"}, workers=1, extra_args=("-t", "1"))
    srv.wait_ready()
    assert "WORKER TIMEOUT" not in srv.log()
    loaded = re.findall(r"worker \d+ ready in ([\d.]+)s", srv.log())
    assert loaded and float(loaded[0]) > 1.0, loaded
    assert requests.get(srv.url + "/v1/models/keras", timeout=30).ok


def test_tensorflow_thread_settings_reach_the_workers(start_server, model_root):
    srv = start_server(hp_env(model_root, TFWSGI_TENSORFLOW_INTRA_OP_PARALLELISM="3",
                              TFWSGI_TENSORFLOW_INTER_OP_PARALLELISM="2"), workers=1)
    srv.wait_ready()
    assert "intra_op=3 inter_op=2" in srv.log()


def test_default_threads_are_fitted_to_cores(server):
    import os

    expected = max(1, (os.cpu_count() or 1) // 2)
    assert re.findall(r"intra_op=(\d+) inter_op=(\d+)", server.log()) == [(str(expected), "1")] * 2


def test_cors_support(start_server, model_root):
    srv = start_server(hp_env(model_root, TFWSGI_REST_API_ENABLE_CORS_SUPPORT="true"), workers=1)
    srv.wait_ready()
    r = requests.options(srv.url + "/v1/models/hp:predict", timeout=30)
    assert r.status_code == 204
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    r = requests.post(srv.url + "/v1/models/hp:predict", json={"instances": [1.0]}, timeout=30)
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert r.headers["Access-Control-Allow-Methods"] == "POST, GET"


def test_no_cors_headers_by_default(server):
    r = server.post("/v1/models/hp:predict", json={"instances": [1.0]})
    assert "Access-Control-Allow-Origin" not in r.headers
    assert requests.options(server.url + "/v1/models/hp:predict", timeout=30).status_code == 400
