"""Cache benchmark: tfwsgi cache hits vs a bare Flask route doing one memcached get; stampede runs.

    .venv/bin/python bench/cache_bench.py [--duration 10] [--rounds 3] [--connections 32]

Starts one memcached, tfwsgi (``gunicorn -c gunicorn_conf.py tfwsgi:app -w 2``, its default worker)
and the bare peer twice (``gunicorn -w 2 bench.peers.bare_memcached:app`` with gunicorn's default
sync worker, and with tfwsgi's worker class and threads) on loopback, drives each with wrk,
interleaving the servers round by round, and prints (and writes to docs/cache-benchmark.md) the
medians.
Then it fires concurrent identical requests at a slow signature across two tfwsgi instances and
counts the model runs, with the memcached lease on and off.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import MemcachedServer, Server, free_port, metric_total  # noqa: E402
from models import build_multi  # noqa: E402
from tfwsgi.demo import build_half_plus_two  # noqa: E402

BODY = '{"instances": [1.0, 2.0, 5.0]}'


def wrk(url: str, body: str, connections: int, duration: int) -> tuple[float, float, int]:
    """Requests/s, p99 latency (ms) and non-2xx count from wrk."""
    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = [[{body}]]\n"
        'wrk.headers["Content-Type"] = "application/json"\n')
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency",
                          "-s", str(script), url], capture_output=True, text=True, check=True).stdout
    script.unlink()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: .*", out)
    if errors:
        print("   wrk:", errors.group(0))
    return rps, float(p99.group(1)) * scale, int(bad.group(1)) if bad else 0


# The peer on tfwsgi's own worker class and request threads (gunicorn_conf.py's values).
TFWSGI_WORKER = ("-k", "tfwsgi.worker.EventWorker", "--threads", "64")


def start_peer(mc: MemcachedServer, log: Path, args: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "BENCH_MEMCACHED": mc.address}
    with open(log, "wb") as f:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "gunicorn"), "-w", "2", "-b",
                                 f"127.0.0.1:{port}", "--no-control-socket", *args,
                                 "bench.peers.bare_memcached:app"],
                                cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}/get"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if requests.post(url, timeout=1).ok:
                return proc, url
        except requests.RequestException:
            time.sleep(0.1)
    raise RuntimeError("peer did not start")


def throughput(args: argparse.Namespace, work: Path) -> dict:
    models = work / "models"
    build_half_plus_two(str(models / "half_plus_two" / "1"))
    mc = MemcachedServer()
    srv = Server({"TFWSGI_MODEL_NAME": "half_plus_two",
                  "TFWSGI_MODEL_BASE_PATH": str(models / "half_plus_two"),
                  "TFWSGI_MEMCACHED": mc.address}, workers=2, log_path=work / "tfwsgi.log")
    peer, peer_url = start_peer(mc, work / "peer.log")
    peer_t, peer_t_url = start_peer(mc, work / "peer-threaded.log", TFWSGI_WORKER)
    try:
        srv.wait_ready()
        url = srv.url + "/v1/models/half_plus_two:predict"
        first = requests.post(url, data=BODY, timeout=10)
        assert "stored" in first.headers["Cache-Status"], first.headers
        hit = requests.post(url, data=BODY, timeout=10)
        assert hit.headers["Cache-Status"] == "tfwsgi; hit"
        mc.set("bench:bare", hit.content)  # the peer returns a body of the same size
        before = srv.get("/metrics").text
        runs_before = metric_total(before, "tfwsgi_model_runs_total")
        errors_before = metric_total(before, "tfwsgi_cache_lookups_total", result="error")
        results: dict[str, list[tuple[float, float, int]]] = {"tfwsgi": [], "peer": [], "peer_t": []}
        for r in range(args.rounds):
            for name, target in (("tfwsgi", url), ("peer", peer_url), ("peer_t", peer_t_url)):
                results[name].append(wrk(target, BODY, args.connections, args.duration))
                print(f"round {r + 1} {name}: {results[name][-1][0]:.0f} req/s, "
                      f"p99 {results[name][-1][1]:.1f} ms, non-2xx {results[name][-1][2]}")
        after = srv.get("/metrics").text
        runs_after = metric_total(after, "tfwsgi_model_runs_total")
        hits = metric_total(after, "tfwsgi_cache_lookups_total", result="hit")
        errors = metric_total(after, "tfwsgi_cache_lookups_total", result="error") - errors_before
        return {"results": results, "model_runs_during_load": runs_after - runs_before, "hits": hits,
                "errors": errors}
    finally:
        srv.stop()
        for p in (peer, peer_t):
            os.killpg(p.pid, 15)
            p.wait(10)
        mc.stop()


def stampede(work: Path, lease_ms: int, requests_n: int = 16) -> tuple[float, float]:
    """Model runs and wall time for ``requests_n`` identical concurrent misses on two instances."""
    models = work / "models"
    if not (models / "multi" / "7").exists():
        build_multi(str(models / "multi" / "7"))
    mc = MemcachedServer()
    env = {"TFWSGI_MODEL_NAME": "multi", "TFWSGI_MODEL_BASE_PATH": str(models / "multi"),
           "TFWSGI_MEMCACHED": mc.address, "TFWSGI_CACHE_LEASE_MS": str(lease_ms)}
    servers = [Server(env, workers=2, log_path=work / f"stampede-{lease_ms}-{i}.log") for i in range(2)]
    try:
        for s in servers:
            s.wait_ready()
        barrier = threading.Barrier(requests_n)
        body = {"signature_name": "slow", "instances": [float(lease_ms)]}

        def call(i: int) -> None:
            barrier.wait()
            r = servers[i % 2].post("/v1/models/multi:predict", json=body)
            assert r.ok, r.text

        started = time.monotonic()
        threads = [threading.Thread(target=call, args=(i,)) for i in range(requests_n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - started
        runs = sum(metric_total(s.get("/metrics").text, "tfwsgi_model_runs_total", signature_name="slow")
                   for s in servers)
        return runs, wall
    finally:
        for s in servers:
            s.stop()
        mc.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per server")
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with tempfile.TemporaryDirectory(prefix="tfwsgi-bench-") as tmp:
        work = Path(tmp)
        t = throughput(args, work)
        lease_on = stampede(work, 1000)
        lease_off = stampede(work, 0)
    med = {k: statistics.median(r[0] for r in v) for k, v in t["results"].items()}
    p99 = {k: statistics.median(r[1] for r in v) for k, v in t["results"].items()}
    bad = {k: sum(r[2] for r in v) for k, v in t["results"].items()}
    ratio = med["tfwsgi"] / max(med["peer"], med["peer_t"])
    lines = [
        "# Cache benchmark",
        "",
        f"`.venv/bin/python bench/cache_bench.py --duration {args.duration} --rounds {args.rounds} "
        f"--connections {args.connections}` on {os.cpu_count()} cores; wrk -t2 -c{args.connections}, "
        "2 workers per server, one memcached, all on loopback.",
        "",
        "| server | req/s (median) | p99 ms (median) | non-2xx |",
        "|---|---|---|---|",
        f"| tfwsgi cache hit (`half_plus_two:predict`) | {med['tfwsgi']:.0f} | {p99['tfwsgi']:.1f} "
        f"| {bad['tfwsgi']} |",
        f"| bare Flask route, one memcached get (sync workers) | {med['peer']:.0f} | {p99['peer']:.1f} "
        f"| {bad['peer']} |",
        f"| bare Flask route, one memcached get (tfwsgi's worker) | {med['peer_t']:.0f} "
        f"| {p99['peer_t']:.1f} | {bad['peer_t']} |",
        "",
        f"**Ratio tfwsgi / the faster bare route: {ratio:.3f}** (target ≥ 0.9). "
        "Model runs during the tfwsgi load: "
        f"{t['model_runs_during_load']:.0f}; cache hits: {t['hits']:.0f}; lookups that failed "
        f"(memcached slower than the 100 ms timeout: served as misses, fail-open): {t['errors']:.0f}.",
        "",
        "Stampede: 16 identical concurrent requests for an uncached ~0.15 s prediction, spread over two "
        "tfwsgi instances of 2 workers sharing one memcached:",
        "",
        "| lease | model runs | wall time s |",
        "|---|---|---|",
        f"| on (`TFWSGI_CACHE_LEASE_MS=1000`) | {lease_on[0]:.0f} | {lease_on[1]:.2f} |",
        f"| off (`TFWSGI_CACHE_LEASE_MS=0`) | {lease_off[0]:.0f} | {lease_off[1]:.2f} |",
    ]
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "cache-benchmark.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
