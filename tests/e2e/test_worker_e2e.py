"""tfwsgi.worker.EventWorker (gunicorn_conf.py's default) against real gunicorn: keep-alive,
connections spread over the workers, idle timeout, connections beyond the threads, trickling
clients, deadlines, overload, graceful stop, a killed worker."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time
from collections import Counter

import pytest

from conftest import metric_total

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


def test_default_worker_is_the_event_worker_and_keeps_connections_alive(start_server, model_root):
    srv = start_server(hp_env(model_root), workers=1)
    srv.wait_ready()
    assert "Using worker: tfwsgi.worker.EventWorker" in srv.log()
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


def test_connections_beyond_the_threads_are_all_served(start_server, model_root):
    """With 2 request threads, 40 open keep-alive connections each get answers in turn: an idle
    connection holds no thread (the old worker served 2 and left the rest in the backlog)."""
    srv = start_server(hp_env(model_root), workers=1, extra_args=("--threads", "2"))
    srv.wait_ready()
    conns = [http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10) for _ in range(40)]
    for conn in conns:
        conn.connect()
    started = time.monotonic()
    for _ in range(3):
        for conn in conns:
            assert predict(conn).status == 200
    assert time.monotonic() - started < 5
    owners = connection_owners(srv)
    assert sum(owners.values()) == 40  # all still open
    for conn in conns:
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


def multi_env(model_root, **extra: str) -> dict[str, str]:
    return {"TFWSGI_MODEL_NAME": "multi", "TFWSGI_MODEL_BASE_PATH": str(model_root / "multi"),
            "TFWSGI_CACHE_ENABLED": "false", **extra}


def slow_predict(port: int, x: float = 1.0) -> tuple[int, dict[str, str], bytes, float]:
    """One request to the ~0.25 s signature on a new connection: status, headers, body, seconds."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.connect()
    started = time.monotonic()
    conn.request("POST", "/v1/models/multi:predict",
                 body=b'{"signature_name": "slow", "instances": [%f]}' % x)
    resp = conn.getresponse()
    body = resp.read()
    elapsed = time.monotonic() - started
    conn.close()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body, elapsed


def test_a_request_past_its_deadline_gets_504_at_the_deadline(start_server, model_root):
    """TFWSGI_REST_API_TIMEOUT_IN_MS=100 and a signature that runs ~0.25 s: TF Serving's
    DEADLINE_EXCEEDED (504, JSON) within deadline + 100 ms, while other requests are served."""
    srv = start_server(multi_env(model_root, TFWSGI_REST_API_TIMEOUT_IN_MS="100"), workers=1)
    srv.wait_ready()
    fast: list[int] = []
    stop = threading.Event()

    def others() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        while not stop.is_set():
            conn.request("POST", "/v1/models/multi/versions/7:predict",
                         body=b'{"signature_name": "double", "instances": [3.0]}')
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status != 200 or json.loads(body) == {"predictions": [1.0]}
            fast.append(resp.status)
        conn.close()

    t = threading.Thread(target=others)
    t.start()
    results = []
    try:
        for i in range(3):
            results.append(slow_predict(srv.port, float(i)))
            # The ~0.25 s computation goes on after its 504 (TensorFlow cannot stop it) and holds
            # the worker's one inter-op thread; the other requests are served once it is done.
            time.sleep(0.3)
    finally:
        stop.set()
        t.join(30)
    for status, headers, body, elapsed in results:
        assert status == 504, body
        assert headers["content-type"] == "application/json"
        assert b"Deadline exceeded" in body
        assert elapsed < 0.1 + 0.1, elapsed
    assert fast.count(200) >= 3 and set(fast) <= {200, 504}, fast
    metrics = srv.get("/metrics").text
    assert 'tfwsgi_requests_dropped_total{reason="deadline"}' in metrics


def test_a_flood_beyond_the_waiting_bound_gets_fast_503s(start_server, model_root):
    """One request thread, at most 2 requests waiting: of 24 simultaneous slow requests the
    rest are refused at once with 503, Retry-After and a JSON error; nothing else fails."""
    srv = start_server(multi_env(model_root, TFWSGI_MAX_WAITING_REQUESTS="2"), workers=1,
                       extra_args=("--threads", "1"))
    srv.wait_ready()
    results: list[tuple[int, dict[str, str], bytes, float]] = []
    barrier = threading.Barrier(24)

    def one(i: int) -> None:
        barrier.wait()
        results.append(slow_predict(srv.port, float(i)))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    statuses = Counter(r[0] for r in results)
    assert set(statuses) == {200, 503} and statuses[503] >= 12, statuses
    for status, headers, body, elapsed in results:
        if status == 503:
            assert headers["content-type"] == "application/json"
            assert int(headers["retry-after"]) >= 1
            assert b"overloaded" in body
            assert elapsed < 0.2, elapsed  # refused at once, not after waiting
    metrics = srv.get("/metrics").text
    assert 'tfwsgi_requests_dropped_total{reason="overload"}' in metrics


