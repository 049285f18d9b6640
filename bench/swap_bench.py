"""Version-swap benchmark: time to serve a new version, worker memory during the swap, failures.

    .venv/bin/python bench/swap_bench.py [--clients 8] [--hidden 4096]

Measures, under continuous load from several clients on loopback, the two ways a prefork server
can move to a new version: (a) tfwsgi's own per-worker watcher (each worker loads the new version
in the background while the old one answers, then drops the old one), and (b) gunicorn's graceful
worker rotation (SIGHUP: new workers load the latest version, old ones are stopped). Writes
docs/swap-benchmark.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

sys.path.insert(0, str(ROOT / "bench"))

from reference_models import build_mlp  # noqa: E402

from conftest import Server  # noqa: E402


def smaps_kb(pid: int, field: str) -> int:
    """One field of a process's /proc/<pid>/smaps_rollup, in kB (0 once the process is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kb(pid: int) -> int:
    return smaps_kb(pid, "Pss")


class Probe:
    """Clients asking for a prediction, and a sampler of every worker's memory."""

    def __init__(self, srv: Server, body: dict, clients: int) -> None:
        self.srv, self.body = srv, body
        self.results: list[tuple[float, float, int, tuple]] = []  # start, latency, status, answer
        self.memory: list[tuple[float, dict[int, int]]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client) for _ in range(clients)]
        self._threads.append(threading.Thread(target=self._sampler))

    def _client(self) -> None:
        url = self.srv.url + "/v1/models/mlp:predict"
        with requests.Session() as s:
            while not self._stop.is_set():
                t = time.monotonic()
                try:
                    r = s.post(url, json=self.body, headers={"Cache-Control": "no-store"}, timeout=60)
                    answer = tuple(np.round(r.json()["predictions"][0], 4)) if r.ok else ()
                    self.results.append((t, time.monotonic() - t, r.status_code, answer))
                except requests.RequestException:
                    self.results.append((t, time.monotonic() - t, 0, ()))

    def _sampler(self) -> None:
        while not self._stop.is_set():
            self.memory.append((time.monotonic(), {p: pss_kb(p) for p in self.srv.worker_pids()}))
            time.sleep(0.1)

    def __enter__(self) -> Probe:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)


def run(mechanism: str, work: Path, clients: int) -> dict:
    base = work / f"mlp-{mechanism}"
    base.mkdir()
    shutil.copytree(work / "v1", base / "1")
    env = {"TFWSGI_MODEL_NAME": "mlp", "TFWSGI_MODEL_BASE_PATH": str(base)}
    if mechanism == "sighup":
        env["TFWSGI_FILE_SYSTEM_POLL_WAIT_SECONDS"] = "0"  # only a reload looks at the disk
    srv = Server(env, workers=2, log_path=work / f"{mechanism}.log")
    x = np.random.default_rng(7).random((1, 784)).astype("float32").tolist()
    try:
        srv.wait_ready()
        with Probe(srv, {"instances": x}, clients) as probe:
            time.sleep(3)
            answers = {a for _, _, code, a in probe.results if code == 200}
            assert len(answers) == 1, answers
            old = answers.pop()
            tmp = work / f"incoming-{mechanism}"
            shutil.copytree(work / "v2", tmp)
            started = time.monotonic()
            os.rename(tmp, base / "2")
            if mechanism == "sighup":
                os.kill(srv.pid, signal.SIGHUP)
            first_new = all_new = None
            deadline = started + 120
            while time.monotonic() < deadline:
                # When answers arrive (a request may wait in the listen queue during a rotation).
                recent = [(t + lat, a) for t, lat, code, a in probe.results
                          if t + lat >= started and code == 200]
                new = [t for t, a in recent if a != old]
                if new and first_new is None:
                    first_new = min(new)
                if first_new is not None:
                    after = [a for t, a in recent if t > time.monotonic() - 1.0]
                    if len(after) > 20 and all(a != old for a in after):
                        all_new = max(t for t, a in recent if a == old) if any(
                            a == old for _, a in recent) else first_new
                        break
                time.sleep(0.1)
            time.sleep(3)
        before = [m for t, m in probe.memory if t < started]
        during = [m for t, m in probe.memory if started <= t <= (all_new or started) + 3]
        after = [m for t, m in probe.memory if t > (all_new or started) + 3]
        failed = sum(1 for _, _, code, _ in probe.results if code != 200)
        swap_latencies = [lat for t, lat, _, _ in probe.results
                          if started <= t + lat and t <= (all_new or started) + 1]
        return {
            "mechanism": mechanism,
            "first_new_s": (first_new - started) if first_new else float("nan"),
            "all_new_s": (all_new - started) if all_new else float("nan"),
            "pss_before_mb": max(max(m.values()) for m in before if m) / 1024,
            "pss_peak_mb": max(max(m.values()) for m in during if m) / 1024,
            "pss_after_mb": max(max(m.values()) for m in after if m) / 1024 if after else float("nan"),
            "requests": len(probe.results),
            "failed": failed,
            "max_latency_s": max(swap_latencies) if swap_latencies else float("nan"),
            "p50_latency_ms": statistics.median(lat for _, lat, _, _ in probe.results) * 1000,
        }
    finally:
        srv.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=4096, help="hidden width of the MLP")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory(prefix="tfwsgi-swap-") as tmp:
        work = Path(tmp)
        build_mlp(work / "v1", seed=1, hidden=args.hidden)
        build_mlp(work / "v2", seed=2, hidden=args.hidden)
        size_mb = sum(f.stat().st_size for f in (work / "v1").rglob("*") if f.is_file()) / 2**20
        rows = [run(m, work, args.clients) for m in ("watcher", "sighup")]
    lines = [
        "# Version-swap benchmark",
        "",
        f"`.venv/bin/python bench/swap_bench.py --clients {args.clients} --hidden {args.hidden}` on "
        f"{os.cpu_count()} cores: an MLP 784→{args.hidden}→{args.hidden}→10 ({size_mb:.0f} MB on disk), "
        f"2 sync workers, {args.clients} clients sending `:predict` with `Cache-Control: no-store` "
        "throughout; version 2 is renamed into the base path at t = 0.",
        "",
        "| mechanism | first answer from v2 (s) | last answer from v1 (s) "
        "| worker PSS before / peak / after (MB) | requests | failed "
        "| slowest request during the swap (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    names = {"watcher": "per-worker watcher (default)", "sighup": "SIGHUP worker rotation"}
    for r in rows:
        lines.append(
            f"| {names[r['mechanism']]} | {r['first_new_s']:.2f} | {r['all_new_s']:.2f} | "
            f"{r['pss_before_mb']:.0f} / {r['pss_peak_mb']:.0f} / {r['pss_after_mb']:.0f} | "
            f"{r['requests']} | {r['failed']} | {r['max_latency_s']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "swap-benchmark.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
