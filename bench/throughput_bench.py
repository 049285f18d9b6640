"""Throughput benchmark (issue 5): tfwsgi vs the plain Flask + gunicorn peer on the reference models.

    .venv/bin/python bench/throughput_bench.py [--duration 10] [--concurrency 1,8,32,64]

Builds the reference models (bench/reference_models.py), starts tfwsgi
(``gunicorn -c gunicorn_conf.py tfwsgi:app -w 2``, prediction cache off so the model runs for every
request) and the peer (``gunicorn -w 2 bench.peers.plain_app:app``) for each case, drives both with
wrk over loopback at each concurrency, interleaving the two servers, and writes
docs/throughput-benchmark.md and docs/throughput-benchmark.png (throughput and p99 against
concurrency). Worker memory (PSS) is sampled after each case's load.

This machine is shared and noisy (one server's rate at one level moved by 1.5x between two runs a
minute apart), so each level is measured ``--rounds`` times, the servers taking turns, each run
after a ``--warmup`` of the same load that is not counted (it opens the connections and meets the
batch sizes that level makes); the tables give the median run and the range.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from reference_models import build_conv, build_mlp  # noqa: E402
from soak import next_delay  # noqa: E402
from swap_bench import pss_kb  # noqa: E402

from conftest import Server, free_port  # noqa: E402

CASES = {
    "mlp-1": ("mlp", (1, 784)),
    "mlp-32": ("mlp", (32, 784)),
    "conv-1": ("conv", (1, 32, 32, 3)),
}


def body_for(shape: tuple[int, ...]) -> str:
    x = np.random.default_rng(0).random(shape).astype(np.float32)
    return json.dumps({"instances": x.tolist()})


def wrk(url: str, body_file: Path, connections: int, duration: int) -> dict:
    script = body_file.with_suffix(".lua")
    script.write_text(
        'wrk.method = "POST"\n'
        f'local f = io.open("{body_file}", "rb")\nwrk.body = f:read("*all")\nf:close()\n'
        'wrk.headers["Content-Type"] = "application/json"\n')
    threads = min(2, connections)
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency",
                          "-s", str(script), url], capture_output=True, text=True, check=True).stdout
    return parse_wrk(out)


class Peer:
    def __init__(self, model_dir: Path, log: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        env = {**os.environ, "BENCH_MODEL_DIR": str(model_dir), "TF_CPP_MIN_LOG_LEVEL": "2"}
        with open(log, "wb") as f:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "gunicorn"), "-w", "2", "-b", f"127.0.0.1:{self.port}",
                 "--no-control-socket", "-t", "120", *extra_args, "bench.peers.plain_app:app"],
                cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}/v1/models/m:predict"

    def wait(self, body: str) -> None:
        deadline = time.monotonic() + 120
        ok = 0
        while ok < 6:  # both workers up
            assert time.monotonic() < deadline, "peer did not start"
            try:
                ok += requests.post(self.url, data=body, timeout=30).ok
            except requests.RequestException:
                time.sleep(0.3)

    def worker_pids(self) -> set[int]:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)],
                             capture_output=True, text=True).stdout
        return {int(p) for p in out.split()}

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(30)


def median_run(runs: list[dict]) -> dict:
    """The median of interleaved runs: its rate and p99 (each the median), the range of rates,
    and every error of every run."""
    rates = sorted(r["rps"] for r in runs)
    return {"rps": float(np.median(rates)), "p99_ms": float(np.median([r["p99_ms"] for r in runs])),
            "errors": sum(r["errors"] for r in runs), "rps_min": rates[0], "rps_max": rates[-1]}


def run_case(name: str, work: Path, levels: list[int], duration: int,
             tfwsgi_args: tuple[str, ...] = (), tfwsgi_env: dict[str, str] | None = None,
             rounds: int = 1, warmup: int = 0) -> dict:
    model, shape = CASES[name]
    body = body_for(shape)
    body_file = work / f"{name}.json"
    body_file.write_text(body)
    env = {"TFWSGI_MODEL_NAME": "m", "TFWSGI_MODEL_BASE_PATH": str(work / model),
           "TFWSGI_CACHE_ENABLED": "false", **(tfwsgi_env or {})}
    srv = Server(env, workers=2, log_path=work / f"tfwsgi-{name}.log", extra_args=tfwsgi_args)
    peer = Peer(work / model / "1", work / f"peer-{name}.log")
    try:
        srv.wait_ready()
        peer.wait(body)
        url = srv.url + "/v1/models/m:predict"
        mine = requests.post(url, data=body, timeout=30).json()["predictions"]
        theirs = requests.post(peer.url, data=body, timeout=30).json()["predictions"]
        assert np.allclose(mine, theirs, rtol=1e-4, atol=1e-6), "the servers disagree"
        result: dict = {"tfwsgi": {}, "peer": {}}
        for c in levels:
            runs: dict[str, list[dict]] = {"tfwsgi": [], "peer": []}
            for _ in range(rounds):
                for who, target in (("tfwsgi", url), ("peer", peer.url)):
                    if warmup:
                        wrk(target, body_file, c, warmup)
                    r = wrk(target, body_file, c, duration)
                    runs[who].append(r)
                    print(f"{name} c={c:3d} {who:6s} {r['rps']:8.0f} req/s p99 {r['p99_ms']:7.1f} ms "
                          f"errors {r['errors']}", flush=True)
            for who in runs:
                result[who][c] = median_run(runs[who])
        result["pss_mb"] = {
            "tfwsgi": max(pss_kb(p) for p in srv.worker_pids()) / 1024,
            "peer": max(pss_kb(p) for p in peer.worker_pids()) / 1024,
        }
        return result
    finally:
        srv.stop()
        peer.stop()


PACED_LUA = """wrk.method = "POST"
local f = io.open("{body}", "rb")
wrk.body = f:read("*all")
f:close()
wrk.headers["Content-Type"] = "application/json"
local mean = {delay_ms}
function delay()
  local whole = math.floor(mean)
  if math.random() < mean - whole then return whole + 1 end
  return whole