def test_a_queued_request_whose_client_closed_is_not_run(start_server, model_root):
    """One request thread busy with a ~0.25 s request; 5 clients send theirs and close their
    connections while they wait: none of the 5 runs (each would hold the thread 0.25 s), so a
    request sent after them is answered once the first is done, not 1.25 s later."""
    srv = start_server(multi_env(model_root), workers=1, extra_args=("--threads", "1"))
    srv.wait_ready()
    body = b'{"signature_name": "slow", "instances": [1.0]}'
    request = (b"POST /v1/models/multi:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    first = threading.Thread(target=slow_predict, args=(srv.port,))
    first.start()
    time.sleep(0.05)  # the first request holds the one thread
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(request)
            time.sleep(0.01)  # all of it in, queued; then the client leaves
    status, _, answer, elapsed = slow_predict(srv.port, 2.0)
    first.join(30)
    assert status == 200, answer
    assert elapsed < 0.25 + 0.5, elapsed
    metrics = srv.get("/metrics").text
    assert metric_total(metrics, "tfwsgi_requests_dropped_total", reason="client_closed") == 5
    assert "Traceback" not in srv.log()


def test_trickling_clients_hold_no_thread_and_are_cut_at_the_deadline(start_server, model_root):
    """With 2 request threads, 100 clients trickling their headers a byte at a time: normal
    clients are answered meanwhile; a request not all received within the deadline gets 408."""
    srv = start_server(hp_env(model_root, TFWSGI_REST_API_TIMEOUT_IN_MS="2000"), workers=1,
                       extra_args=("--threads", "2"))
    srv.wait_ready()
    head = b"POST " + PREDICT.encode() + b" HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 100
    socks = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(100)]
    try:
        started = time.monotonic()
        for i in range(6):  # 0.6 s of trickling
            for s in socks:
                s.send(head[i:i + 1])
            conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=1)
            assert predict(conn).status == 200  # within 1 s, as each of these
            conn.close()
            time.sleep(0.1)
        socks[0].settimeout(5)
        answer = socks[0].recv(65536)  # the deadline (2 s from its first byte) cuts it
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert 1.5 < time.monotonic() - started < 4
        assert b'"error"' in answer
    finally:
        for s in socks:
            s.close()


def test_metrics_report_connections_waiting_and_wait_time(start_server, model_root):
    srv = start_server(hp_env(model_root), workers=1)
    srv.wait_ready()
    conns = [http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10) for _ in range(5)]
    for conn in conns:
        assert predict(conn).status == 200
    time.sleep(1.5)  # the gauges are set about once a second
    text = srv.get("/metrics").text
    assert metric_total(text, "tfwsgi_worker_connections") >= 5
    assert metric_total(text, "tfwsgi_requests_waiting") == 0
    assert metric_total(text, "tfwsgi_request_wait_seconds_count") >= 5
    for conn in conns:
        conn.close()


def test_a_worker_whose_request_thread_is_stuck_past_the_timeout_is_replaced(start_server, model_root,
                                                                               tmp_path):
    """gunicorn's timeout catches stuck request threads again: a request held 6 s (the batcher
    waits that long for company) in a worker with `--timeout 2` stops its heartbeat, and the
    master replaces it; the other worker keeps serving meanwhile."""
    params = tmp_path / "batching.txt"
    params.write_text("max_batch_size { value: 1000 }\nbatch_timeout_micros { value: 6000000 }\n")
    srv = start_server(hp_env(model_root, TFWSGI_ENABLE_BATCHING="true",
                              TFWSGI_BATCHING_PARAMETERS_FILE=str(params)),
                       workers=1, extra_args=("--timeout", "2"))
    srv.wait_ready()
    (victim,) = srv.worker_pids()
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    started = time.monotonic()
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        predict(conn)  # the worker is killed with the request in it
    assert time.monotonic() - started < 5.5  # replaced before the batch would have run
    assert "no heartbeat, so this worker is replaced" in srv.log()
    srv.wait_ready(count=1)
    assert victim not in srv.worker_pids()


def _policies(pid: int) -> dict[int, int]:
    out = {}
    for name in os.listdir(f"/proc/{pid}/task"):
        try:
            out[int(name)] = os.sched_getscheduler(int(name))
        except OSError:  # the thread ended
            continue
    return out


def test_request_threads_run_under_sched_batch_and_the_other_threads_do_not(start_server, model_root):
    """TFWSGI_SCHED_BATCH (on by default): a worker's request threads, and no other thread of
    it (the event loop, the batch thread, TensorFlow's), are under SCHED_BATCH; off, none is.
    Requests are answered either way."""
    on = start_server(hp_env(model_root, TFWSGI_ENABLE_BATCHING="true"), workers=1,
                      extra_args=("--threads", "8"))
    off = start_server(hp_env(model_root, TFWSGI_SCHED_BATCH="false"), workers=1,
                       extra_args=("--threads", "8"))
    for srv, batch in ((on, 8), (off, 0)):
        srv.wait_ready()
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
        assert predict(conn).status == 200
        conn.close()
        (pid,) = srv.worker_pids()
        policies = _policies(pid)
        assert policies[pid] == os.SCHED_OTHER  # the event loop
        assert sum(p == os.SCHED_BATCH for p in policies.values()) == batch, policies
        assert sum(p == os.SCHED_OTHER for p in policies.values()) >= 3, policies  # loop, batch, TF
