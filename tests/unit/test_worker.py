"""The pure parts of tfwsgi.worker: when a request is all in, the waiting bound, error responses."""

from __future__ import annotations

import json
import math
import random
import socket
import sys
import time
from typing import Any

import pytest

from tfwsgi import worker
from tfwsgi.worker import (
    _COUNTER,
    _SLOTS,
    HAND_OVER,
    NEED_MORE,
    Balance,
    Channel,
    Conn,
    SettledConfig,
    _new_shared,
    error_response,
    request_extent,
    waiting_bound,
    wants_continue,
)

HEAD = b"POST /v1/models/m:predict HTTP/1.1\r\nHost: x\r\n"


def test_a_request_without_body_ends_with_its_head():
    req = b"GET /v1/models/m HTTP/1.1\r\nHost: x\r\n\r\n"
    assert request_extent(req, 100) == len(req)
    assert request_extent(req + b"GET /next", 100) == len(req)  # pipelined bytes are not its own
    for cut in range(len(req)):
        assert request_extent(req[:cut], 100) == NEED_MORE


def test_a_content_length_body_must_be_all_in():
    req = HEAD + b"Content-Length: 10\r\n\r\n0123456789"
    assert request_extent(req, 100) == len(req)
    for cut in range(len(req)):
        assert request_extent(req[:cut], 100) == NEED_MORE
    assert request_extent(HEAD + b"content-LENGTH:  10 \r\n\r\n0123456789", 100) == len(req) + 2


def test_lengths_gunicorn_refuses_or_the_app_answers_413_are_handed_over_at_once():
    assert request_extent(HEAD + b"Content-Length: 1x\r\n\r\n", 100) == HAND_OVER
    assert request_extent(HEAD + b"Content-Length: 1\r\nContent-Length: 1\r\n\r\n", 100) == HAND_OVER
    assert request_extent(HEAD + b"Content-Length: 101\r\n\r\n", 100) == HAND_OVER
    assert request_extent(HEAD + b"X: " + b"a" * 200_000, 100) == HAND_OVER  # a head too large


