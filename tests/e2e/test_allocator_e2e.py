"""jemalloc under the real ``gunicorn -c gunicorn_conf.py tfwsgi:app`` (TFWSGI_MEMORY_ALLOCATOR)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.e2e


def hp_env(model_root: Path, **extra: str) -> dict[str, str]:
    return {"TFWSGI_MODEL_NAME": "hp", "TFWSGI_MODEL_BASE_PATH": str(model_root / "hp"), **extra}


def maps_have_jemalloc(pid: int) -> bool:
    return "libjemalloc" in Path(f"/proc/{pid}/maps").read_text()


def test_master_and_workers_run_on_jemalloc_by_default(start_server, model_root):
    srv = start_server(hp_env(model_root), workers=2)
    srv.wait_ready()
    assert maps_have_jemalloc(srv.pid)  # the same process, started again with the preload
    workers = srv.worker_pids()
    assert len(workers) == 2 and all(maps_have_jemalloc(p) for p in workers)
    assert re.findall(r"malloc=(\w+)", srv.log()) == ["jemalloc", "jemalloc"]
    assert srv.log().count("Starting gunicorn") == 1  # started again before gunicorn started
    assert re.findall(r"\[(\d+)\] \[INFO\] Starting gunicorn", srv.log()) == [str(srv.pid)]
    r = requests.post(srv.url + "/v1/models/hp:predict", json={"instances": [1.0]}, timeout=30)
    assert r.json() == {"predictions": [4.5]}


def test_system_malloc_when_asked(start_server, model_root):
    srv = start_server(hp_env(model_root, TFWSGI_MEMORY_ALLOCATOR="system"), workers=1)
    srv.wait_ready()
    assert not maps_have_jemalloc(srv.pid)
    assert not any(maps_have_jemalloc(p) for p in srv.worker_pids())
    assert re.findall(r"malloc=(\w+)", srv.log()) == ["system"]


def test_env_file_chooses_the_allocator(start_server, model_root, tmp_path):
    env_file = tmp_path / "tfwsgi.env"
    env_file.write_text("TFWSGI_MEMORY_ALLOCATOR=system\n")
    srv = start_server(hp_env(model_root, TFWSGI_ENV_FILE=str(env_file)), workers=1)
    srv.wait_ready()
    assert re.findall(r"malloc=(\w+)", srv.log()) == ["system"]


def test_bad_allocator_setting_stops_the_start(start_server, model_root):
    srv = start_server(hp_env(model_root, TFWSGI_MEMORY_ALLOCATOR="tcmalloc"), workers=1)
    assert srv.proc.wait(timeout=60) != 0
    assert "TFWSGI_MEMORY_ALLOCATOR='tcmalloc': must be jemalloc or system" in srv.log()
