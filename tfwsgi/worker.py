"""``tfwsgi.worker.EventWorker``: thousands of keep-alive connections per worker, a bounded pool of
request threads, request deadlines and an explicit answer to overload.

Why this shape (measured on a 2-core machine; docs/architecture.md gives the figures):

- The previous worker gave each connection a thread of its own, blocking on its socket between
  requests. It was fast, but it served at most ``workers × threads`` connections: connection
  ``N + 1`` waited in the kernel's accept backlog until a kept-alive one closed (a new client's
  first request took 9.4 s at 1024 connections, 19.5 s at 4096).
- gunicorn's ``gthread`` keeps idle connections in a poller, but hands every request from its
  event loop to a thread pool and back (a future, a pipe write, two epoll registrations a request)
  and lets one worker take a whole burst of connections.

Here, the worker's main thread runs an epoll loop over every connection the worker holds. An idle
connection costs a file descriptor, a small object and a slot in the kernel's epoll set. The loop
reads whatever a connection sends (non-blocking) into that connection's buffer and hands the
connection to the request threads only once a whole request is in: its head and, for
``Content-Length`` or chunked bodies, its body too. A client that trickles its headers or body
therefore never holds a request thread; the loop closes it (408) if the request is not in within
the deadline. Complete requests wait in one FIFO queue, so threads serve them in arrival order
across connections. After answering, a thread keeps a connection whose next request is already
there, or arrives while the thread has nothing else to do, and serves it without any hand-off:
while threads are to spare, a busy connection is served as by the old thread-per-connection worker;
as soon as a request waits with no thread free, the waiting threads give their connections back
to the loop and take from the queue.

Each request carries a deadline (``TFWSGI_REST_API_TIMEOUT_IN_MS``, TF Serving's
``--rest_api_timeout_in_ms``): the loop answers a request still unanswered at its deadline with
TF Serving's DEADLINE_EXCEEDED (504, JSON) and closes that connection; a request whose deadline
passed while it waited is dropped before it runs (the batcher drops it too), and so is one whose
client closed its connection while it waited. Past a bound of
requests waiting in the worker (``TFWSGI_MAX_WAITING_REQUESTS``; by default what the worker serves
within one deadline at its measured rate) a request gets an immediate 503 with ``Retry-After``.
gunicorn's heartbeat stops while any request thread has been on one request longer than
gunicorn's ``timeout``, so the master replaces a worker whose threads are stuck.

The request threads run under Linux's ``SCHED_BATCH`` (``TFWSGI_SCHED_BATCH``): a request thread
that wakes up (its connection readable, the GIL or a batch's answer free) does not preempt the
running thread, which on the worker's one core is often the one holding the GIL. The loop, the
batch thread and TensorFlow's threads stay normal: they are on every request's path, and a woken
one should run at once. Measured at 32 connections with wrk at normal priority on the same cores
(the throughput benchmark, two runs): 4909 and 4492 req/s against 4257 without, p99 13.6 and
29.1 ms against 23.9 (docs/architecture.md has every round); with every thread but the loop under
SCHED_BATCH (the batch thread too), 4737 and 4965 req/s but a p99 of 40.5 and 60.3 ms. Under
that client the p99 moves between rounds with or without it (docs/architecture.md).

Parsing and responses stay gunicorn's own (``gunicorn.http`` with its C parser ``gunicorn_h1c``
under ``http_parser = auto``), fed from the connection's buffer, so its request limits, smuggling
defences, access log and ``pre_request``/``post_request`` hooks apply unchanged. Connections are
spread over the workers as before: a worker accepts only while it holds no more connections than
the least loaded of its siblings, or when nobody else took the connection within a few ms.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import mmap
import os
import queue
import resource
import select
import socket
import struct
import sys
import threading
import time
from collections import deque
from datetime import datetime
from typing import Any

import numpy as np
from gunicorn import http, util
from gunicorn.http import message, wsgi
from gunicorn.workers import base

# One signed 64-bit counter per worker slot (worker age modulo _SLOTS): its open connections,
# or -1 when it is not accepting. Created by the master (check_config runs before any fork).
_SLOTS = 512
_COUNTER = struct.Struct("<q")
_shared: mmap.mmap | None = None

# How long a connection waits for a less loaded sibling before this worker takes it anyway.
_DEFER_SECONDS = 0.002
# Requests served on one connection before it is closed (nginx's keepalive_requests default):
# clients reconnect, which keeps the spread of connections over workers fresh.
MAX_KEEPALIVE_REQUESTS = 1000
# After answering, how long a thread may wait on the same connection for its next request (no
# hand-off for a busy connection). It waits only while no request waits and another thread is
# free, and leaves at once when a request is queued with no thread free (the unpark signal).
PARK_SECONDS = 1.0
# The longest a request may take to arrive (the loop's timer on a partial request, and a read a
# request thread makes on the socket), when its deadline does not come first.
READ_SECONDS = 60.0
# A request head larger than this is handed to gunicorn's parser, which refuses it (431/414).
_MAX_HEAD = 128 * 1024
_RECV = 64 * 1024
_SEND_TIMEOUT = 30.0
_EPOLLIN = select.EPOLLIN
_ARM = select.EPOLLIN | select.EPOLLONESHOT
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _new_shared() -> mmap.mmap:
    mm = mmap.mmap(-1, _SLOTS * _COUNTER.size)  # anonymous and shared: inherited by every fork
    for i in range(_SLOTS):
        _COUNTER.pack_into(mm, i * _COUNTER.size, -1)
    return mm


def retire(age: int) -> None:
    """Mark a worker's slot as not accepting (the master calls it when a worker exits)."""
    if _shared is not None:
        _COUNTER.pack_into(_shared, (age % _SLOTS) * _COUNTER.size, -1)