def test_a_chunked_body_must_be_all_in_with_its_trailers():
    body = b"5\r\nhello\r\n3;ext=1\r\nabc\r\n0\r\n\r\n"
    req = HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + body
    assert request_extent(req, 100) == len(req)
    for cut in range(len(req)):
        assert request_extent(req[:cut], 100) == NEED_MORE, cut
    trailers = HEAD + b"Transfer-Encoding: chunked\r\n\r\n0\r\nX-T: 1\r\n\r\n"
    assert request_extent(trailers, 100) == len(trailers)
    assert request_extent(trailers[:-2], 100) == NEED_MORE
    assert request_extent(HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", 100) == HAND_OVER
    assert request_extent(HEAD + b"Transfer-Encoding: chunked\r\n\r\n65\r\n", 100) == HAND_OVER


def test_expect_100_continue_is_seen_in_a_complete_head_only():
    assert wants_continue(HEAD + b"Expect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    assert not wants_continue(HEAD + b"Expect: 100-continue\r\n")
    assert not wants_continue(HEAD + b"Content-Length: 5\r\n\r\n")


def test_the_waiting_bound_is_the_setting_or_one_deadline_of_measured_work():
    assert waiting_bound(7, rate=1000.0, deadline_s=30.0, threads=64) == 7
    assert waiting_bound(0, rate=1000.0, deadline_s=30.0, threads=64) == 30_000
    assert waiting_bound(0, rate=1.0, deadline_s=30.0, threads=64) == 64  # never below the threads
    assert waiting_bound(0, rate=0.0, deadline_s=30.0, threads=64) == sys.maxsize  # nothing measured
    assert waiting_bound(0, rate=1000.0, deadline_s=float("inf"), threads=64) == sys.maxsize


def test_error_responses_carry_tf_servings_json_error():
    raw = error_response(503, "Service Unavailable", 'busy "now"', headers=(("Retry-After", "2"),))
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 503 Service Unavailable"
    assert "Retry-After: 2" in lines and "Connection: close" in lines
    assert f"Content-Length: {len(body)}" in lines
    assert json.loads(body) == {"error": 'busy "now"'}
    assert b"Connection" not in error_response(503, "x", "y", close=False)


class _RecordingSocket:
    """What Channel needs of a socket, recording each send."""

    def __init__(self) -> None:
        self.sends: list[bytes] = []

    def fileno(self) -> int:
        return 99

    def send(self, data: Any) -> int:
        self.sends.append(bytes(data))
        return len(data)


def test_a_corked_channel_sends_a_response_head_with_its_body() -> None:
    sock = _RecordingSocket()
    channel = Channel(Conn(sock, ("127.0.0.1", 1), None), deadline=0.0)  # type: ignore[arg-type]
    channel.cork()
    channel.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
    assert sock.sends == []
    channel.sendall(b'{"predictions":[1]}')
    channel.sendall(b"more")  # once the head went, writes go straight out
    channel.uncork()
    assert sock.sends == [b'HTTP/1.1 200 OK\r\n\r\n{"predictions":[1]}', b"more"]

    channel.cork()  # a response without a body: its head goes at uncork
    channel.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
    channel.uncork()
    assert sock.sends[-1] == b"HTTP/1.1 204 No Content\r\n\r\n"


@pytest.mark.parametrize("deadline", [math.inf, 10**10])
def test_a_channel_read_waits_at_most_the_read_bound_with_no_deadline_or_a_far_one(
        monkeypatch: pytest.MonkeyPatch, deadline: float) -> None:
    # TFWSGI_REST_API_TIMEOUT_IN_MS=0 (no deadline) or a huge one: a read the parser makes on the
    # socket (a request handed over before it was all in) is bounded as the loop bounds a
    # partial request, not unbounded (poll() refuses an infinite timeout: OverflowError, a 500).
    monkeypatch.setattr(worker, "READ_SECONDS", 0.2)
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    with ours, theirs:
        channel = Channel(Conn(ours, ("127.0.0.1", 1), None), deadline=time.monotonic() + deadline)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            channel.recv(10)
        assert 0.15 <= time.monotonic() - started < 2.0
        theirs.send(b"more")
        assert channel.recv(10) == b"more"


def test_the_settled_config_reads_as_gunicorns_config():
    """Every setting reads the same through it, class properties and methods too, as the
    request path (gunicorn's parser, wsgi.create, pre/post_request) would read the real one."""
    import pytest
    from gunicorn.config import Config

    cfg = Config()
    cfg.set("keepalive", 7)
    cfg.set("forwarded_allow_ips", "10.0.0.1,192.168.0.0/16")
    cfg.set("limit_request_fields", 50)
    settled = SettledConfig(cfg)
    for name in cfg.settings:
        assert getattr(settled, name) == getattr(cfg, name), name
    assert settled.keepalive == 7 and settled.limit_request_fields == 50
    assert settled.forwarded_allow_networks() == cfg.forwarded_allow_networks()
    assert settled.is_ssl == cfg.is_ssl and settled.sendfile == cfg.sendfile
    assert settled.worker_class is cfg.worker_class  # a property over the setting: the real one's
    assert settled.pre_request is cfg.pre_request
    with pytest.raises(AttributeError):
        _ = settled.no_such_setting
    with pytest.raises(AttributeError):
        settled.keepalive = 1


def _parsed(cfg: Any, peer: Any, head: bytes) -> Any:
    """gunicorn's parser (its C parser, as the worker runs it) on one request from ``peer``."""
    import io

    from gunicorn import http

    class Sock(io.BytesIO):
        def recv(self, n: int) -> bytes:
            return self.read(n)

    return next(http.get_parser(cfg, Sock(head), peer))


def test_a_connection_config_decides_forwarding_trust_as_gunicorn_does_per_request():
    """The parser of a connection reads SettledConfig.for_peer: whether its peer may set the
    scheme and forwarding headers is decided once, with gunicorn's own test, and the parser
    then reads the same scheme and headers as from the real config, trusted peer or not."""
    from gunicorn.config import Config

    cfg = Config()
    cfg.set("forwarded_allow_ips", "10.0.0.1,192.168.0.0/16")
    cfg.set("forwarder_headers", "SCRIPT_NAME,PATH_INFO")
    settled = SettledConfig(cfg)
    head = (b"GET /x HTTP/1.1\r\nHost: h\r\nX-Forwarded-Proto: https\r\nScript-Name: /app\r\n"
            b"\r\n")
    views = set()
    for peer, trusted in [(("10.0.0.1", 5), True), (("192.168.3.4", 5), True), (("127.0.0.1", 5), False),
                          (("10.0.0.2", 5), False), (("::1", 5, 0, 0), False), ("/run/sock", True)]:
        view = settled.for_peer(peer)
        views.add(id(view))
        real, fast = _parsed(cfg, peer, head), _parsed(view, peer, head)
        assert (real.scheme, real.headers) == (fast.scheme, fast.headers), peer
        assert real.scheme == ("https" if trusted else "http"), peer
        assert view.keepalive == cfg.keepalive and view.forwarded_allow_ips == ["*"]
    assert len(views) == 2  # one view for trusted peers, one for the others, made once


def test_the_date_header_is_gunicorns_formatted_once_a_second():
    import time

    from gunicorn import util

    from tfwsgi import worker

    for _ in range(3):
        before = util.http_date()
        ours, again = worker.http_date(), worker.http_date()
        after = util.http_date()
        if before == after:  # not across a second's edge
            assert ours == before
            assert again is ours  # formatted once, not per call, within a second
            break
        time.sleep(0.01)
    else:
        raise AssertionError("no call within one second")


def test_the_response_head_is_gunicorns_but_for_the_date_source():
    from gunicorn.config import Config
    from gunicorn.http import wsgi

    from tfwsgi import worker

    cfg = Config()
    for keep in (True, False):
        req = _parsed(cfg, ("127.0.0.1", 5), b"GET /x HTTP/1.1\r\nHost: h\r\n"
                      + (b"" if keep else b"Connection: close\r\n") + b"\r\n")
        for chunked in (False, True):
            ours, theirs = worker.Response(req, None, cfg), wsgi.Response(req, None, cfg)
            for resp in (ours, theirs):
                resp.start_response("200 OK", [("Content-Type", "text/plain")]
                                    + ([] if chunked else [("Content-Length", "2")]))
            a, b = ours.default_headers(), theirs.default_headers()
            assert [h for h in a if not h.startswith("Date:")] == [h for h in b if not h.startswith("Date:")]
            assert len(a) == len(b) and a[2].startswith("Date: ")


def test_a_worker_accepts_when_no_accepting_sibling_holds_fewer_connections_than_it_less_slack():
    """Balance.least_loaded against its definition, over random slot tables: not accepting
    siblings (-1) never count; a sibling counts when it holds fewer than this worker's
    connections less a slack of 2 + 1/64."""
    rng = random.Random(7)
    for _ in range(500):
        shared = _new_shared()
        age = rng.randrange(1000)
        balance = Balance(shared, age)
        balance.add(rng.randrange(0, 6000))
        mine = balance.connections - 2 - balance.connections // 64
        counts = {}
        for slot in rng.sample(range(_SLOTS), rng.randrange(1, 6)):
            counts[slot] = rng.choice([-1, 0, mine - 1, mine, mine + 1, rng.randrange(0, 6000)])
            if slot != age % _SLOTS:
                _COUNTER.pack_into(shared, slot * _COUNTER.size, counts[slot])
        others = [c for slot, c in counts.items() if slot != age % _SLOTS]
        assert balance.least_loaded() == (not any(0 <= c < mine for c in others))
    balance.withdraw()
    assert balance.least_loaded()
