"""Where a version swap's memory goes, in one process (issue 7's soak step).

    .venv/bin/python bench/swap_memory.py [--swaps 5] [--requests 3000] [--threads 8]

Loads the reference MLP through tfwsgi's manager as a worker does (threads fitted, malloc arenas
capped, warmup), serves predictions through the Flask app from several threads with a real
memcached as the cache (60% hits, 30% misses, 10% 404s), then renames versions 2, 3 … into the
base path and lets the manager swap to each. After every step it prints the process's PSS and
anonymous memory (/proc/self/smaps_rollup), glibc's heap (mallinfo2), pymalloc's arenas, the
number of functions in TensorFlow's eager context and which versions' servables are still alive.
Anonymous memory is the figure to read: PSS also counts TensorFlow's shared libraries, whose share
moves with the other processes mapping them.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def rollup() -> dict[str, int]:
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Pss", "Anonymous"):
                out[key] = int(rest.split()[0])
    return out


def pymalloc_arenas() -> str:
    with tempfile.TemporaryFile("w+") as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(tmp.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        m = re.search(r"# arenas allocated current\s*=\s*(\d+)", tmp.read())
    return m.group(1) if m else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--swaps", type=int, default=5)
    parser.add_argument("--requests", type=int, default=3000, help="per round; two rounds a step")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--warm-rounds", type=int, default=3, help="rounds on version 1 first")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tfwsgi-swapmem-"))
    from conftest import MemcachedServer

    mc = MemcachedServer(memory_mb=256)
    try:
        run(args, work, mc.address)
    finally:
        mc.stop()
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path, memcached: str) -> None:
    src, base = work / "src", work / "m"
    code = ("import sys; sys.path.insert(0, 'bench'); from pathlib import Path; "
            "from reference_models import build_mlp\n"
            f"for v in range(1, {args.swaps + 2}): build_mlp(Path({str(src)!r}) / str(v), seed=v - 1)")
    # Built in another process, so that this one's memory is only what serving costs.
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    base.mkdir()
    shutil.copytree(src / "1", base / "1")
    os.environ.update({"TFWSGI_MODEL_NAME": "m", "TFWSGI_MODEL_BASE_PATH": str(base),
                       "TFWSGI_MEMCACHED": memcached, "TF_CPP_MIN_LOG_LEVEL": "2",
                       "OMP_NUM_THREADS": "1"})
    import numpy as np
    from tensorflow.python.eager import context

    from tfwsgi import hooks
    from tfwsgi.application import create_app
    from tfwsgi.manager import manager_from_settings
    from tfwsgi.servable import configure_threads
    from tfwsgi.settings import from_env

    configure_threads(1, 1)  # as hooks.post_fork fits them for 2 workers on 2 cores
    hooks._limit_malloc_arenas()
    settings = from_env()
    mgr = manager_from_settings(settings)
    mgr.load_all()
    app = create_app(mgr, settings)
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    vector = ",".join(f"{v:.4f}" for v in np.random.default_rng(0).random(783))
    counter = iter(range(10**9))
    alive: dict[int, weakref.ref] = {}
    previous = rollup()

    def drive(n: int) -> None:
        client = app.test_client()
        for _ in range(n):
            i = next(counter)
            if i % 10 == 0:
                r = client.post("/v1/models/nope:predict", data='{"instances": [[1.0]]}')
                assert r.status_code == 404
                continue
            last = (i % 16) / 16 if i % 10 <= 6 else 2 + i * 8
            r = client.post("/v1/models/m:predict", data='{"instances": [[' + vector + f",{last:.4f}]]}}")
            assert r.status_code == 200, r.data

    def load() -> None:
        threads = [threading.Thread(target=drive, args=(args.requests // args.threads,))
                   for _ in range(args.threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def report(label: str) -> None:
        nonlocal previous
        for state in mgr.status("m"):
            if state.servable is not None and state.version not in alive:
                alive[state.version] = weakref.ref(state.servable)
        now = rollup()
        m = libc.mallinfo2()
        print(f"{label:32} PSS {now['Pss'] / 1024:6.1f} MB  anonymous {now['Anonymous'] / 1024:6.1f} MB "
              f"({(now['Anonymous'] - previous['Anonymous']) / 1024:+5.2f})  malloc heap "
              f"{m.arena >> 10}k (in use {m.uordblks >> 10}k) mmapped {m.hblkhd >> 10}k  "
              f"pymalloc arenas {pymalloc_arenas()}  objects {len(gc.get_objects())}  "
              f"eager functions {len(context.context().list_function_names())}  servables alive "
              f"{[v for v, ref in alive.items() if ref() is not None]}", flush=True)
        previous = now

    report("version 1 loaded")
    for r in range(args.warm_rounds):
        load()
        report(f"version 1, round {r + 1}")
    for v in range(2, args.swaps + 2):
        shutil.copytree(src / str(v), base / str(v))
        started = time.monotonic()
        watcher = threading.Thread(target=mgr.source.propose)  # the watcher's own thread, as in a worker
        watcher.start()
        watcher.join()
        report(f"swapped to {v} in {time.monotonic() - started:.2f}s")
        load()
        report(f"version {v}, round 1")
        load()
        report(f"version {v}, round 2")
        shutil.rmtree(base / str(v - 1))


if __name__ == "__main__":
    main()
