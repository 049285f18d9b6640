"""tfwsgi.worker.ThreadWorker (gunicorn_conf.py's default) against real gunicorn: keep-alive,
connections spread over the workers, idle timeout, capacity, graceful stop, a killed worker."""

from __future__ import annotations

import http.client
import os
import signal
import socket
import threading
import time
from collections import Counter

import pytest

pytestmark = pytest.mark.e2e

PREDICT = "/v1/models/hp:predict"
BODY = b'{"instances": [1.0, 2.0]}'


def hp_env(model_root, **extra: str) -> dict[str, str]:
    return {"TFWSGI_MODEL_NAME": "hp", "TFWSGI_MODEL_BASE_PATH": str(model_root / "hp"), **extra}


def connection_owners(srv) -> Counter[int]:
    """Established connections of the server's port, by the worker PID that holds them."""
    inodes = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            port = int(fields[1].split(":")[1], 16)
            if port == srv.port and fields[3] == "01":  # ESTABLISHED, server side
                inodes.add(fields[9])
    owners: Counter[int] = Counter()
    for pid in srv.worker_pids():
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                owners[pid] += 1
    return owners


def predict(conn: http.client.HTTPConnection) -> http.client.HTTPResponse:
    conn.request("POST", PREDICT, body=BODY, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    resp.read()
    return resp


def test_default_worker_is_threaded_and_keeps_connections_alive(start_server, model_root):
    srv = start_server(hp_env(model_root), workers=1)
    srv.wait_ready()
    assert "Using worker: tfwsgi.worker.ThreadWorker" in srv.log()
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    conn.connect()
    local = conn.sock.getsockname()
    for _ in range(50):
        resp = predict(conn)
        assert resp.status == 200
        assert resp.getheader("Connection", "").lower() != "close"
    assert conn.sock.getsockname() == local  # one TCP connection carried all 50
    conn.close()


def test_connections_spread_over_workers(start_server, model_root):
    srv = start_server(hp_env(model_root), workers=2)
    srv.wait_ready()
    conns = []
    barrier = threading.Barrier(16)

    def open_one() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        barrier.wait()
        assert predict(conn).status == 200
        conns.append(conn)

    threads = [threading.Thread(target=open_one) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    owners = connection_owners(srv)
    for conn in conns:
        conn.close()
    assert sum(owners.values()) == 16, owners
    # A burst of 16 lands on both workers, neither holding more than two thirds.
    assert len(owners) == 2 and max(owners.values()) <= 11, owners


def test_idle_connection_closes_after_keepalive(start_server, model_root):
    srv = start_server(hp_env(model_root), workers=1, extra_args=("--keep-alive", "1"))
    srv.wait_ready()
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    sock.sendall(b"POST " + PREDICT.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: "
                 + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)
    answer = b""
    while not answer.endswith(b"]}"):
        answer += sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 OK")
    started = time.monotonic()
    assert sock.recv(65536) == b""  # the server closed the idle connection
    assert 0.5 < time.monotonic() - started < 5
    sock.close()


def test_connections_beyond_capacity_wait_for_a_free_thread(start_server, model_root):
    srv = start_server(hp_env(model_root), workers=1, extra_args=("--threads", "2", "--keep-alive", "1"))
    srv.wait_ready()
    held = [http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30) for _ in range(2)]
    for conn in held:
        assert predict(conn).status == 200
    waiting = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    started = time.monotonic()
    assert predict(waiting).status == 200  # served once an idle connection timed out
    assert time.monotonic() - started > 0.5
    for conn in [*held, waiting]:
        conn.close()


def test_graceful_stop_finishes_requests_in_flight(start_server, model_root):
    srv = start_server({"TFWSGI_MODEL_NAME": "multi", "TFWSGI_MODEL_BASE_PATH": str(model_root / "multi"),
                        "TFWSGI_CACHE_ENABLED": "false"}, workers=1)
    srv.wait_ready()
    result: dict[str, object] = {}

    def slow() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        conn.request("POST", "/v1/models/multi:predict",
                     body=b'{"signature_name": "slow", "instances": [1.0]}')
        resp = conn.getresponse()
        result["status"], result["connection"] = resp.status, resp.getheader("Connection")
        resp.read()

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.1)  # the request is in the model (about 0.25 s)
    os.kill(srv.pid, signal.SIGTERM)
    t.join(30)
    assert result == {"status": 200, "connection": "close"}
    assert srv.proc.wait(30) == 0


def test_killed_worker_is_replaced_and_its_siblings_keep_serving(start_server, model_root):
    srv = start_server(hp_env(model_root), workers=2)
    srv.wait_ready()
    victim = min(srv.worker_pids())
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 60
    failures = served = 0
    while time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        try:
            ok = predict(conn).status == 200
        except OSError:
            ok = False
        conn.close()
        served += ok
        failures += not ok
        pids = srv.worker_pids()
        if len(pids) == 2 and victim not in pids and served >= 20:
            break
    srv.wait_ready(count=2)
    assert failures == 0 and served >= 20
    assert victim not in srv.worker_pids()


def test_requests_are_parsed_by_gunicorns_c_parser(start_server, model_root):
    """gunicorn-h1c is a dependency, and gunicorn (http_parser = auto) parses with it."""
    srv = start_server(hp_env(model_root), workers=1)
    srv.wait_ready()
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    assert predict(conn).status == 200
    conn.close()
    for pid in srv.worker_pids():
        with open(f"/proc/{pid}/maps") as f:
            assert "gunicorn_h1c/_parser" in f.read()
