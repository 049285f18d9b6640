"""deploy/: three tfwsgi instances behind a real nginx (deploy/nginx-tfwsgi.conf, its addresses
templated) sharing a real memcached (deploy/memcached.conf): spread, failover, shared cache."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from conftest import ROOT, Server, free_port, metric_total, wait_for_port
from tfwsgi.settings import from_env

pytestmark = pytest.mark.e2e

DEPLOY = ROOT / "deploy"
SERVER_LINE = re.compile(r"^(\s*)server 10\.0\.0\.\d+:8501 (.*);$", re.M)


def render_nginx(upstreams: list[str], port: int, logs: Path) -> str:
    """deploy/nginx-tfwsgi.conf with its three example VMs replaced by ``upstreams``, listening on
    127.0.0.1:port and logging under ``logs``; nothing else changes."""
    text = (DEPLOY / "nginx-tfwsgi.conf").read_text()
    lines = SERVER_LINE.findall(text)
    assert len(lines) == 3
    indent, params = lines[0]
    block = "\n".join(f"{indent}server {u} {params};" for u in upstreams)
    text = SERVER_LINE.sub("", text, count=2)
    text = SERVER_LINE.sub(block, text, count=1)
    text, n = re.subn(r"listen 8501;", f"listen 127.0.0.1:{port};", text)
    assert n == 1
    return text.replace("/var/log/nginx/", f"{logs}/")


class Nginx:
    """A real nginx in the foreground, its own prefix and config in ``root``."""

    def __init__(self, root: Path, site: str) -> None:
        self.root = root
        self.port = int(re.search(r"listen 127\.0\.0\.1:(\d+);", site).group(1))  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{self.port}"
        for d in ("logs", "tmp"):
            (root / d).mkdir(exist_ok=True)
        (root / "tfwsgi.conf").write_text(site)
        user = "user root;" if os.geteuid() == 0 else ""
        temp = " ".join(f"{k}_temp_path {root}/tmp/{k};" for k in ("client_body", "proxy", "fastcgi",
                                                                     "uwsgi", "scgi"))
        (root / "nginx.conf").write_text(
            f"{user}\nworker_processes 1;\npid {root}/nginx.pid;\nerror_log {root}/logs/error.log info;\n"
            f"events {{ worker_connections 1024; }}\n"
            f"http {{ access_log off; {temp} include {root}/tfwsgi.conf; }}\n")
        args = ["nginx", "-e", f"{root}/logs/error.log", "-p", str(root), "-c", str(root / "nginx.conf")]
        check = subprocess.run([*args, "-t"], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
        self.proc = subprocess.Popen([*args, "-g", "daemon off;"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_for_port(self.port, self.proc, "nginx did not start")
        except RuntimeError:
            raise AssertionError(self.error_log()) from None

    def error_log(self) -> str:
        return (self.root / "logs" / "error.log").read_text(errors="replace")

    def access_log(self) -> list[dict[str, object]]:
        path = self.root / "logs" / "tfwsgi.access.log"
        return [json.loads(line) for line in path.read_text().splitlines()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGQUIT)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def memcached_args(port: int) -> list[str]:
    """deploy/memcached.conf's options, listening on 127.0.0.1:port (and as root when we are)."""
    args = []
    for line in (DEPLOY / "memcached.conf").read_text().splitlines():
        line = line.strip()
        if line.startswith("-"):
            args.extend(line.split(None, 1))
    opts = dict(zip(args[::2], args[1::2], strict=True))
    opts.update({"-p": str(port), "-l": "127.0.0.1", "-m": "64"})
    if os.geteuid() == 0:
        opts["-u"] = "root"
    else:
        opts.pop("-u")
    return [part for item in opts.items() for part in item]