class Balance:
    """This worker's open connections, published for its siblings, and whether it is its turn."""

    def __init__(self, shared: mmap.mmap | None, age: int) -> None:
        self._shared = shared
        # The slots as one array: least_loaded reads all 512 of them for every connection it may
        # accept (~3 µs this way, 31 µs unpacking them one by one: 0.6 s of a worker's CPU when
        # 10,000 connections arrive at once).
        self._counts = None if shared is None else np.frombuffer(shared, dtype="<i8")
        self._offset = (age % _SLOTS) * _COUNTER.size
        self.connections = 0
        self._lock = threading.Lock()

    def publish(self, value: int) -> None:
        if self._shared is not None:
            _COUNTER.pack_into(self._shared, self._offset, value)

    def add(self, delta: int) -> None:
        with self._lock:
            self.connections += delta
            self.publish(self.connections)

    def withdraw(self) -> None:
        """Stopping: siblings see this worker as not accepting from now on."""
        with self._lock:
            self.publish(-1)
            self._shared = None
            self._counts = None

    def least_loaded(self) -> bool:
        """True when no accepting sibling holds fewer connections than this worker, give or take
        a slack of about 1.5% (at least 2): a burst of thousands of new connections is then
        accepted many at a time, each worker in turn, not one by one."""
        counts = self._counts
        if counts is None:
            return True
        mine = self.connections - 2 - self.connections // 64
        return not bool(((counts >= 0) & (counts < mine)).any())


# ------------------------------------------------------------------------------ request extent
NEED_MORE = 0
HAND_OVER = -1


def request_extent(buf: bytes | bytearray, max_body: int) -> int:
    """How far the first request in ``buf`` reaches: its length in bytes once its head and body
    are all in, ``NEED_MORE`` while they are not, or ``HAND_OVER`` when gunicorn's parser should
    see it now (a head too large, a length it will refuse, a body over ``max_body``). Only
    readiness is decided here; whether the request is valid is gunicorn's to say."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return HAND_OVER if len(buf) > _MAX_HEAD else NEED_MORE
    head_end = end + 4
    head = bytes(buf[:end]).lower()
    if b"\r\ntransfer-encoding:" in head:
        return _chunked_extent(buf, head_end, max_body)
    at = head.find(b"\r\ncontent-length:")
    if at < 0:
        return head_end  # no body
    start = at + len(b"\r\ncontent-length:")
    stop = head.find(b"\r\n", start)
    text = head[start:] if stop < 0 else head[start:stop]
    text = text.strip()
    if not text.isdigit() or head.find(b"\r\ncontent-length:", start) >= 0:
        return HAND_OVER  # invalid or repeated: gunicorn refuses it
    length = int(text)
    if length > max_body:
        return HAND_OVER  # answered 413 by the app, which drains a bounded amount
    total = head_end + length
    return total if len(buf) >= total else NEED_MORE


def _chunked_extent(buf: bytes | bytearray, pos: int, max_body: int) -> int:
    """The end of a chunked body starting at ``pos`` (with its trailers), as ``request_extent``."""
    body = 0
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return HAND_OVER if len(buf) - pos > 1024 else NEED_MORE
        size_text = bytes(buf[pos:eol]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            return HAND_OVER
        if size == 0:
            if buf[eol + 2:eol + 4] == b"\r\n":
                return eol + 4
            end = buf.find(b"\r\n\r\n", eol)
            if end < 0:
                return HAND_OVER if len(buf) - eol > _MAX_HEAD else NEED_MORE
            return end + 4
        body += size
        if body > max_body:
            return HAND_OVER
        pos = eol + 2 + size + 2
        if len(buf) < pos:
            return NEED_MORE


def wants_continue(buf: bytes | bytearray) -> bool:
    """The complete head in ``buf`` asks for ``100 Continue`` before its body is sent."""
    end = buf.find(b"\r\n\r\n")
    return end >= 0 and b"\r\nexpect: 100-continue" in bytes(buf[:end]).lower()


def error_response(status: int, reason: str, message: str, headers: tuple[tuple[str, str], ...] = (),
                   close: bool = True) -> bytes:
    """A complete HTTP/1.1 response carrying TF Serving's JSON error body."""
    body = json.dumps({"error": message}).encode()
    lines = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", *(f"{k}: {v}" for k, v in headers)]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def deadline_response(timeout_ms: int) -> bytes:
    return error_response(504, "Gateway Timeout",
                          f"Deadline exceeded: the request was not answered within "
                          f"rest_api_timeout_in_ms ({timeout_ms} ms)")


