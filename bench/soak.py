"""Soak run (issue 7): a bounded run at 80% of measured peak throughput, with faults of time.

    .venv/bin/python bench/soak.py [--duration 600] [--window 10] [--connections 32] [--load 0.8]
                                   [--tfwsgi-args '-w 2'] [--tfwsgi-env 'TFWSGI_X=y ...'] [--no-warmup]

Builds two versions of the reference MLP (bench/reference_models.py), each with a warmup record
(``assets.extra/tf_serving_warmup_requests``, as TF Serving advises for production models, so a new
version's first calls run in the loader, not in requests; ``--no-warmup`` leaves it out), serves
version 1 with ``gunicorn -c gunicorn_conf.py tfwsgi:app`` (2 workers) and a real memcached as the
shared cache, and drives it with wrk over loopback and a request mix: 60% cache hits (16 bodies
asked again and again), 30% misses (a new body every time, in every wrk run: the model runs), 10%
bad requests (half malformed JSON, 400; half an unknown model, 404), counted apart from errors. wrk
has no rate limit (wrk2 is not packaged): the peak is measured first (same mix, no delay, 32
connections), then each connection (as many as for the peak: fewer may not reach the target however
short their wait) waits between requests (wrk's ``delay()`` hook, whose whole milliseconds the
script dithers to a fractional mean), for a delay calibrated by short runs until one holds
``--load`` (0.8) of the peak within 2%; after each window the next one's delay is corrected by half
the error, as response times drift. Half-way through, version 2 is renamed into the base path and
the workers' watchers swap to it.
Each window (``--window`` s) is one wrk run: throughput, p50/p99 and statuses per window; each
worker's PSS is sampled every 2 s. Writes docs/soak.md and docs/soak.png; exits 1 unless there
were no errors, the last minute's p99 is within 1.5× the first minute's, and worker memory grew
less than 5% (first minute to last, the swap included).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
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
from swap_bench import pss_kb, smaps_kb  # noqa: E402

from conftest import MemcachedServer, Server  # noqa: E402

PEAK_CONNECTIONS = 32
STATUS_NAMES = ("c200", "c400", "c404", "c5xx", "cother", "bad_sent", "bad200")

# The request mix, as wrk Lua (one Lua state per wrk thread; counters summed in done()).
LUA = r"""
local head = '{"instances": [[' .. BASE .. ','
local hit_prefix = head .. HIT .. ','      -- the same 16 bodies in every run
local miss_prefix = head .. 'SALT,'        -- a number of its own in each run: misses stay misses
local n = 0
id = 0  -- set per thread by setup()
c200, c400, c404, c5xx, cother, bad_sent, bad200 = 0, 0, 0, 0, 0, 0, 0
local threads = {}