end
"""


def paced_wrk(url: str, body_file: Path, connections: int, seconds: int, delay_ms: float,
              wait: bool = True) -> Any:
    """wrk whose every connection pauses ``delay_ms`` (on average) between requests."""
    script = body_file.with_name(body_file.stem + "-paced.lua")
    script.write_text(PACED_LUA.format(body=body_file, delay_ms=f"{delay_ms:.3f}"))
    proc = subprocess.Popen(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s",
                             str(script), url], stdout=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, _ = proc.communicate()
    return parse_wrk(out)


_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def parse_wrk(out: str) -> dict:
    """wrk's summary: rate, p99 and mean latency (ms), requests, and its errors, in all
    (``errors``) and by kind (``non2xx``, ``connect``, ``read``, ``write``, ``timeout``)."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    m = re.search(r"99%\s+([\d.]+)(us|ms|s|m)\b", out)
    p99 = float(m.group(1)) * _MS[m.group(2)]
    m = re.search(r"Latency\s+([\d.]+)(us|ms|s|m)\b", out)
    mean = float(m.group(1)) * _MS[m.group(2)] if m else float("nan")
    m = re.search(r"(\d+) requests in", out)
    done = int(m.group(1)) if m else 0
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    kinds = dict(zip(("connect", "read", "write", "timeout"),
                     map(int, sock.groups()) if sock else (0, 0, 0, 0), strict=True))
    non2xx = int(bad.group(1)) if bad else 0
    return {"rps": rps, "p99_ms": p99, "errors": non2xx + sum(kinds.values()), "mean_ms": mean,
            "requests": done, "non2xx": non2xx, **kinds}