def waiting_bound(setting: int, rate: float, deadline_s: float, threads: int) -> int:
    """Requests that may wait in a worker: the setting, or (0) what the worker serves within one
    deadline at its measured rate, and never fewer than its threads."""
    if setting > 0:
        return setting
    if rate <= 0 or not 0 < deadline_s < math.inf:
        return sys.maxsize
    return max(threads, int(rate * deadline_s))


# ------------------------------------------------------------------------------ connections
class Conn:
    """One client connection: its socket, what it sent that no request has taken yet, and who
    holds it (the loop while it waits for bytes, a thread while a request is served)."""

    __slots__ = (
        "addr",
        "buf",
        "cfg",
        "closed",
        "continued",
        "fd",
        "first_byte",
        "gen",
        "held",
        "served",
        "server",
        "sock",
    )

    def __init__(self, sock: socket.socket, addr: Any, server: Any, cfg: Any = None) -> None:
        self.sock = sock
        self.cfg = cfg  # what its requests' parser reads (SettledConfig.for_peer)
        self.fd = sock.fileno()
        self.addr = addr
        self.server = server
        self.buf = bytearray()
        self.first_byte = 0.0  # when the first byte of the request being read arrived
        self.gen = 0  # bumped whenever the connection changes hands: stale timers are ignored
        self.served = 0
        self.continued = False
        self.held = False  # a request of it is queued or served: the loop does not touch it
        self.closed = False


class Job:
    """One complete request waiting for, or held by, a request thread."""

    __slots__ = ("answered", "arrived", "conn", "deadline", "done")

    def __init__(self, conn: Conn, arrived: float, deadline: float) -> None:
        self.conn = conn
        self.arrived = arrived
        self.deadline = deadline
        self.answered = False  # a response was claimed (by the thread, or the loop's 504)
        self.done = False  # the thread is finished with it


class Channel:
    """What gunicorn's parser and response see as the socket: the connection's buffered bytes
    first, then the non-blocking socket, each wait bounded (reads by the request's deadline, or
    ``READ_SECONDS``)."""

    __slots__ = ("conn", "corked", "deadline", "held", "pending", "suppress_continue")

    def __init__(self, conn: Conn, deadline: float) -> None:
        self.conn = conn
        self.deadline = deadline
        self.corked = False
        self.held: bytes | None = None
        self.pending = memoryview(bytes(conn.buf))
        conn.buf = bytearray()
        self.suppress_continue = conn.continued  # the loop already said 100 Continue

    def recv(self, size: int) -> bytes:
        if self.pending:
            data = bytes(self.pending[:size])
            self.pending = self.pending[size:]
            return data
        sock = self.conn.sock
        while True:
            try:
                return sock.recv(size)
            except BlockingIOError:
                # By the deadline, and never later than READ_SECONDS after the first wait (no
                # deadline, or a far one): the bound only ever comes closer.
                now = time.monotonic()
                self.deadline = min(self.deadline, now + READ_SECONDS)
                left = self.deadline - now
                if left <= 0 or not _wait(sock, select.POLLIN, left):
                    raise TimeoutError("request read timed out") from None

    def rest(self) -> bytes:
        """Bytes received but not read by the parser."""
        data = bytes(self.pending)
        self.pending = memoryview(b"")
        return data

    def send(self, data: bytes) -> int:
        if self.suppress_continue and data == _CONTINUE:
            return len(data)
        self.sendall(data)
        return len(data)

    def cork(self) -> None:
        """Hold the next write (gunicorn sends a response's head on its own) and send it with
        the write after it (the body): one send and one TCP segment a response, not two."""
        self.corked = True

    def uncork(self) -> None:
        self.corked = False
        if self.held is not None:
            held, self.held = self.held, None
            self.sendall(held)

    def sendall(self, data: Any) -> None:
        if self.corked:
            if self.held is None:
                self.held = bytes(data)
                return
            data = self.held + bytes(data)
            self.held = None
            self.corked = False
        view = memoryview(data).cast("B")
        sock = self.conn.sock
        while view:
            try:
                sent = sock.send(view)
            except BlockingIOError:
                if not _wait(sock, select.POLLOUT, _SEND_TIMEOUT):
                    raise TimeoutError("response write timed out") from None
                continue
            view = view[sent:]

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        file.seek(offset)
        total = 0
        while count is None or total < count:
            chunk = file.read(65536 if count is None else min(65536, count - total))
            if not chunk:
                break
            self.sendall(chunk)
            total += len(chunk)
        return total

    def fileno(self) -> int:
        return self.conn.fd


