"""Instructions a REST predict request costs in a worker, counted by callgrind (fake servable).

    .venv/bin/python bench/request_instructions.py [--requests 2000] [--tree DIR] [--batching false]

Runs the real request path in process: ``tfwsgi.worker.EventWorker._handle`` on a socketpair, so
gunicorn's parser and response, the Flask app (``tfwsgi.application.create_app`` over
tests/unit/fakes.py's manager), the core, the batcher and its thread. The model is a numpy
function standing in for the reference MLP (784 floats in, 10 out), not TensorFlow. It runs under
valgrind's callgrind twice, with 100 requests and with 100 + ``--requests``, and prints the
difference per request.

Why: instruction counts do not move with the machine's load, so a change of 1% shows, where
wall-clock rates on this shared machine move by 10-50% between runs. Not a throughput figure:
threads contending for the GIL, TensorFlow and the network are not in it. gunicorn's C parser
(gunicorn_h1c) uses SSE4.2 string instructions valgrind cannot run, so gunicorn's Python parser
reads the requests here (the same for every tree compared). ``--tree`` measures another checkout
(its tfwsgi and tests/unit/fakes.py; this checkout's venv).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WARMUP = 100


def serve(tree: Path, count: int, batching: bool) -> None:
    """The child: build the app over the fakes and answer ``WARMUP + count`` requests."""
    sys.path[:0] = [str(tree), str(tree / "tests" / "unit"), str(tree / "tests"), str(ROOT / "bench")]
    import numpy as np
    from gunicorn.config import Config
    from gunicorn.glogging import Logger
    from throughput_bench import body_for

    import fakes
    from tfwsgi import worker as W

    f32 = np.dtype("float32")

    def mlp(name: str, version: int, path: str) -> fakes.FakeServable:
        def run(x: np.ndarray) -> dict[str, np.ndarray]:
            return {"y": np.ascontiguousarray(x[:, :10], dtype=np.float32)}

        return fakes.FakeServable(name, version, path, [fakes.FakeSignature(
            "serving_default", {"x": f32}, {"y": f32}, run, {"x": (None, 784)})])

    app = fakes.make_app(Path(tempfile.mkdtemp(prefix="tfwsgi-instr-")), [fakes.FakeModel("m", {1: mlp})],
                         enable_batching=batching, cache_enabled=False)
    cfg = Config()
    cfg.set("http_parser", "python")
    worker = object.__new__(W.EventWorker)  # only what _handle reads: no loop, no listeners
    worker.cfg, worker.log, worker.wsgi = cfg, Logger(cfg), app
    worker.alive, worker.nr, worker.max_requests = True, 0, 10**9
    worker._claim = threading.Lock()
    worker.settled = W.SettledConfig(cfg)
    body = body_for((1, 784)).encode()
    request = (b"POST /v1/models/m:predict HTTP/1.1\r\nHost: 127.0.0.1:8501\r\nUser-Agent: wrk\r\n"
               b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
    ours, client = __import__("socket").socketpair()
    ours.setblocking(False)
    peer = ("127.0.0.1", 5555)
    conn = W.Conn(ours, peer, ("127.0.0.1", 8501))
    if hasattr(worker.settled, "for_peer"):
        conn.cfg = worker.settled.for_peer(peer)
    for _ in range(WARMUP + count):
        client.sendall(request)
        conn.buf, conn.served = bytearray(), 0
        kept = worker._handle(conn, W.Job(conn, time.monotonic(), time.monotonic() + 30))
        answer = client.recv(1 << 16)
        if not kept or b" 200 " not in answer[:16]:
            raise SystemExit(f"unexpected answer: {answer[:300]!r}")


def instructions(tree: Path, count: int, batching: bool) -> int:
    env = dict(os.environ, PYTHONHASHSEED="0")
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__,
         "--child", str(count), "--tree", str(tree), "--batching", str(batching).lower()],
        env=env, capture_output=True, text=True, check=False)
    found = re.search(r"Collected : (\d+)", out.stderr)
    if out.returncode or not found:
        raise SystemExit(f"callgrind run failed ({out.returncode}):\n"
                         f"{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return int(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--tree", type=Path, default=ROOT)
    parser.add_argument("--batching", choices=("true", "false"), default="true")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    batching = args.batching == "true"
    if args.child is not None:
        serve(args.tree.resolve(), args.child, batching)
        return 0
    base = instructions(args.tree.resolve(), 0, batching)
    more = instructions(args.tree.resolve(), args.requests, batching)
    print(f"{args.tree}: {(more - base) / args.requests:,.0f} instructions a request "
          f"({args.requests} requests, batching {args.batching}, callgrind)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