function setup(thread)
  thread:set("id", #threads + 1)
  table.insert(threads, thread)
end

-- wrk waits whole milliseconds (it truncates what delay() returns): the fraction is dithered,
-- so the mean wait is DELAY_MS.
local whole = math.floor(DELAY_MS)
local frac = DELAY_MS - whole
function delay()
  if math.random() < frac then return whole + 1 end
  return whole
end

function request()
  n = n + 1
  local k = n % 10
  if k == 0 then
    bad_sent = bad_sent + 1
    if n % 20 == 0 then
      return wrk.format("POST", "/v1/models/m:predict", nil, '{"instances": [1.0,')
    end
    return wrk.format("POST", "/v1/models/nope:predict", nil, '{"instances": [[1.0]]}')
  end
  local prefix, last
  if k <= 6 then
    prefix, last = hit_prefix, (n % 16) / 16  -- one of 16 bodies: hits once stored
  else
    prefix, last = miss_prefix, 2 + n * 8 + id  -- never seen before: a miss (exact in float32)
  end
  return wrk.format("POST", "/v1/models/m:predict", nil, prefix .. string.format("%.4f", last) .. "]]}")
end

function response(status, headers, body)
  if status == 200 then
    c200 = c200 + 1
    if string.sub(body, 1, 15) ~= '{"predictions":' then bad200 = bad200 + 1 end
  elseif status == 400 then c400 = c400 + 1
  elseif status == 404 then c404 = c404 + 1
  elseif status >= 500 then c5xx = c5xx + 1
  else cother = cother + 1 end
end

function done(summary, latency, requests)
  local totals = {}
  for _, t in ipairs(threads) do
    for _, name in ipairs({NAMES}) do
      totals[name] = (totals[name] or 0) + t:get(name)
    end
  end
  for _, name in ipairs({NAMES}) do
    io.write(string.format("SOAK %s %d\n", name, totals[name]))
  end
end
"""


_runs = 0


def lua_script(path: Path, vector: list[str], delay_ms: float) -> Path:
    """The request mix for one wrk run: ``vector`` is the first 783 inputs of every body."""
    global _runs
    _runs += 1
    text = (LUA.replace("BASE", repr(",".join(vector[:-1]))).replace("HIT", repr(vector[-1]))
            .replace("SALT", str(_runs)).replace("DELAY_MS", f"{delay_ms:.3f}")
            .replace("NAMES", ", ".join(f'"{n}"' for n in STATUS_NAMES)))
    path.write_text(text)
    return path


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_wrk(url: str, script: Path, connections: int, seconds: float) -> dict:
    """One wrk run: req/s, p50/p99 (ms), socket errors and the Lua counters."""
    out = subprocess.run(["wrk", f"-t{min(2, connections)}", f"-c{connections}", f"-d{seconds:.0f}s",
                          "--timeout", "10s", "--latency", "-s", str(script), url],
                         capture_output=True, text=True, check=True).stdout
    result: dict = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}  # type: ignore[union-attr]
    for pct in ("50", "99"):
        m = re.search(rf"\s{pct}(?:\.000)?%\s+([\d.]+)(us|ms|s)\b", out)
        result[f"p{pct}_ms"] = _ms(m.group(1), m.group(2)) if m else float("nan")
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    result["socket_errors"] = sum(map(int, sock.groups())) if sock else 0
    result.update({name: int(v) for name, v in re.findall(r"SOAK (\w+) (\d+)", out)})
    return result


def errors_of(r: dict) -> int:
    """Failed requests in one window: 5xx, unexpected statuses, bad 200s, socket errors."""
    return r["c5xx"] + r["cother"] + r["bad200"] + r["socket_errors"]


def next_delay(delay: float, connections: int, target: float, rps: float, gain: float = 1.0) -> float:
    """The delay (ms) that moves ``rps`` to ``target``: each connection sends one request per
    response time + delay, so the response time is connections / rps - delay."""
    return max(0.0, delay + gain * (connections / target - connections / rps) * 1000.0)


def calibrate(url: str, work: Path, vector: list[str], target: float, connections: int,
              seconds: int = 5, runs: int = 8, tolerance: float = 0.02) -> tuple[float, float]:
    """The per-connection delay (ms) that holds ``target`` req/s, and the rate it held: short
    runs until one lands within ``tolerance`` (or the closest of ``runs``)."""
    delay = connections / target * 1000.0  # the response time taken as 0: too slow
    best = (float("inf"), delay, 0.0)
    for _ in range(runs):
        r = run_wrk(url, lua_script(work / "calibrate.lua", vector, delay), connections, seconds)
        error = r["rps"] / target - 1
        print(f"calibrating: {delay:.2f} ms held {r['rps']:.0f} req/s (target {target:.0f}, "
              f"{error * 100:+.1f}%)", flush=True)
        best = min(best, (abs(error), delay, r["rps"]))
        if abs(error) <= tolerance:
            break
        if delay == 0 and error < 0:
            print(f"calibrating: {connections} connections without delay stay below the target: "
                  "more --connections are needed", flush=True)
            break
        delay = next_delay(delay, connections, target, r["rps"])
    return best[1], best[2]


def anonymous_kb(pid: int) -> int:
    """A process's anonymous memory (its heaps; PSS adds its share of mapped files)."""
    return smaps_kb(pid, "Anonymous")


class MemorySampler(threading.Thread):
    """Every worker's PSS (MB) every ``every`` seconds: (t, {pid: MB}); anonymous memory apart."""

    def __init__(self, srv: Server, started: float, every: float = 2.0) -> None:
        super().__init__(daemon=True)
        self.srv, self.started, self.every = srv, started, every
        self.samples: list[tuple[float, dict[int, float]]] = []
        self.anonymous: list[tuple[float, dict[int, float]]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            t, pids = time.monotonic() - self.started, self.srv.worker_pids()
            self.samples.append((t, {p: pss_kb(p) / 1024 for p in pids}))
            self.anonymous.append((t, {p: anonymous_kb(p) / 1024 for p in pids}))
            self.stop.wait(self.every)


def install(src: Path, base: Path, version: int) -> None:
    tmp = base.parent / f".incoming-{version}"
    shutil.copytree(src, tmp)
    os.rename(tmp, base / str(version))


def soak(args: argparse.Namespace, work: Path) -> dict:
    build_mlp(work / "src" / "1", seed=0, warmup=args.warmup)
    build_mlp(work / "src" / "2", seed=1, warmup=args.warmup)
    base = work / "m"
    base.mkdir()
    install(work / "src" / "1", base, 1)
    vector = [f"{v:.4f}" for v in np.random.default_rng(0).random(783)]
    mc = MemcachedServer(memory_mb=256)
    env = {"TFWSGI_MODEL_NAME": "m", "TFWSGI_MODEL_BASE_PATH": str(base), "TFWSGI_MEMCACHED": mc.address,
           **dict(kv.split("=", 1) for kv in args.tfwsgi_env.split())}
    extra = tuple(args.tfwsgi_args.split())
    workers = 2
    if "-w" in extra:
        workers = int(extra[extra.index("-w") + 1])
        extra = tuple(a for i, a in enumerate(extra) if a != "-w" and (i == 0 or extra[i - 1] != "-w"))
    srv = Server(env, workers=workers, log_path=work / "tfwsgi.log", extra_args=extra)
    try:
        srv.wait_ready()
        url = srv.url + "/v1/models/m:predict"
        peak = run_wrk(url, lua_script(work / "peak.lua", vector, 0), PEAK_CONNECTIONS, args.peak_seconds)
        target = peak["rps"] * args.load
        print(f"peak {peak['rps']:.0f} req/s at {PEAK_CONNECTIONS} connections (p99 "
              f"{peak['p99_ms']:.1f} ms); target {target:.0f} req/s", flush=True)
        delay, calibrated = calibrate(url, work, vector, target, args.connections)
        first_delay = delay
        pids_before = srv.worker_pids()
        started = time.monotonic()
        sampler = MemorySampler(srv, started)
        sampler.start()
        windows: list[dict] = []
        swap_at = None
        while (elapsed := time.monotonic() - started) < args.duration - 1:
            if swap_at is None and elapsed >= args.duration / 2:
                swap_at = elapsed
                threading.Thread(target=install, args=(work / "src" / "2", base, 2)).start()
            seconds = min(args.window, args.duration - elapsed)
            script = lua_script(work / "soak.lua", vector, delay)
            r = run_wrk(url, script, args.connections, max(1, round(seconds)))
            r["t"], r["delay_ms"] = elapsed, delay
            # Response times drift (a swap, the machine): each window corrects the next one's
            # delay by half the error, so the soak holds the target rather than the first guess.
            delay = next_delay(delay, args.connections, target, r["rps"], gain=0.5)
            windows.append(r)
            print(f"t={elapsed:5.0f}s {r['rps']:6.0f} req/s p50 {r['p50_ms']:6.2f} ms p99 "
                  f"{r['p99_ms']:6.2f} ms 200:{r['c200']} 400:{r['c400']} 404:{r['c404']} "
                  f"errors:{errors_of(r)} PSS "
                  + " ".join(f"{m:.1f}" for m in sampler.samples[-1][1].values()), flush=True)
        sampler.stop.set()
        sampler.join()
        status = requests.get(srv.url + "/v1/models/m", timeout=10).json()["model_version_status"]
        return {"peak": peak, "target": target, "delay_ms": first_delay, "calibrated": calibrated,
                "windows": windows,
                "memory": sampler.samples, "anonymous": sampler.anonymous, "swap_at": swap_at,
                "status": status,
                "workers_replaced": sorted(pids_before - srv.worker_pids()), "workers": workers,
                "connections": args.connections, "load": args.load,
                "memcached": {k: mc.stats()[k] for k in ("get_hits", "get_misses", "curr_items")}}
    finally:
        srv.stop()
        mc.stop()


def summarize(res: dict, duration: float, compare: float) -> dict:
    w = res["windows"]
    first = [x for x in w if x["t"] < compare] or w[:1]
    last = [x for x in w if x["t"] >= duration - compare - 1] or w[-1:]
    p99_first = statistics.mean(x["p99_ms"] for x in first)
    p99_last = statistics.mean(x["p99_ms"] for x in last)
    # Memory: a version swap costs a one-off step (both versions are loaded for a moment, and
    # TensorFlow's CPU allocator keeps the pool it grew then, for later loads), which is not a
    # leak. Growth is reported overall (first to last) and over the steady stretches on either
    # side of the swap: the first `compare` seconds to just before it, and from `compare` seconds
    # after it (settled) to the last `compare` seconds. The goal holds for the overall figure.
    swap = res["swap_at"] if res["swap_at"] is not None else duration
    settled = swap + min(compare, 30.0)
    growth = {}
    for pid in {p for _, m in res["memory"] for p in m}:
        series = [(t, m[pid]) for t, m in res["memory"] if pid in m and m[pid] > 0]
        anon = [(t, m[pid]) for t, m in res["anonymous"] if pid in m and m[pid] > 0]

        def mean(lo: float, hi: float, series: list = series) -> float:
            values = [v for t, v in series if lo <= t < hi]
            return statistics.mean(values) if values else float("nan")

        first, before = mean(0, compare), mean(swap - compare / 2, swap)
        after, last = mean(settled, settled + compare / 2), mean(duration - compare, duration + 1)
        growth[pid] = {"first": first, "before_swap": before, "after_swap": after, "last": last,
                       "steady_pct": max((before / first - 1) * 100, (last / after - 1) * 100),
                       "overall_pct": (last / first - 1) * 100,
                       "anon_first": mean(0, compare, anon),
                       "anon_last": mean(duration - compare, duration + 1, anon)}
    total = sum(x["c200"] + x["c400"] + x["c404"] + x["c5xx"] + x["cother"] for x in w)
    bad = sum(x["c400"] + x["c404"] for x in w)
    bad_sent = sum(x["bad_sent"] for x in w)
    errors = sum(errors_of(x) for x in w) + len(res["workers_replaced"])
    # A bad request must get its 4xx, a good one its 200: sent and answered agree, up to the
    # requests still in flight when each window's wrk stopped (one per connection).
    mismatch = max(0, abs(bad - bad_sent) - len(w) * res["connections"])
    errors += mismatch
    return {"requests": total, "expected_4xx": bad, "errors": errors, "p99_first_ms": p99_first,
            "p99_last_ms": p99_last, "p99_ratio": p99_last / p99_first, "memory": growth,
            "max_growth_pct": max(max(g["steady_pct"], g["overall_pct"]) for g in growth.values()),
            "rps": statistics.mean(x["rps"] for x in w)}


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = res["windows"]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(9, 9), sharex=True)
    ax1.plot([x["t"] for x in w], [x["p99_ms"] for x in w], "o-", label="p99")
    ax1.plot([x["t"] for x in w], [x["p50_ms"] for x in w], "s--", label="p50")
    ax1.set_ylabel("latency (ms)")
    ax2.plot([x["t"] for x in w], [x["rps"] for x in w], "o-", label="requests/s")
    ax2.axhline(res["target"], color="grey", linestyle=":",
                label=f"target ({res['load'] * 100:.0f}% of peak)")
    ax2.set_ylabel("requests/s")
    for pid in sorted({p for _, m in res["memory"] for p in m}):
        pts = [(t, m[pid]) for t, m in res["memory"] if pid in m and m[pid] > 0]
        ax3.plot([t for t, _ in pts], [v for _, v in pts], label=f"worker {pid}")
    ax3.set_ylabel("PSS (MB)")
    ax3.set_xlabel("seconds into the soak")
    for ax in (ax1, ax2, ax3):
        if res["swap_at"] is not None:
            ax.axvline(res["swap_at"], color="red", alpha=0.4, label="version 2 renamed in")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=600, help="seconds of soak (default 600)")
    parser.add_argument("--window", type=int, default=10, help="seconds per measured window")
    parser.add_argument("--connections", type=int, default=PEAK_CONNECTIONS,
                        help="as many as for the peak (default), or the target may be out of reach")
    parser.add_argument("--load", type=float, default=0.8, help="fraction of peak to hold")
    parser.add_argument("--peak-seconds", type=int, default=10)
    parser.add_argument("--tfwsgi-args", default="", help="extra gunicorn flags (-w N for workers)")
    parser.add_argument("--tfwsgi-env", default="", help="TFWSGI_*=value settings, space-separated")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false",
                        help="build the model versions without a warmup record")
    parser.add_argument("--out", default="soak", help="docs/<out>.md and docs/<out>.png")
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    compare = min(60.0, args.duration / 3)
    with tempfile.TemporaryDirectory(prefix="tfwsgi-soak-") as tmp:
        res = soak(args, Path(tmp))
    s = summarize(res, args.duration, compare)
    ok = s["errors"] == 0 and s["p99_ratio"] <= 1.5 and s["max_growth_pct"] < 5
    command = ("`.venv/bin/python bench/soak.py --duration "
               f"{args.duration} --window {args.window} --connections {args.connections}"
               f" --load {args.load}"
               + (f" --tfwsgi-args '{args.tfwsgi_args}'" if args.tfwsgi_args else "")
               + (f" --tfwsgi-env '{args.tfwsgi_env}'" if args.tfwsgi_env else "")
               + ("" if args.warmup else " --no-warmup") + "`")
    versions = ", ".join(f"{x['version']} {x['state']}" for x in res["status"])
    delays = [x["delay_ms"] for x in res["windows"]]
    lines = [
        "# Soak run", "",
        f"{command} on {os.cpu_count()} cores: tfwsgi (`gunicorn -c gunicorn_conf.py tfwsgi:app`, "
        f"{res['workers']} workers) serving the reference MLP ("
        + ("with" if args.warmup else "without") + " a warmup record) with a real memcached as its cache, "
        "driven by wrk over loopback: 60% hits, 30% misses (the model runs), 10% bad requests "
        "(400 and 404, expected, not errors); version 2 renamed into the base path half-way.", "",
        f"- peak {res['peak']['rps']:.0f} req/s (same mix, {PEAK_CONNECTIONS} connections, no delay); "
        f"target {res['target']:.0f} req/s ({args.load * 100:.0f}%); **held {s['rps']:.0f} req/s on "
        f"average ({s['rps'] / res['peak']['rps'] * 100:.1f}% of peak)** with {args.connections} "
        f"connections; the calibrated delay, {res['delay_ms']:.2f} ms between requests, held "
        f"{res['calibrated']:.0f} req/s in its 5 s run; the windows' delays ranged "
        f"{min(delays):.2f}–{max(delays):.2f} ms;",
        f"- **{s['errors']} errors** in {s['requests']} requests (5xx, unexpected statuses, 200s "
        f"without predictions, socket errors, replaced workers); {s['expected_4xx']} bad requests "
        "answered 400/404 as expected;",
        f"- **p99 {s['p99_first_ms']:.2f} ms** over the first {compare:.0f} s, "
        f"**{s['p99_last_ms']:.2f} ms** over the last {compare:.0f} s (×{s['p99_ratio']:.2f}; the "
        "goal is ≤ 1.5);",
        "- worker PSS (MB: first, just before the swap, settled after it, last; overall growth is "
        "last/first, the goal < 5%; steady growth is the larger of before/first and last/after): "
        + "; ".join(
            f"{g['first']:.1f}, {g['before_swap']:.1f}, {g['after_swap']:.1f}, {g['last']:.1f} "
            f"(**overall {g['overall_pct']:+.1f}%** with the swap's step, steady {g['steady_pct']:+.1f}%)"
            for g in s["memory"].values()) + f"; versions at the end: {versions}; anonymous memory "
        "(MB, first → last): " + ", ".join(f"{g['anon_first']:.1f} → {g['anon_last']:.1f}"
                                            for g in s["memory"].values()) + ";",
        f"- memcached: {res['memcached']}.",
        "", f"Verdict: **{'PASS' if ok else 'FAIL'}**.", "",
        "| t (s) | delay ms | req/s | p50 ms | p99 ms | 200 | 400 | 404 | errors |",
        "|---|---|---|---|---|---|---|---|---|",
        *(f"| {x['t']:.0f} | {x['delay_ms']:.2f} | {x['rps']:.0f} | {x['p50_ms']:.2f} | "
          f"{x['p99_ms']:.2f} | {x['c200']} | {x['c400']} | {x['c404']} | {errors_of(x)} |"
          for x in res["windows"]),
        "", f"![p99, throughput and worker memory over time]({args.out}.png)",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / f"{args.out}.md").write_text(text)
    plot(res, ROOT / "docs" / f"{args.out}.png")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