class SettledConfig:
    """gunicorn's ``Config`` as the request path reads it: each setting's value read once, when
    the worker starts serving, then a plain attribute. ``Config.__getattr__`` looks a setting up
    and calls its ``get`` on every read, and parsing and answering one request read some twenty
    (13 µs of a request's ~75 µs in the worker, measured in process). Settings do not change in
    a running worker (a reload forks new ones); ``is_ssl`` is settled too, and the class's other
    properties and methods (``forwarded_allow_networks`` …) and anything else are the real
    config's."""

    def __init__(self, cfg: Any, **overrides: Any) -> None:
        self.__dict__["_cfg"] = cfg
        for name, setting in cfg.settings.items():
            if not hasattr(type(cfg), name):
                self.__dict__[name] = setting.get()
        self.__dict__["is_ssl"] = cfg.is_ssl
        self.__dict__.update(overrides)
        self.__dict__["_peer_views"] = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cfg, name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("the settled config is read-only")

    def for_peer(self, peer: Any) -> SettledConfig:
        """The config that the parser of a connection from ``peer`` reads. For every request,
        gunicorn's parser asks whether the peer may set the forwarding and scheme headers
        (``forwarded_allow_ips``), parsing the peer's address each time (~8 µs a request here).
        A connection's peer does not change, so here it is asked once, with gunicorn's own test
        (``gunicorn.http.message.HeaderPolicy._peer_is_trusted_proxy``), and the parser gets a
        view whose ``forwarded_allow_ips`` is ``*`` and whose ``secure_scheme_headers`` and
        ``forwarder_headers`` are what that peer may set: the real ones, or none, as gunicorn
        decides for an untrusted peer (``_peer_trusted_for_forwarded``)."""
        views = self._peer_views
        if views is None:
            trusted = SettledConfig(self._cfg, forwarded_allow_ips=["*"])
            untrusted = SettledConfig(self._cfg, forwarded_allow_ips=["*"], secure_scheme_headers={},
                                      forwarder_headers=[])
            views = self.__dict__["_peer_views"] = (trusted, untrusted)
        trusted_peer = not isinstance(peer, tuple) or message._ip_in_allow_list(
            peer[0], self.forwarded_allow_ips, self._cfg.forwarded_allow_networks())
        return views[0] if trusted_peer else views[1]


_date: tuple[int, str] = (0, "")


def http_date() -> str:
    """The Date header's value, formatted once a second (gunicorn's ``util.http_date`` formats it
    with ``email.utils`` for every response: ~12 µs a request here)."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, util.http_date(now))
    return _date[1]


class Response(wsgi.Response):
    """gunicorn's HTTP/1 response writer, its Date header from ``http_date``."""

    def default_headers(self) -> list[str]:
        # Adapted from gunicorn 27.0 (27.0.1) http/wsgi.py Response.default_headers: the same
        # lines, the date formatted once a second.
        if self.upgrade:
            connection = "upgrade"
        elif self.should_close():
            connection = "close"
        else:
            connection = "keep-alive"
        headers = [
            f"HTTP/{self.req.version[0]}.{self.req.version[1]} {self.status}\r\n",
            f"Server: {self.version}\r\n",
            f"Date: {http_date()}\r\n",
            f"Connection: {connection}\r\n",
        ]
        if self.chunked:
            headers.append("Transfer-Encoding: chunked\r\n")
        return headers


