"""Fixtures: test models built once per session, and real gunicorn servers on free loopback ports."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything under tests/e2e/ is an end-to-end test (``-m "not e2e"`` leaves it out),
    whether or not its file says so."""
    for item in items:
        if "e2e" in item.path.parts:
            item.add_marker(pytest.mark.e2e)


ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
GUNICORN = str(VENV_BIN / "gunicorn")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen, failure: str, timeout: float = 10.0) -> None:
    """Wait until ``proc`` accepts connections on loopback ``port``; RuntimeError(``failure``) if it
    exits or does not within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(failure) from None
            time.sleep(0.05)


class Server:
    """A real ``gunicorn -c gunicorn_conf.py tfwsgi:app`` in its own process group."""

    def __init__(self, env: dict[str, str], workers: int = 2, log_path: Path | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        self.log_path = log_path or Path(os.environ.get("TMPDIR", "/tmp")) / f"tfwsgi-{self.port}.log"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("TFWSGI_")}
        full_env.update(env)
        full_env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        # gRPC (TFWSGI_PORT, default 8500) off unless a test asks for it on a free port: two
        # servers on 8500 would share it (SO_REUSEPORT) and answer each other's calls.
        full_env.setdefault("TFWSGI_PORT", "0")
        with open(self.log_path, "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [GUNICORN, "-c", "gunicorn_conf.py", "-w", str(workers), "-b", f"127.0.0.1:{self.port}",
                 *extra_args, "tfwsgi:app"],
                cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> set[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.pid)],
                             capture_output=True, text=True).stdout
        return {int(p) for p in out.split()}

    def ready_pids(self) -> list[int]:
        return [int(p) for p in re.findall(r"tfwsgi: worker (\d+) ready", self.log())]

    def rotate(self, timeout: float = 60.0) -> None:
        """SIGHUP the master and wait until every worker is a new one that has loaded its models."""
        before = self.worker_pids()
        os.kill(self.pid, signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while True:
            pids = self.worker_pids()
            if pids and not pids & before and len(set(self.ready_pids()) & pids) == self.workers:
                return
            assert time.monotonic() < deadline, self.log()[-3000:]
            time.sleep(0.2)

    def wait_ready(self, timeout: float = 120.0, count: int | None = None) -> None:
        """Wait until ``count`` workers (default: all) have loaded their models."""
        want = self.workers if count is None else count
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            if len(set(self.ready_pids()) & self.worker_pids()) >= want:
                return
            time.sleep(0.2)
        raise TimeoutError(f"gunicorn not ready in {timeout}s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass

    def get(self, path: str, **kw: object) -> requests.Response:
        return requests.get(self.url + path, timeout=30, **kw)  # type: ignore[arg-type]

    def post(self, path: str, data: object = None, **kw: object) -> requests.Response:
        return requests.post(self.url + path, data=data, timeout=30, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def model_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All test models, built once: see tests/models.py."""
    root = tmp_path_factory.mktemp("models")
    subprocess.run([sys.executable, str(ROOT / "tests" / "models.py"), str(root)], check=True,
                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return root


@pytest.fixture(scope="session")
def model_config(model_root: Path) -> Path:
    return model_root / "models.config"


@pytest.fixture(scope="session")
def server(model_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One 2-worker server over every test model, shared by the read-only tests."""
    log = tmp_path_factory.mktemp("logs") / "shared-server.log"
    srv = Server({"TFWSGI_MODEL_CONFIG_FILE": str(model_config),
                  "TFWSGI_MAX_REQUEST_BYTES": str(4 * 1024 * 1024)}, log_path=log)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[object]:
    """Start servers of one's own (for tests that kill or reconfigure them)."""
    started: list[Server] = []

    def start(env: dict[str, str], workers: int = 2, extra_args: tuple[str, ...] = ()) -> Server:
        srv = Server(env, workers=workers, log_path=tmp_path / f"gunicorn-{len(started)}.log",
                     extra_args=extra_args)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


class MemcachedServer:
    """A real memcached on a free loopback port, stopped by its own PID."""

    def __init__(self, port: int | None = None, memory_mb: int = 64) -> None:
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        user = ["-u", "root"] if os.geteuid() == 0 else []
        self.proc = subprocess.Popen(
            ["memcached", "-l", "127.0.0.1", "-p", str(self.port), "-U", "0", "-m", str(memory_mb),
             *user], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, self.proc, "memcached did not start")

    def command(self, line: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(line)
            data = b""
            while not data.endswith((b"END\r\n", b"STORED\r\n", b"DELETED\r\n", b"NOT_FOUND\r\n",
                                     b"ERROR\r\n")):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data

    def stats(self) -> dict[str, str]:
        lines = self.command(b"stats\r\n").decode().splitlines()
        return {p[1]: p[2] for p in (line.split() for line in lines) if len(p) == 3 and p[0] == "STAT"}

    def set(self, key: str, value: bytes) -> None:
        assert self.command(b"set %s 0 0 %d\r\n%s\r\n" % (key.encode(), len(value), value)) == b"STORED\r\n"

    def get(self, key: str) -> bytes | None:
        data = self.command(b"get %s\r\n" % key.encode())
        if not data.startswith(b"VALUE"):
            return None
        header, rest = data.split(b"\r\n", 1)
        return rest[: int(header.split()[3])]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def memcached() -> Iterator[object]:
    """Start memcached servers of one's own; all are stopped afterwards."""
    started: list[MemcachedServer] = []

    def start(port: int | None = None) -> MemcachedServer:
        mc = MemcachedServer(port)
        started.append(mc)
        return mc

    yield start
    for mc in started:
        mc.stop()


def metric_total(text: str, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include ``labels``, from exposition text."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            total += float(value)
    return total


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Any:
    """The real Flask app over the fakes of tests/unit/fakes.py, one per test module (the
    in-process REST files; a module may define its own)."""
    from fakes import make_app

    return make_app(tmp_path_factory.mktemp(request.module.__name__))


@pytest.fixture
def client(app: Any) -> Any:
    return app.test_client()