@pytest.fixture(scope="module")
def farm(model_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """memcached, three one-worker tfwsgi instances sharing it, and nginx in front."""
    root = tmp_path_factory.mktemp("farm")
    mc_port = free_port()
    mc = subprocess.Popen(["memcached", *memcached_args(mc_port)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    servers: list[Server] = []
    nginx = None
    try:
        env = {"TFWSGI_MODEL_NAME": "hp", "TFWSGI_MODEL_BASE_PATH": str(model_root / "hp"),
               "TFWSGI_MEMCACHED": f"127.0.0.1:{mc_port}"}
        servers = [Server(env, workers=1, log_path=root / f"tfwsgi-{i}.log") for i in range(3)]
        for srv in servers:
            srv.wait_ready()
        site = render_nginx([f"127.0.0.1:{s.port}" for s in servers], free_port(), root / "nginx" / "logs")
        (root / "nginx").mkdir()
        nginx = Nginx(root / "nginx", site)
        yield {"servers": servers, "nginx": nginx, "memcached": mc}
    finally:
        if nginx is not None:
            nginx.stop()
        for srv in servers:
            srv.stop()
        mc.kill()
        mc.wait(timeout=10)


def _predict(session: requests.Session, url: str, x: float) -> requests.Response:
    return session.post(url + "/v1/models/hp:predict", data=json.dumps({"instances": [x]}), timeout=30)


def _load(url: str, threads: int, per_thread: int, start: float,
          during: threading.Event | None = None) -> tuple[int, list[str]]:
    """Bounded load: ``threads`` clients × ``per_thread`` distinct predicts; (ok count, failures)."""
    failures: list[str] = []
    ok = [0]
    lock = threading.Lock()

    def client(k: int) -> None:
        with requests.Session() as s:
            for i in range(per_thread):
                x = start + k * per_thread + i
                try:
                    r = _predict(s, url, x)
                    good = r.status_code == 200 and json.loads(r.content) == {"predictions": [0.5 * x + 4]}
                    msg = "" if good else f"{r.status_code} {r.text[:200]}"
                except requests.RequestException as exc:
                    msg = repr(exc)
                with lock:
                    if msg:
                        failures.append(msg)
                    else:
                        ok[0] += 1
                if during is not None and i == per_thread // 3:
                    during.set()

    pool = [threading.Thread(target=client, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=300)
    return ok[0], failures


def test_load_spreads_over_every_instance(farm: dict[str, object]) -> None:
    nginx: Nginx = farm["nginx"]  # type: ignore[assignment]
    servers: list[Server] = farm["servers"]  # type: ignore[assignment]
    before = [metric_total(s.get("/metrics").text, ":tensorflow:serving:request_count") for s in servers]
    ok, failures = _load(nginx.url, threads=6, per_thread=30, start=1000.0)
    assert (ok, failures) == (180, [])
    # nginx writes a request's log line after its answer went out: wait for the last ones.
    deadline = time.monotonic() + 10
    while True:
        upstreams = Counter(str(e["upstream_addr"]) for e in nginx.access_log()
                            if str(e["uri"]).endswith(":predict"))
        if sum(upstreams.values()) >= 180 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert set(upstreams) == {f"127.0.0.1:{s.port}" for s in servers}, upstreams
    assert min(upstreams.values()) >= 20, upstreams
    # Each instance's own metrics agree with what nginx sent it, and they add up to what was sent.
    after = [metric_total(s.get("/metrics").text, ":tensorflow:serving:request_count") for s in servers]
    counted = [a - b for a, b in zip(after, before, strict=True)]
    assert counted == [upstreams[f"127.0.0.1:{s.port}"] for s in servers]
    assert sum(counted) == 180


def test_cache_hits_are_shared_across_instances(farm: dict[str, object]) -> None:
    servers: list[Server] = farm["servers"]  # type: ignore[assignment]
    body = json.dumps({"instances": [424242.0]})
    first = servers[0].post("/v1/models/hp:predict", data=body)
    assert first.headers["Cache-Status"] == "tfwsgi; fwd=miss; stored"
    for srv in servers[1:]:
        r = srv.post("/v1/models/hp:predict", data=body)
        assert r.headers["Cache-Status"] == "tfwsgi; hit" and r.content == first.content
    for srv in servers[1:]:  # no instance but the first ran the model for it
        text = srv.get("/metrics").text
        assert metric_total(text, "tfwsgi_cache_lookups_total", result="hit") >= 1


def test_body_limit_matches_tfwsgi(farm: dict[str, object]) -> None:
    nginx: Nginx = farm["nginx"]  # type: ignore[assignment]
    limit = from_env({}).max_request_bytes
    conf = (DEPLOY / "nginx-tfwsgi.conf").read_text()
    size = re.search(r"client_max_body_size (\d+)m;", conf)
    assert size and int(size.group(1)) * 1024 * 1024 == limit
    with socket.create_connection(("127.0.0.1", nginx.port), timeout=10) as s:
        head = b"POST /v1/models/hp:predict HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
        s.sendall(head % (limit + 1))
        head, _, body = s.recv(65536).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413") and b"application/json" in head
    assert json.loads(body) == {"error": f"Request body is larger than the limit of {limit} bytes"}
    assert requests.get(nginx.url + "/v2/health/ready", timeout=10).status_code == 200


def test_sigkill_of_an_instance_under_load_fails_no_request(farm: dict[str, object]) -> None:
    """Runs last in this module: it leaves one instance dead."""
    nginx: Nginx = farm["nginx"]  # type: ignore[assignment]
    servers: list[Server] = farm["servers"]  # type: ignore[assignment]
    victim = servers[1]
    started = threading.Event()
    killed = threading.Event()

    def kill() -> None:
        started.wait(timeout=60)
        os.killpg(victim.pid, signal.SIGKILL)  # master and worker at once, like a lost VM
        killed.set()

    killer = threading.Thread(target=kill)
    killer.start()
    ok, failures = _load(nginx.url, threads=6, per_thread=60, start=50_000.0, during=started)
    killer.join(timeout=60)
    assert killed.is_set() and victim.proc.wait(timeout=10) == -signal.SIGKILL
    assert failures == [] and ok == 360
    # The kill did hit traffic: nginx saw the instance fail and sent those requests elsewhere.
    victim_addr = f"127.0.0.1:{victim.port}"
    assert victim_addr in nginx.error_log()
    entries = [e for e in nginx.access_log() if str(e["uri"]).endswith(":predict")]
    assert any(victim_addr in str(e["upstream_addr"]) and "," in str(e["upstream_addr"]) for e in entries)