def _client_gone(sock: socket.socket) -> bool:
    """The peer closed (or reset) the connection: nothing is left to read and the next read is
    its end. A request already read from the socket is then an abandoned one. (A client that
    half-closes after its request, e.g. ``nc -N``, counts as gone, as nginx counts it.)"""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def _wait(sock: socket.socket, event: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(sock, event)
    return bool(poller.poll(timeout * 1000))


def _raise_fd_limit(wanted: int) -> int:
    """Raise this process's soft limit of open files towards ``wanted`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


# ------------------------------------------------------------------------------ the worker
class EventWorker(base.Worker):
    """An epoll loop over every connection, ``threads`` request threads, deadlines, shedding."""

    alive: bool

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        global _shared
        if cfg.is_ssl:
            raise RuntimeError("tfwsgi.worker.EventWorker does not terminate TLS: put nginx in front "
                               "(deploy/nginx-tfwsgi.conf) or choose another worker class (-k gthread)")
        if _shared is None:
            _shared = _new_shared()

    def init_process(self) -> None:
        from .settings import from_env

        settings = from_env()
        self.timeout_ms = settings.rest_api_timeout_in_ms
        self.deadline_s = self.timeout_ms / 1000 if self.timeout_ms > 0 else math.inf
        self.max_waiting = settings.max_waiting_requests
        self.max_body = settings.max_request_bytes
        self.sched_batch = settings.sched_batch and hasattr(os, "SCHED_BATCH")
        self.nthreads = max(1, self.cfg.threads)
        self.max_connections = max(1, self.cfg.worker_connections)
        _raise_fd_limit(self.max_connections + self.nthreads + 256)
        self.balance = Balance(_shared, self.age)
        self.conns: dict[int, Conn] = {}
        self.ready: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self.waiting = 0  # jobs in `ready` (changed under _claim)
        self.jobs: deque[Job] = deque()  # every job not yet past its deadline check, by arrival
        self.idle: deque[tuple[float, Conn, int]] = deque()  # (expires, conn, gen) keep-alive waits
        self.reading: deque[tuple[float, Conn, int]] = deque()  # (expires, conn, gen) partial requests
        self.busy_since = [0.0] * self.nthreads
        self.free_threads = 0
        self.parked = 0  # threads waiting on their last connection for its next request
        self._unpark_r, self._unpark_w = os.pipe()  # readable: parked threads, leave
        os.set_blocking(self._unpark_r, False)
        self._pollers = threading.local()  # each request thread's poll object (see _park)
        self._unparking = False
        self.rate = 0.0  # requests completed per second, smoothed
        self.completed = 0
        self._claim = threading.Lock()
        self.listener_names: dict[int, Any] = {}
        self.listeners: dict[int, socket.socket] = {}
        self.poller = select.epoll()
        super().init_process()  # loads the app, then run()

    # -------------------------------------------------------------------------- the loop
    def run(self) -> None:
        from . import metrics

        self.metrics = metrics
        self.settled = SettledConfig(self.cfg)  # what _handle and handle_request read
        for listener in self.sockets:
            listener.setblocking(False)
            self.listeners[listener.fileno()] = listener
            self.listener_names[listener.fileno()] = listener.getsockname()
        threads = [threading.Thread(target=self._request_thread, args=(i,), name=f"tfwsgi-req-{i}",
                                    daemon=True) for i in range(self.nthreads)]
        for t in threads:
            t.start()
        self.balance.publish(0)
        self._accepting = False
        self._accept_after = 0.0
        self._set_accepting(True)
        self._housekept = 0.0
        self._beat = 0.0
        self._stuck_logged = False
        self._rate_mark = (time.monotonic(), 0)
        try:
            while self.alive:
                if self.ppid != os.getppid():
                    self.log.info("Parent changed, shutting down: %s", self)
                    break
                self._poll_once(self._next_timeout())
        finally:
            self.balance.withdraw()
            self._stop(threads)

    def _next_timeout(self) -> float:
        now = time.monotonic()
        t = 0.5
        if self.jobs:
            t = min(t, self.jobs[0].deadline - now)
        if not self._accepting and self._accept_after:
            t = min(t, self._accept_after - now)
        return max(t, 0.0)

    def _poll_once(self, timeout: float) -> None:
        try:
            events = self.poller.poll(timeout, 512)
        except OSError as exc:
            if exc.errno != errno.EINTR:
                raise
            events = []
        now = time.monotonic()
        for fd, _ in events:
            listener = self.listeners.get(fd)
            if listener is not None:
                self._accept(listener, now)
                continue
            conn = self.conns.get(fd)
            if conn is not None:
                self._readable(conn, now)
        self._expire_deadlines(now)
        self._unpark_if_short()
        self._unpark_done()
        if not self._accepting and self._accept_after and now >= self._accept_after and self.alive:
            self._set_accepting(True)
        if now - self._housekept >= 0.1 or not self.alive:
            self._housekeeping(now)

    def _set_accepting(self, on: bool) -> None:
        if on == self._accepting:
            return
        for fd in self.listeners:
            if on:
                # Every worker is woken for a new connection (not EPOLLEXCLUSIVE, which wakes one,
                # even a worker that is deferring to a less loaded sibling or is stopped).
                self.poller.register(fd, _EPOLLIN)
            else:
                self.poller.unregister(fd)
        self._accepting = on

    def _accept(self, listener: socket.socket, now: float) -> None:
        if not self.balance.least_loaded():
            # A less loaded sibling should take it: look again in a moment, and take it then.
            if not self._accept_after or now - self._accept_after > 0.1:
                self._accept_after = now + _DEFER_SECONDS
            if now < self._accept_after:
                self._set_accepting(False)
                return
        self._accept_after = 0.0
        for _ in range(64):
            if len(self.conns) >= self.max_connections:
                self._set_accepting(False)
                return
            try:
                sock, addr = listener.accept()
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                    return  # a sibling took it, or nothing left
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    self.log.warning("tfwsgi: out of file descriptors at %d connections",
                                     len(self.conns))
                    self._set_accepting(False)
                    return
                raise
            sock.setblocking(False)
            util.close_on_exec(sock)
            conn = Conn(sock, addr, self.listener_names[listener.fileno()], self.settled.for_peer(addr))
            self.conns[conn.fd] = conn
            self.balance.add(1)
            self.idle.append((now + self.cfg.keepalive, conn, conn.gen))
            self.poller.register(conn.fd, _ARM)
            if not self.balance.least_loaded():
                return

    def _readable(self, conn: Conn, now: float) -> None:
        """Read what a connection sent; queue a request once it is all in."""
        conn.gen += 1
        try:
            data = conn.sock.recv(_RECV)
        except BlockingIOError:
            self._rearm(conn, now)
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        if not conn.buf:
            conn.first_byte = now
        conn.buf += data
        self._dispatch(conn, now)

    def _dispatch(self, conn: Conn, now: float) -> None:
        extent = request_extent(conn.buf, self.max_body)
        if extent == NEED_MORE:
            if not conn.continued and wants_continue(conn.buf):
                conn.continued = True
                try:
                    conn.sock.send(_CONTINUE)
                except OSError:
                    self._close(conn)
                    return
            self._rearm(conn, now)
            return
        if self.waiting >= waiting_bound(self.max_waiting, self.rate, self.deadline_s, self.nthreads):
            self._shed(conn, extent, now)
            return
        self._enqueue(Job(conn, now, now + self.deadline_s))

    def _enqueue(self, job: Job) -> None:
        job.conn.held = True
        with self._claim:
            self.waiting += 1
        self.jobs.append(job)
        self.ready.put(job)
        self._unpark_if_short()

    def _unpark_if_short(self) -> None:
        """A request waits and no thread is free: threads parked on idle connections leave them."""
        if self.waiting and not self.free_threads and self.parked and not self._unparking:
            self._unparking = True
            with contextlib.suppress(BlockingIOError):
                os.write(self._unpark_w, b"!")

    def _unpark_done(self) -> None:
        """The loop: once every parked thread has left, parking may start again."""
        if self._unparking and not self.parked:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._unpark_r, 4096):
                    pass
            self._unparking = False

    def _shed(self, conn: Conn, extent: int, now: float) -> None:
        """Overload: answer 503 at once, keeping the connection when the request's end is known."""
        self.metrics.count_dropped("overload")
        retry = max(1, math.ceil(self.waiting / self.rate)) if self.rate > 0 else 1
        keep = extent > 0
        response = error_response(
            503, "Service Unavailable",
            f"Server overloaded: {self.waiting} requests are waiting in this worker; retry later",
            headers=(("Retry-After", str(retry)),), close=not keep)
        try:
            sent = conn.sock.send(response)
        except OSError:
            sent = -1
        if not keep or sent != len(response):
            self._close(conn)
            return
        del conn.buf[:extent]
        conn.continued = False
        if conn.buf:
            conn.first_byte = now
            self._dispatch(conn, now)
        else:
            self._rearm(conn, now)

    def _rearm(self, conn: Conn, now: float) -> None:
        """Give a connection back to the loop: wait for its bytes, under a timer."""
        conn.held = False
        conn.gen += 1
        if conn.buf:
            self.reading.append((conn.first_byte + min(self.deadline_s, READ_SECONDS), conn, conn.gen))
        else:
            self.idle.append((now + self.cfg.keepalive, conn, conn.gen))
        try:
            self.poller.modify(conn.fd, _ARM)
        except OSError:
            self._close(conn)

    def _close(self, conn: Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        if self.conns.get(conn.fd) is conn:
            del self.conns[conn.fd]  # before close: the number may be reused at once
        util.close(conn.sock)
        self.balance.add(-1)

    # -------------------------------------------------------------------------- timers
    def _expire_deadlines(self, now: float) -> None:
        """Answer requests still unanswered at their deadline (504), in arrival order."""
        jobs = self.jobs
        while jobs and (jobs[0].done or jobs[0].deadline <= now):
            job = jobs.popleft()
            if job.done:
                continue
            with self._claim:
                if job.answered:
                    continue
                job.answered = True
            self.metrics.count_dropped("deadline")
            conn = job.conn
            try:
                conn.sock.send(deadline_response(self.timeout_ms))
                conn.sock.shutdown(socket.SHUT_RDWR)  # the thread that holds it closes it
            except OSError:
                pass

    def _housekeeping(self, now: float) -> None:
        self._housekept = now
        for timers, status in ((self.idle, None), (self.reading, 408)):
            while timers and timers[0][0] <= now:
                _, conn, gen = timers.popleft()
                if conn.gen != gen or conn.closed:
                    continue  # it moved on since
                if status is not None and self.alive:
                    with contextlib.suppress(OSError):
                        conn.sock.send(error_response(408, "Request Timeout",
                                                      "The request was not received in time"))
                self._close(conn)
        if not self._accepting and self.alive and len(self.conns) < self.max_connections and (
                not self._accept_after or now >= self._accept_after):
            self._set_accepting(True)  # below the connection cap again
        oldest = min((t for t in self.busy_since if t), default=0.0)
        stuck = oldest and now - oldest > self.cfg.timeout
        if stuck:
            if not self._stuck_logged:
                self.log.error("tfwsgi: a request thread has been on one request for %.0fs (over "
                               "gunicorn's timeout): no heartbeat, so this worker is replaced",
                               now - oldest)
                self._stuck_logged = True
        elif now - self._beat >= 0.5:
            self._beat = now
            self.notify()
        mark_t, mark_n = self._rate_mark
        if now - mark_t >= 1.0:
            done = self.completed
            measured = (done - mark_n) / (now - mark_t)
            self.rate = measured if self.rate == 0 else 0.7 * self.rate + 0.3 * measured
            self._rate_mark = (now, done)
            self.metrics.set_connection_state(len(self.conns), self.waiting)

    def _stop(self, threads: list[threading.Thread]) -> None:
        """Stop: no new connections; the loop goes on serving the ones it holds, each answer
        saying ``Connection: close``, so a request sent on a kept-alive connection just as the
        worker stops is answered, not dropped; idle connections close at their keep-alive
        timeout. All within gunicorn's graceful timeout."""
        self._set_accepting(False)
        deadline = time.monotonic() + self.cfg.graceful_timeout
        while self.conns and time.monotonic() < deadline:
            self._poll_once(0.05)
        for _ in threads:
            self.ready.put(None)
        for conn in list(self.conns.values()):
            self._close(conn)

    # -------------------------------------------------------------------------- request threads
    def _request_thread(self, index: int) -> None:
        if self.sched_batch:
            with contextlib.suppress(OSError):  # not allowed here: the normal policy, then
                os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        while True:
            with self._claim:
                self.free_threads += 1
            job = self.ready.get()
            with self._claim:
                self.free_threads -= 1
                if job is not None:
                    self.waiting -= 1
            if job is None:
                return
            try:
                self._serve(index, job, queued=True)
            except Exception:  # never lose the thread
                self.log.exception("tfwsgi: error serving a connection")
                self._finish(job.conn, None)

    def _serve(self, index: int, job: Job | None, queued: bool = False) -> None:
        """Serve ``job``, then the connection's next requests while they come without waiting.
        A job is dropped before it runs when its deadline passed while it waited (504), or, for
        one that waited in the queue (``queued``), when its client closed the connection
        meanwhile (as nginx drops a request whose client closed, its 499): a worker then does
        not spend the time its whole queue takes on answers nobody reads, as after a load
        balancer or a benchmark drops thousands of connections at once."""
        while job is not None:
            conn = job.conn
            now = time.monotonic()
            self.metrics.observe_wait(now - job.arrived)
            gone = queued and _client_gone(conn.sock)
            queued = False  # the connection's next requests are read by this thread
            with self._claim:
                dropped = job.answered or gone or now >= job.deadline
                reason = None
                if dropped and not job.answered:
                    job.answered = True
                    reason = "client_closed" if gone else "deadline"
            if dropped:
                if reason is not None:
                    self.metrics.count_dropped(reason)
                if reason == "deadline":
                    with contextlib.suppress(OSError):
                        Channel(conn, job.deadline).sendall(deadline_response(self.timeout_ms))
                job.done = True
                self._finish(conn, None)
                return
            self.busy_since[index] = now
            try:
                keep = self._handle(conn, job)
            finally:
                self.busy_since[index] = 0.0
                job.done = True
                self.completed += 1
            if not keep:
                self._finish(conn, None)
                return
            job = self._next_job(conn)

    def _next_job(self, conn: Conn) -> Job | None:
        """The connection's next request if it is already in, or arrives while this thread has
        nothing else to do (see ``PARK_SECONDS``); else the loop takes the connection back."""
        now = time.monotonic()
        if not conn.buf and self._park(conn):
            try:
                data = conn.sock.recv(_RECV)
            except BlockingIOError:
                data = None
            except OSError:
                data = b""
            if data == b"":
                self._finish(conn, None)
                return None
            if data:
                now = time.monotonic()
                conn.first_byte = now
                conn.buf += data
        if conn.buf:
            extent = request_extent(conn.buf, self.max_body)
            if extent != NEED_MORE:  # (when stopping, answered with Connection: close)
                job = Job(conn, now, now + self.deadline_s)
                self.jobs.append(job)
                return job
        self._finish(conn, now)
        return None

    def _park(self, conn: Conn) -> bool:
        """Wait on the connection while no request waits and another thread is free; True when
        it has bytes (or closed), False on the unpark signal or after ``PARK_SECONDS``."""
        with self._claim:
            if self.waiting or not self.free_threads or self._unparking or not self.alive:
                return False
            self.parked += 1
        poller = self._pollers.__dict__.get("poller")
        if poller is None:  # one a thread, watching the unpark pipe; the connection comes and goes
            poller = self._pollers.poller = select.poll()
            poller.register(self._unpark_r, select.POLLIN)
        try:
            poller.register(conn.fd, select.POLLIN)
            events = poller.poll(PARK_SECONDS * 1000)
            return any(fd == conn.fd for fd, _ in events)
        finally:
            poller.unregister(conn.fd)
            with self._claim:
                self.parked -= 1

    def _finish(self, conn: Conn, now: float | None) -> None:
        """A thread lets go of a connection: back to the loop (``now`` given) or closed. While
        the worker stops, the loop still serves a kept-alive connection until its idle timeout,
        so a request sent on it meanwhile is answered (with ``Connection: close``)."""
        if now is None:
            self._close(conn)
            return
        if conn.buf and request_extent(conn.buf, self.max_body) != NEED_MORE:
            self._enqueue(Job(conn, now, now + self.deadline_s))
            return
        self._rearm(conn, now)

    def _handle(self, conn: Conn, job: Job) -> bool:
        """Parse and answer one request with gunicorn's parser; True if the connection stays.
        Its error handling is adapted from gunicorn 27.0 ``workers/gthread.py``
        ``ThreadWorker.handle`` (no TLS here, so no ``ssl.SSLError`` branch; a response the loop
        already answered at its deadline is not answered again by ``handle_error``)."""
        channel = Channel(conn, job.deadline)
        parser = http.get_parser(conn.cfg or self.settled, channel, conn.addr)
        parser.req_count = conn.served
        req = None
        try:
            req = next(parser)
            if not req:
                return False
            conn.served += 1
            last = conn.served >= MAX_KEEPALIVE_REQUESTS
            if not self.handle_request(conn, channel, req, job, last):
                return False
            if not parser.finish_body():
                return False
            conn.buf = bytearray(parser.unreader.take_buffered() + channel.rest())
            conn.continued = False
            return True
        except (http.errors.NoMoreData, StopIteration, TimeoutError):
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF):
                self.log.exception("Socket error processing request.")
            return False
        except Exception as exc:
            with self._claim:
                claimed = not job.answered
                job.answered = True
            if claimed:
                self.handle_error(req, channel, conn.addr, exc)
            return False

    def handle_request(self, conn: Conn, channel: Channel, req: Any, job: Job, last: bool) -> bool:
        """One request (as gunicorn's own workers do); True if the connection stays open.
        Adapted from gunicorn 27.0 (27.0.1) ``workers/gthread.py`` ``ThreadWorker.handle_request``
        (setup.cfg pins gunicorn to 27.x). Where it differs: the response is written only if the
        loop has not answered the request's deadline first; it reads and writes through a
        ``Channel``, not the socket, and puts ``tfwsgi.deadline`` in the environ; the keep-alive
        cap is ``MAX_KEEPALIVE_REQUESTS`` per connection (``last``), not gthread's
        ``max_keepalived`` connections; after an error once headers are sent, upstream calls
        ``util.close_graceful(conn.sock)`` before ``StopIteration`` while here the loop closes
        the connection (``_finish``)."""
        environ: dict[str, Any] = {}
        resp = None
        try:
            cfg = self.settled
            cfg.pre_request(self, req)
            request_start = datetime.now()
            resp, environ = wsgi.create(req, channel, conn.addr, conn.server, cfg, Response)
            environ["wsgi.multithread"] = True
            environ["tfwsgi.deadline"] = job.deadline
            self.nr += 1
            if self.nr >= self.max_requests and self.alive:
                self.log.info("Autorestarting worker after current request.")
                self.alive = False
            if last or not self.alive or not cfg.keepalive:
                resp.force_close()
            respiter = self.wsgi(environ, resp.start_response)
            try:
                with self._claim:
                    mine = not job.answered
                    job.answered = True
                if not mine:  # the loop answered 504 at the deadline meanwhile
                    return False
                if not self.alive:  # stopping while the app ran: say so in this response's headers
                    resp.force_close()
                if isinstance(respiter, environ["wsgi.file_wrapper"]):
                    resp.write_file(respiter)
                else:
                    channel.cork()
                    try:
                        for item in respiter:
                            resp.write(item)
                        resp.close()
                    finally:
                        channel.uncork()
            finally:
                self.log.access(resp, req, environ, datetime.now() - request_start)
                if hasattr(respiter, "close"):
                    respiter.close()
            return not resp.should_close()
        except OSError:
            util.reraise(*sys.exc_info())
        except (Exception, SystemExit):
            if resp and resp.headers_sent:
                self.log.exception("Error handling request")
                raise StopIteration() from None
            raise
        finally:
            try:
                self.settled.post_request(self, req, environ, resp)
            except Exception:
                self.log.exception("Exception in post_request hook")
        return False


# The name gunicorn_conf.py used before: -k tfwsgi.worker.ThreadWorker keeps working.
ThreadWorker = EventWorker
