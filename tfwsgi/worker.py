"""``tfwsgi.worker.ThreadWorker``: a keep-alive gunicorn worker with one thread per connection.

gunicorn's ``gthread`` worker hands every request of a kept-alive connection from its event loop
to a thread pool and back (a future, a pipe write, two epoll registrations per request), and its
accept loop lets one worker take every connection of a burst, so the other workers idle (measured:
one of two workers held all 32 wrk connections). Here each connection is served start to end by
one thread, blocking on its own socket between requests, which is what concurrent requests for
the dynamic batcher need and costs no more per request than the ``sync`` worker. Connections are
spread over the workers: a worker takes a new one only while it holds no more connections than
the least loaded of its siblings (a counter per worker in memory shared by the master), or when
nobody else took it within a few milliseconds.

Parsing and responses are gunicorn's own (``gunicorn.http``, with its C parser ``gunicorn_h1c``
under ``http_parser = auto``), so its request limits, smuggling defences, access log and
``pre_request``/``post_request`` hooks apply unchanged.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import select
import socket
import struct
import sys
import threading
import time
from datetime import datetime
from typing import Any

from gunicorn import http, sock, util
from gunicorn.http import wsgi
from gunicorn.workers import base

# One signed 64-bit counter per worker slot (worker age modulo _SLOTS): its open connections,
# or -1 when it is not accepting. Created by the master (check_config runs before any fork).
_SLOTS = 512
_COUNTER = struct.Struct("<q")
_TIMEVAL = struct.Struct("@ll")
_shared: mmap.mmap | None = None

# How long a connection waits for a less loaded sibling before this worker takes it anyway.
_DEFER_SECONDS = 0.002
# Requests served on one connection before it is closed (nginx's keepalive_requests default):
# clients reconnect, which keeps the spread of connections over workers fresh.
MAX_KEEPALIVE_REQUESTS = 1000


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

    def least_loaded(self) -> bool:
        """True when no accepting sibling holds fewer connections than this worker."""
        if self._shared is None:
            return True
        mine = self.connections
        return not any(0 <= count < mine for (count,) in _COUNTER.iter_unpack(self._shared))


class ThreadWorker(base.Worker):
    """Keep-alive HTTP/1.1 with one thread per connection, up to ``threads`` connections a worker."""

    alive: bool

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        global _shared
        if _shared is None:
            _shared = _new_shared()

    def init_process(self) -> None:
        self.balance = Balance(_shared, self.age)
        self.connections: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.max_connections = max(1, self.cfg.threads)
        self.listener_names: dict[socket.socket, Any] = {}
        super().init_process()  # loads the app, then run()

    def run(self) -> None:
        for listener in self.sockets:
            listener.setblocking(False)
            self.listener_names[listener] = listener.getsockname()
        threads = [threading.Thread(target=self._connection_thread, name=f"tfwsgi-conn-{i}", daemon=True)
                   for i in range(self.max_connections)]
        for t in threads:
            t.start()
        self.balance.publish(0)
        try:
            self._accept_loop()
        finally:
            self.balance.publish(-1)
            self._drain(threads)

    def _accept_loop(self) -> None:
        waited_since = 0.0
        while self.alive:
            self.notify()
            if self.ppid != os.getppid():
                self.log.info("Parent changed, shutting down: %s", self)
                return
            if self.balance.connections >= self.max_connections:
                time.sleep(0.005)  # every thread holds a connection: leave new ones to the others
                continue
            try:
                ready, _, _ = select.select(self.sockets, [], [], 1.0)
            except OSError as exc:
                if exc.errno in (errno.EINTR, errno.EBADF):
                    continue
                raise
            if not ready:
                waited_since = 0.0
                continue
            if not self.balance.least_loaded():
                now = time.monotonic()
                waited_since = waited_since or now
                if now - waited_since < _DEFER_SECONDS:
                    time.sleep(_DEFER_SECONDS / 4)  # a less loaded sibling should take it
                    continue
            waited_since = 0.0
            for listener in ready:
                self._accept(listener)

    def _accept(self, listener: socket.socket) -> None:
        try:
            client, addr = listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                return  # a sibling took it
            raise
        client.setblocking(True)
        util.close_on_exec(client)
        self.balance.add(1)
        self.connections.put((client, addr, listener))

    def _drain(self, threads: list[threading.Thread]) -> None:
        """Stop: connections finish their current request (answered with ``Connection: close``);
        idle ones end at their keep-alive timeout; then the threads exit."""
        deadline = time.monotonic() + self.cfg.graceful_timeout
        while self.balance.connections > 0 and time.monotonic() < deadline:
            self.notify()
            time.sleep(0.05)
        for _ in threads:
            self.connections.put(None)

    def _connection_thread(self) -> None:
        while True:
            item = self.connections.get()
            if item is None:
                return
            client, addr, listener = item
            try:
                self._serve(client, addr, listener)
            finally:
                util.close(client)
                self.balance.add(-1)

    def _serve(self, client: socket.socket, addr: Any, listener: socket.socket) -> None:
        """Serve requests on one connection until it closes, idles past ``keepalive``, or stops."""
        req = None
        try:
            if self.cfg.is_ssl:
                client = sock.ssl_wrap_socket(client, self.cfg)
            # Waiting for a request (and for each read of one) ends after the keep-alive timeout.
            # The kernel's receive timeout, not settimeout(): that makes Python poll() before
            # every recv() and send(), two system calls where one does (measured: 5.5k against
            # 9k req/s for a bare WSGI app).
            timeout = _TIMEVAL.pack(max(self.cfg.keepalive, 1), 0)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
            parser = http.get_parser(self.cfg, client, addr)
            served = 0
            while True:
                req = next(parser)
                if not req:
                    return
                served += 1
                last = served >= MAX_KEEPALIVE_REQUESTS
                if not self.handle_request(listener, req, client, addr, last):
                    return
                deadline = time.monotonic() + max(self.cfg.keepalive, 1)
                if not parser.finish_body(deadline=deadline):
                    return
                req = None
        except (http.errors.NoMoreData, StopIteration, TimeoutError, BlockingIOError):
            return  # the client closed, or went quiet (EAGAIN: the receive timeout)
        except OSError as exc:
            if exc.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                self.log.exception("Socket error processing request.")
        except Exception as exc:
            self.handle_error(req, client, addr, exc)

    def handle_request(self, listener: socket.socket, req: Any, client: socket.socket, addr: Any,
                       last: bool) -> bool:
        """One request (as gunicorn's own workers do); True if the connection stays open."""
        environ: dict[str, Any] = {}
        resp = None
        try:
            self.cfg.pre_request(self, req)
            request_start = datetime.now()
            resp, environ = wsgi.create(req, client, addr, self.listener_names[listener], self.cfg)
            environ["wsgi.multithread"] = True
            self.nr += 1
            if self.nr >= self.max_requests and self.alive:
                self.log.info("Autorestarting worker after current request.")
                self.alive = False
            if last or not self.alive or not self.cfg.keepalive:
                resp.force_close()
            respiter = self.wsgi(environ, resp.start_response)
            if not self.alive:  # stopping while the app ran: say so in this response's headers
                resp.force_close()
            try:
                if isinstance(respiter, environ["wsgi.file_wrapper"]):
                    resp.write_file(respiter)
                else:
                    for item in respiter:
                        resp.write(item)
                resp.close()
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
                self.cfg.post_request(self, req, environ, resp)
            except Exception:
                self.log.exception("Exception in post_request hook")
        return False
