"""The baseline for the cache benchmark: a bare Flask route that does one memcached get.

gunicorn -w 2 bench.peers.bare_memcached:app, with BENCH_MEMCACHED=host:port (any worker class:
each thread has its own connection).
"""

from __future__ import annotations

import os
import threading

from flask import Flask, Response
from pymemcache.client.base import Client

app = Flask(__name__)
_local = threading.local()
KEY = "bench:bare"


def client() -> Client:
    c = getattr(_local, "client", None)
    if c is None:  # after fork, once per worker thread
        host, port = os.environ["BENCH_MEMCACHED"].rsplit(":", 1)
        c = _local.client = Client((host, int(port)), connect_timeout=0.1, timeout=0.1)
    return c


@app.post("/get")
def get() -> Response:
    value = client().get(KEY)
    return Response(value or b"{}", mimetype="application/json")