def soak(work: Path, seconds: int, tfwsgi_args: tuple[str, ...], tfwsgi_env: dict[str, str],
         connections: int = 32, share: float = 0.8) -> dict:
    """mlp-1 at ``share`` of its peak rate for ``seconds``: worker PSS over time, errors.

    wrk has no rate option (wrk2 is not packaged): each connection pauses between requests, and
    the pause is calibrated on short runs until one holds the target within 2% (or the closest
    one measured is used), then corrected between 30 s windows of the long run."""
    body = body_for(CASES["mlp-1"][1])
    body_file = work / "soak.json"
    body_file.write_text(body)
    env = {"TFWSGI_MODEL_NAME": "m", "TFWSGI_MODEL_BASE_PATH": str(work / "mlp"),
           "TFWSGI_CACHE_ENABLED": "false", **tfwsgi_env}
    srv = Server(env, workers=2, log_path=work / "tfwsgi-soak.log", extra_args=tfwsgi_args)
    try:
        srv.wait_ready()
        url = srv.url + "/v1/models/m:predict"
        peak = wrk(url, body_file, connections, 10)["rps"]
        target = peak * share
        delay = max(0.0, connections / target * 1000 - connections / peak * 1000)
        best = (float("inf"), delay)  # the measured delay closest to the target is the one used
        for _ in range(10):
            got = paced_wrk(url, body_file, connections, 5, delay)["rps"]
            best = min(best, (abs(got / target - 1), delay))
            if best[0] < 0.02:
                break
            delay = next_delay(delay, connections, target, got)
        delay = best[1]
        print(f"soak: peak {peak:.0f} req/s, target {target:.0f}, pause {delay:.2f} ms per request",
              flush=True)
        # The run is cut into windows of up to 30 s, each one wrk run; between windows the delay
        # moves halfway to the one that brings the run's average to the target, so the rate holds
        # even as the machine drifts.
        samples: list[tuple[float, float]] = []
        started = time.monotonic()
        done = requests_total = 0.0
        p99s: list[float] = []
        errors = 0
        while done < seconds:
            window = int(min(30, seconds - done))
            proc = paced_wrk(url, body_file, connections, window, delay, wait=False)
            while proc.poll() is None:
                samples.append((time.monotonic() - started,
                                max(pss_kb(p) for p in srv.worker_pids()) / 1024))
                time.sleep(min(10, window))
            got = parse_wrk(proc.stdout.read() if proc.stdout else "")
            requests_total += got["rps"] * window
            p99s.append(got["p99_ms"])
            errors += got["errors"]
            done += window
            # The next window aims at what brings the whole run's average to the target.
            nxt = min(30, seconds - done)
            aim = target if nxt <= 0 else (target * (done + nxt) - requests_total) / nxt
            aim = min(max(aim, 0.7 * peak), 0.95 * peak)
            delay = next_delay(delay, connections, aim, got["rps"], gain=0.5)
        result = {"rps": requests_total / seconds, "p99_ms": max(p99s), "errors": errors}
        mems = [m for _, m in samples]
        return {"peak_rps": peak, "target_rps": target, "delay_ms": delay, **result,
                "pss_first_mb": mems[0], "pss_last_mb": mems[-1], "pss_min_mb": min(mems),
                "pss_max_mb": max(mems), "samples": samples, "connections": connections}
    finally:
        srv.stop()


