"""The baseline for the cache benchmark: a bare Flask route that does one memcached get.

gunicorn -w 2 bench.peers.bare_memcached:app, with BENCH_MEMCACHED=host:port.
"""

from __future__ import annotations

import os

from flask import Flask, Response
from pymemcache.client.base import Client

app = Flask(__name__)
_client: Client | None = None
KEY = "bench:bare"


def client() -> Client:
    global _client
    if _client is None:  # after fork, once per worker
        host, port = os.environ["BENCH_MEMCACHED"].rsplit(":", 1)
        _client = Client((host, int(port)), connect_timeout=0.1, timeout=0.1)
    return _client


@app.post("/get")
def get() -> Response:
    value = client().get(KEY)
    return Response(value or b"{}", mimetype="application/json")
