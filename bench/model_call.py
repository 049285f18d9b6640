"""CPU time of one model call: tfwsgi's Session callable against TensorFlow's eager call.

    .venv/bin/python bench/model_call.py [--calls 3000] [--batches 1,5,16]

Builds the reference MLP (bench/reference_models.py), loads it as a worker does
(``servable.Servable``, one intra-op thread, one inter-op thread) and, for comparison, with
``tf.saved_model.load``, then calls each ``--calls`` times per batch size in one thread and
reports CPU time a call: the whole process's (``time.process_time``: TensorFlow's own threads
included) and the calling thread's. Each figure is the median of ``--rounds`` rounds, with the
range. The eager call is the public one (``signature(**feeds)``); tfwsgi before December 2026
called the same function flat, which skipped ~60 µs of its keyword binding.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def measure(call, calls: int, rounds: int) -> tuple[list[float], list[float]]:
    for _ in range(min(300, calls)):
        call()
    process, thread = [], []
    for _ in range(rounds):
        p0, t0 = time.process_time(), time.thread_time()
        for _ in range(calls):
            call()
        process.append((time.process_time() - p0) / calls * 1e6)
        thread.append((time.thread_time() - t0) / calls * 1e6)
    return process, thread


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batches", default="1,5,16")
    args = ap.parse_args()

    from tfwsgi import servable

    servable.configure_threads(1, 1)
    servable.initialize_runtime()
    import numpy as np
    import tensorflow as tf
    from reference_models import build_mlp

    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "mlp" / "1"
        build_mlp(path)
        sig = servable.Servable("m", 1, str(path)).signature("")
        eager = tf.saved_model.load(str(path)).signatures["serving_default"]
        print("| batch | caller | process CPU µs a call | calling thread µs a call |")
        print("|---|---|---|---|")
        for batch in (int(b) for b in args.batches.split(",")):
            x = np.random.default_rng(0).random((batch, 784)).astype(np.float32)
            def session_call(x=x):
                return sig.run({"x": x})["y"]

            def eager_call(x=x):
                return eager(x=tf.constant(x))["y"].numpy()

            np.testing.assert_allclose(session_call(), eager_call(), rtol=1e-5, atol=1e-6)
            for name, call in (("tfwsgi (Session callable)", session_call),
                               ("eager signature call", eager_call)):
                process, thread = measure(call, args.calls, args.rounds)
                print(f"| {batch} | {name} | {fmt(process)} | {fmt(thread)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