def plot(results: dict, levels: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(5 * len(results), 7), squeeze=False)
    for col, (name, res) in enumerate(results.items()):
        for who, style in (("tfwsgi", "o-"), ("peer", "s--")):
            line, = axes[0][col].plot(levels, [res[who][c]["rps"] for c in levels], style, label=who)
            axes[0][col].fill_between(levels, [res[who][c]["rps_min"] for c in levels],
                                      [res[who][c]["rps_max"] for c in levels],
                                      color=line.get_color(), alpha=0.15)  # the range of the runs
            axes[1][col].plot(levels, [res[who][c]["p99_ms"] for c in levels], style, label=who)
        axes[0][col].set_title(name)
        axes[0][col].set_ylabel("requests/s")
        axes[1][col].set_ylabel("p99 latency (ms)")
        axes[1][col].set_xlabel("concurrent connections")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.grid(True, alpha=0.3)
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--rounds", type=int, default=3,
                        help="runs of each server at each level, taking turns (the median is reported)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="seconds of the same load before each counted run")
    parser.add_argument("--tfwsgi-args", default="", help="extra gunicorn flags for tfwsgi")
    parser.add_argument("--soak-seconds", type=int, default=0,
                        help="also run mlp-1 this long at reduced load and track worker memory")
    parser.add_argument("--tfwsgi-env", default="",
                        help="TFWSGI_*=value settings for tfwsgi, space-separated")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    results = {}
    with tempfile.TemporaryDirectory(prefix="tfwsgi-throughput-") as tmp:
        work = Path(tmp)
        build_mlp(work / "mlp" / "1")
        build_conv(work / "conv" / "1")
        env = dict(kv.split("=", 1) for kv in args.tfwsgi_env.split())
        for name in filter(None, args.cases.split(",")):
            results[name] = run_case(name, work, levels, args.duration,
                                     tuple(args.tfwsgi_args.split()), env, args.rounds, args.warmup)
        soaked = soak(work, args.soak_seconds, tuple(args.tfwsgi_args.split()), env) \
            if args.soak_seconds else None
    lines = [
        "# Throughput benchmark",
        "",
        f"`.venv/bin/python bench/throughput_bench.py --duration {args.duration} --concurrency "
        f"{args.concurrency} --cases {args.cases} --rounds {args.rounds} --warmup {args.warmup}"
        + (f" --tfwsgi-args '{args.tfwsgi_args}'" if args.tfwsgi_args else "")
        + (f" --tfwsgi-env '{args.tfwsgi_env}'" if args.tfwsgi_env else "")
        + f"` on {os.cpu_count()} cores. Both servers: gunicorn, "
        "2 workers, loopback, wrk; tfwsgi with its cache off (the model runs for every request); "
        "the peer is bench/peers/plain_app.py. "
        f"Each figure is the median of {args.rounds} runs of {args.duration} s per server, the servers "
        f"taking turns, each run after {args.warmup} s of the same load that is not counted; "
        "req/s is followed by the range of the runs; errors are those of every run.",
        "",
        "| case | connections | tfwsgi req/s | peer req/s | ratio | tfwsgi p99 ms | peer p99 ms | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, res in results.items():
        for c in levels:
            t, p = res["tfwsgi"][c], res["peer"][c]
            lines.append(f"| {name} | {c} | {t['rps']:.0f} ({t['rps_min']:.0f}–{t['rps_max']:.0f}) | "
                         f"{p['rps']:.0f} ({p['rps_min']:.0f}–{p['rps_max']:.0f}) | "
                         f"{t['rps'] / p['rps']:.2f} | "
                         f"{t['p99_ms']:.1f} | {p['p99_ms']:.1f} | {t['errors']} / {p['errors']} |")
    lines += ["", "| case | worker PSS tfwsgi (MB) | worker PSS peer (MB) | ratio |", "|---|---|---|---|"]
    for name, res in results.items():
        m = res["pss_mb"]
        lines.append(f"| {name} | {m['tfwsgi']:.0f} | {m['peer']:.0f} | {m['tfwsgi'] / m['peer']:.2f} |")
    if soaked:
        drift = (soaked["pss_last_mb"] / soaked["pss_first_mb"] - 1) * 100
        spread = (soaked["pss_max_mb"] / soaked["pss_min_mb"] - 1) * 100
        lines += ["", f"Soak: mlp-1 for {args.soak_seconds} s on {soaked['connections']} connections paced "
                  f"to {soaked['rps']:.0f} req/s ({soaked['rps'] / soaked['peak_rps'] * 100:.0f}% of the "
                  f"{soaked['peak_rps']:.0f} req/s peak), worst 30 s window's p99 {soaked['p99_ms']:.1f} ms, "
                  f"{soaked['errors']} errors; largest worker PSS {soaked['pss_first_mb']:.1f} MB at the "
                  f"start, {soaked['pss_last_mb']:.1f} MB at the end ({drift:+.1f}%), "
                  f"{soaked['pss_min_mb']:.1f}–{soaked['pss_max_mb']:.1f} MB over the run "
                  f"(spread {spread:.1f}%).",
                  "", "| t (s) | largest worker PSS (MB) |", "|---|---|"]
        lines += [f"| {t:.0f} | {m:.1f} |" for t, m in soaked["samples"]]
    lines += ["", "![throughput and p99 against concurrency](throughput-benchmark.png)"]
    text = "\n".join(lines) + "\n"
    print(text)
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "throughput-benchmark.md").write_text(text)
    if results:
        plot(results, levels, ROOT / "docs" / "throughput-benchmark.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
