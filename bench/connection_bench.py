"""Connection-scaling benchmark (issue 16): tfwsgi vs the plain Flask + gunicorn peer, 32 to 10,000
connections.

    .venv/bin/python bench/connection_bench.py [--connections 32,1024,4096,10000] [--duration 20]
        [--tfwsgi-env 'TFWSGI_ENABLE_BATCHING=true'] [--tfwsgi-args ''] [--servers tfwsgi,peer]
        [--warmup 5] [--no-idle] [--no-slow]

Builds the reference MLP (bench/reference_models.py), starts tfwsgi (``gunicorn -c gunicorn_conf.py
tfwsgi:app -w 2``, prediction cache off, plus ``--tfwsgi-env`` and ``--tfwsgi-args``) and the peer
(``gunicorn -w 2 bench.peers.plain_app:app``), both with ``--backlog 4096``, and drives each with
wrk over loopback (``-t2 -c C --timeout 60s``) at each connection count C, keep-alive, every
request a one-example predict of its own (wrk's ``request()`` draws 784 random numbers), after a
``--warmup`` of the same load that is not counted. Per run: throughput, mean and p99 latency, the
requests in service (Little's law: throughput × mean latency) against C, and wrk's errors by kind.
A third of the way into each run a probe opens a fresh connection and times one predict, connect
to last byte (up to 120 s), against the allowance 3 × C ÷ throughput + 0.5 s.

For tfwsgi alone, two more: the memory of idle connections (``--keep-alive 120``; 10,000
connections each get one answer and then stay open, held by one asyncio client process; each
worker's PSS before and while they are held) and slow clients (p99 of 32 wrk connections, alone and
while 2,000 connections of one asyncio process trickle a request's headers at a byte a second).

The harness raises its file-descriptor limit to the hard limit before it starts anything (wrk, the
servers and the helper clients inherit it). Writes docs/connection-benchmark.md and
docs/connection-benchmark.png; prints the table. Exits 0 whatever the verdicts: it measures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import resource
import select
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from reference_models import build_mlp  # noqa: E402
from swap_bench import pss_kb  # noqa: E402
from throughput_bench import Peer, parse_wrk  # noqa: E402

from conftest import Server  # noqa: E402

PATH = "/v1/models/m:predict"
BACKLOG = 16384  # the listen queue a burst of 10,000 connects needs (net.core.somaxconn is raised to it)
PROBE_TIMEOUT = 120.0
WRK_TIMEOUT = "60s"
IDLE_CONNECTIONS = 10_000
IDLE_BUDGET = 60.0  # seconds for the idle connections to get their answers (keep-alive is 120 s)
SLOW_CLIENTS = 2_000

# Every request a body of its own: 784 numbers drawn from a pool of 4096 (per wrk thread, seeded by
# the thread's number), so no two bodies of a run are the same and no cache could answer.
LUA = r"""
next_id = 0
function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
end
function init(args)
  math.randomseed(1 + (id or 0) * 7919 + os.time())
  pool = {}
  for i = 1, 4096 do pool[i] = string.format("%.6f", math.random()) end
  headers = {["Content-Type"] = "application/json"}
  x = {}
end
function request()
  for i = 1, 784 do x[i] = pool[math.random(4096)] end
  return wrk.format("POST", nil, headers, '{"instances": [[' .. table.concat(x, ",") .. ']]}')
end
"""

_POOL = [f"{random.random():.6f}" for _ in range(4096)]


def random_body() -> bytes:
    """A one-example predict (1×784) of random numbers, as the wrk script makes them."""
    return ('{"instances": [[' + ",".join(random.choices(_POOL, k=784)) + "]]}").encode()


def request_bytes(port: int, body: bytes) -> bytes:
    return (f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def parse_head(head: bytes) -> tuple[int, int]:
    """Status and Content-Length of a response head (its bytes up to the blank line)."""
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return status, length


def probe(port: int, timeout: float = PROBE_TIMEOUT) -> tuple[float, int | str]:
    """One predict on a fresh connection: seconds from connect to the response's last byte, and
    the status (or what went wrong); the whole exchange is bounded by ``timeout``."""
    data = request_bytes(port, random_body())
    start = time.monotonic()
    deadline = start + timeout
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(data)
            buf = b""
            need: int | None = None
            status = 0
            while need is None or len(buf) < need:
                s.settimeout(max(0.001, deadline - time.monotonic()))
                chunk = s.recv(65536)
                if not chunk:
                    return time.monotonic() - start, "closed"
                buf += chunk
                if need is None and b"\r\n\r\n" in buf:
                    head, _, _ = buf.partition(b"\r\n\r\n")
                    status, length = parse_head(head)
                    need = len(head) + 4 + length
            return time.monotonic() - start, status
    except TimeoutError:
        return time.monotonic() - start, "timeout"
    except OSError as exc:
        return time.monotonic() - start, type(exc).__name__


def server_connections(port: int) -> int:
    """Connections of the server's side of loopback ``port`` that are open or waiting to be accepted
    (established or closed by the client, not yet by the server), from /proc/net/tcp{,6}."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] in ("01", "08"):
                    n += 1
    return n


def settle(port: int) -> None:
    """Wait (bounded) until the last run's connections are gone, those left in the listen queue
    included (a server answers them before any new one), and a fresh connection is answered."""
    start = time.monotonic()
    deadline = start + PROBE_TIMEOUT
    quiet = 0
    while time.monotonic() < deadline and quiet < 2:
        quiet = quiet + 1 if server_connections(port) == 0 else 0
        time.sleep(0.5)
    while time.monotonic() < deadline:
        if probe(port, deadline - time.monotonic())[1] == 200:
            if time.monotonic() - start > 5:
                print(f"  (port {port} settled in {time.monotonic() - start:.0f} s)", flush=True)
            return
        time.sleep(0.5)
    print(f"  (port {port}: connections left or no answer to a fresh one after {PROBE_TIMEOUT:.0f} s; "
          f"{server_connections(port)} open)", flush=True)


# The load generator shares the 2 cores with the servers. A server whose threads keep the run queue
# full starves it: measured at 4096 connections against tfwsgi, wrk's threads ran 447 ms and waited
# 5558 ms for a core in 3 s, with thousands of answers unread in its sockets, so wrk's latency and
# "in service" measured wrk. Real clients run elsewhere: wrk runs under SCHED_FIFO (`chrt -f`), so
# it is never kept waiting (it needs ~15% of a core, so it cannot starve the servers). Both servers
# get the same client. --no-rt-client turns it off.
RT_CLIENT = ["chrt", "-f", "10"]


@contextlib.contextmanager
def realtime() -> Any:
    """This thread under SCHED_FIFO while the block runs (when RT_CLIENT is on); no child
    process is started inside, so none inherits it."""
    if not RT_CLIENT:
        yield
        return
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    try:
        yield
    finally:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def wrk(url: str, script: Path, connections: int, seconds: int) -> subprocess.Popen:
    return subprocess.Popen([*RT_CLIENT, "wrk", f"-t{min(2, connections)}", f"-c{connections}",
                             f"-d{seconds}s", "--timeout", WRK_TIMEOUT, "--latency", "-s", str(script), url],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, seconds: int, connections: int) -> dict:
    """wrk's summary, once it has run its ``seconds`` (it is killed if it overstays by 90 s)."""
    try:
        out, _ = proc.communicate(timeout=seconds + 90)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise RuntimeError(f"wrk did not finish:\n{out[-2000:]}") from None
    try:
        r = parse_wrk(out)
    except AttributeError:  # no summary
        raise RuntimeError(f"wrk failed:\n{out[-2000:]}") from None
    if r["requests"] == 0:
        r["p99_ms"] = r["mean_ms"] = float("nan")
        print(f"  (wrk, {connections} connections: no request answered in {seconds} s)", flush=True)
    return r


def run_wrk(url: str, script: Path, connections: int, seconds: int) -> dict:
    return finish(wrk(url, script, connections, seconds), seconds, connections)


def start(who: str, work: Path, env: dict[str, str], args: tuple[str, ...]) -> tuple[Any, str]:
    """A running server (``tfwsgi`` or ``peer``), 2 workers, and its predict URL."""
    if who == "tfwsgi":
        srv = Server({"TFWSGI_MODEL_NAME": "m", "TFWSGI_MODEL_BASE_PATH": str(work / "mlp"),
                      "TFWSGI_CACHE_ENABLED": "false", **env}, workers=2,
                     log_path=work / f"tfwsgi-{time.monotonic_ns()}.log",
                     extra_args=("--backlog", str(BACKLOG), *args))
        try:
            srv.wait_ready()
        except BaseException:
            srv.stop()
            raise
        return srv, srv.url + PATH
    peer = Peer(work / "mlp" / "1", work / f"peer-{time.monotonic_ns()}.log", ("--backlog", str(BACKLOG)))
    try:
        peer.wait(random_body().decode())
    except BaseException:
        peer.stop()
        raise
    return peer, peer.url


def load(srv: Any, url: str, script: Path, c: int, duration: int, warmup: int) -> dict:
    """One counted wrk run at ``c`` connections (after a warmup), with the fresh-connection probe."""
    if warmup:
        run_wrk(url, script, c, warmup)
        settle(srv.port)
    proc = wrk(url, script, c, duration)
    started = time.monotonic()
    time.sleep(duration / 3)
    with realtime():  # the probe is a client too: not kept waiting for a core (see RT_CLIENT)
        probe_s, probe_status = probe(srv.port)
    probed_at = time.monotonic() - started
    r = finish(proc, duration, c)
    settle(srv.port)
    in_service = r["rps"] * r["mean_ms"] / 1000 if r["requests"] else 0.0
    return {**r, "in_service": in_service, "probe_s": probe_s, "probe_status": probe_status,
            "probe_in_load": probed_at <= duration,
            "allowance_s": 3 * c / r["rps"] + 0.5 if r["rps"] else math.inf}


def sockets(pid: int) -> int:
    """Open sockets of a process (its listeners and connections)."""
    n = 0
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return n


def helper(mode: str, port: int, n: int, budget: float) -> subprocess.Popen:
    """This script as an asyncio client process (``_idle-client`` or ``_slow-client``)."""
    return subprocess.Popen([sys.executable, __file__, mode, str(port), str(n), str(budget)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def read_line(proc: subprocess.Popen, timeout: float) -> dict:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""
    return json.loads(line) if line.strip() else {}


def end_helper(proc: subprocess.Popen) -> dict:
    """Close the helper's stdin (it closes its connections and says what it saw), bounded."""
    try:
        proc.stdin.close()
        last = read_line(proc, 30)
        proc.wait(30)
        return last
    except (subprocess.TimeoutExpired, OSError, ValueError):
        proc.kill()
        proc.wait(10)
        return {}


def idle_memory(work: Path, env: dict[str, str], args: tuple[str, ...], script: Path) -> dict:
    srv, url = start("tfwsgi", work, env, ("--keep-alive", "120", *args))
    try:
        run_wrk(url, script, 32, 3)  # the first requests' allocations are not the connections'
        settle(srv.port)
        time.sleep(1)
        pids = sorted(srv.worker_pids())
        before = {p: (pss_kb(p), sockets(p)) for p in pids}
        t = time.monotonic()
        client = helper("_idle-client", srv.port, IDLE_CONNECTIONS, IDLE_BUDGET)
        try:
            seen = read_line(client, IDLE_BUDGET + 60)
            seen["seconds"] = time.monotonic() - t
            time.sleep(2)
            after = {p: (pss_kb(p), sockets(p)) for p in srv.worker_pids()}
        finally:
            seen["end"] = end_helper(client)
        workers = [{"pid": p, "pss_before_mb": before[p][0] / 1024,
                    "pss_held_mb": after[p][0] / 1024 if p in after else math.nan,
                    "sockets_added": after[p][1] - before[p][1] if p in after else 0} for p in pids]
        return {"client": seen, "workers": workers, "restarted": sorted(set(after) - set(before))}
    finally:
        srv.stop()


def slow_clients(work: Path, env: dict[str, str], args: tuple[str, ...], script: Path, duration: int,
                 warmup: int) -> dict:
    srv, url = start("tfwsgi", work, env, args)
    try:
        if warmup:
            run_wrk(url, script, 32, warmup)
        alone = run_wrk(url, script, 32, duration)
        settle(srv.port)
        client = helper("_slow-client", srv.port, SLOW_CLIENTS, warmup + duration + 150)
        try:
            seen = read_line(client, 60)
            if warmup:
                run_wrk(url, script, 32, warmup)
            slow = run_wrk(url, script, 32, duration)
        finally:
            seen["end"] = end_helper(client)
        return {"alone": alone, "slow": slow, "client": seen}
    finally:
        srv.stop()


# The helper client processes (this file run as ``connection_bench.py _idle-client PORT N BUDGET``).

async def _hold_until_stdin_closes() -> None:
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


async def _idle_client(port: int, n: int, budget: float) -> None:
    """``n`` connections, each sends one predict and reads the answer, then stays open. Prints what
    it saw once all are answered or ``budget`` seconds passed; closes them all when stdin closes."""
    counts = {"connected": 0, "answered": 0, "not_200": 0, "failed": 0}
    writers: list[asyncio.StreamWriter] = []

    async def one() -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writers.append(writer)
            counts["connected"] += 1
            writer.write(request_bytes(port, random_body()))
            status, length = parse_head(await reader.readuntil(b"\r\n\r\n"))
            await reader.readexactly(length)
            counts["answered" if status == 200 else "not_200"] += 1
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            counts["failed"] += 1

    tasks = [asyncio.create_task(one()) for _ in range(n)]
    await asyncio.wait(tasks, timeout=budget)
    still_open = sum(not w.is_closing() for w in writers)
    print(json.dumps({**counts, "open": still_open, "requested": n}), flush=True)
    await _hold_until_stdin_closes()
    still_open = sum(not w.is_closing() for w in writers)
    for task in tasks:
        task.cancel()
    for w in writers:
        w.close()
    print(json.dumps({**counts, "open": still_open}), flush=True)


async def _slow_client(port: int, n: int, budget: float) -> None:
    """``n`` connections that send a request's headers a byte a second, never ending them (for at
    most ``budget`` seconds). Prints how many connected; closes them when stdin closes."""
    head = (f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            "X-Slow: ").encode() + b"a" * 100_000
    writers: list[asyncio.StreamWriter] = []
    failed = 0

    async def connect() -> None:
        nonlocal failed
        try:
            writers.append((await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 30))[1])
        except (OSError, asyncio.TimeoutError):
            failed += 1

    await asyncio.gather(*(connect() for _ in range(n)))
    print(json.dumps({"connected": len(writers), "failed": failed}), flush=True)
    done = asyncio.ensure_future(_hold_until_stdin_closes())
    end = time.monotonic() + budget
    sent = 0
    while not done.done() and time.monotonic() < end:
        for w in writers:
            if not w.is_closing():
                w.write(head[sent:sent + 1])
        sent += 1
        await asyncio.wait([done], timeout=1.0)
    closed = sum(w.is_closing() for w in writers)
    for w in writers:
        w.close()
    await done
    print(json.dumps({"connected": len(writers), "closed_by_server": closed, "bytes_sent": sent}), flush=True)


# The report.

def fmt(x: float, spec: str = ".0f") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def verdicts(r: dict, base_rps: float, c: int) -> dict[str, bool]:
    return {"in_service": r["in_service"] >= 0.9 * c,
            "probe": r["probe_status"] == 200 and r["probe_s"] <= r["allowance_s"],
            "throughput": r["rps"] >= 0.9 * base_rps,
            "errors": r["errors"] == 0}


def yes(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def plot(results: dict, levels: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    styles = {"tfwsgi": "o-", "peer": "s--"}
    for who, res in results.items():
        cs = [c for c in levels if c in res]
        axes[0].plot(cs, [res[c]["rps"] for c in cs], styles[who], label=who)
        axes[1].plot(cs, [res[c]["in_service"] / c for c in cs], styles[who], label=who)
        line, = axes[2].plot(cs, [res[c]["probe_s"] for c in cs], styles[who], label=f"{who} probe")
        axes[2].plot(cs, [min(res[c]["allowance_s"], 1e4) for c in cs], ":", color=line.get_color(),
                     label=f"{who} allowance")
        bad = [c for c in cs if res[c]["probe_status"] != 200]
        axes[2].plot(bad, [res[c]["probe_s"] for c in bad], "x", color="red", markersize=10)
    axes[1].axhline(0.9, color="grey", linewidth=0.8)
    axes[0].set_ylim(bottom=0)
    axes[1].set_ylim(bottom=0)
    axes[0].set_ylabel("requests/s")
    axes[1].set_ylabel("in service ÷ connections (goal ≥ 0.9)")
    axes[2].set_ylabel("fresh connection's first predict (s); x: no 200")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("connections")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def report(args: argparse.Namespace, levels: list[int], results: dict, idle: dict | None,
           slow: dict | None, notes: list[str]) -> str:
    base_c = 32 if 32 in levels else levels[0]
    lines = [
        "# Connection-scaling benchmark",
        "",
        f"`{' '.join(['.venv/bin/python', 'bench/connection_bench.py', shlex.join(sys.argv[1:])]).strip()}`"
        + f" on {os.cpu_count()} cores. Both servers: gunicorn, 2 workers, `--backlog {BACKLOG}`, "
        "loopback; tfwsgi with its cache off"
        + (f", `{args.tfwsgi_env}`" if args.tfwsgi_env else "")
        + (f", `{args.tfwsgi_args}`" if args.tfwsgi_args else "")
        + "; the peer is bench/peers/plain_app.py (gunicorn sync). Load: wrk "
        f"`-t2 -c C -d {args.duration}s --timeout {WRK_TIMEOUT} --latency`, keep-alive, each request a "
        f"1×784 MLP predict of its own random numbers, after {args.warmup} s of the same load (not "
        "counted)"
        + (", wrk under SCHED_FIFO (`chrt -f 10`: on a machine shared with the servers it would "
           "otherwise wait for a core with answers unread, see RT_CLIENT in the script)"
           if RT_CLIENT else ", wrk at normal priority (`--no-rt-client`)")
        + ". In service = throughput × mean latency (Little's law). The probe opens a fresh "
        f"connection a third of the way into the run and times one predict, connect to last byte "
        f"(up to {PROBE_TIMEOUT:.0f} s); allowance = 3 × C ÷ throughput + 0.5 s. Verdicts at every C "
        f"above {base_c}: in service ≥ 0.9 × C; probe ≤ allowance; throughput ≥ 0.9 × the {base_c}-"
        "connection figure; no timeouts, socket errors or non-2xx.",
        "",
        "| server | C | req/s | mean ms | p99 ms | in service | ÷ C | probe s | allowance s | timeouts "
        "| socket errors c/r/w | non-2xx | in service ≥ 0.9 C | probe ≤ allowance | req/s ≥ 0.9 × "
        f"{base_c}-conn | no errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for who, res in results.items():
        base = res.get(base_c, {}).get("rps", math.nan)
        for c in levels:
            if c not in res:
                continue
            r = res[c]
            probe_cell = fmt(r["probe_s"], ".2f")
            if r["probe_status"] != 200:
                probe_cell += f" ({r['probe_status']})"
            if not r["probe_in_load"]:
                probe_cell += " (after the load)"
            v = verdicts(r, base, c) if c != base_c else None
            cells = [yes(v[k]) for k in ("in_service", "probe", "throughput", "errors")] if v else ["—"] * 4
            lines.append(
                f"| {who} | {c} | {r['rps']:.0f} | {fmt(r['mean_ms'], '.1f')} | {fmt(r['p99_ms'], '.1f')} | "
                f"{r['in_service']:.0f} | {r['in_service'] / c:.2f} | {probe_cell} | "
                f"{fmt(r['allowance_s'], '.2f')} | {r['timeout']} | "
                f"{r['connect']}/{r['read']}/{r['write']} | {r['non2xx']} | " + " | ".join(cells) + " |")
    if idle:
        cl = idle["client"]
        lines += ["", "## Idle connections (tfwsgi, `--keep-alive 120`)", "",
                  f"{IDLE_CONNECTIONS} connections from one asyncio process, each sends one predict, reads "
                  f"the answer and stays open. Within {IDLE_BUDGET:.0f} s "
                  f"({fmt(cl.get('seconds', math.nan), '.0f')} s taken): "
                  f"{cl.get('connected', '?')} connected, {cl.get('answered', '?')} answered 200, "
                  f"{cl.get('not_200', '?')} answered otherwise, {cl.get('failed', '?')} failed, "
                  f"{cl.get('open', '?')} open when PSS was read (2 s later); "
                  f"{cl.get('end', {}).get('open', '?')} still open when they were closed. "
                  "Goal: ≤ 50 MB added per worker for 10,000 idle connections (all answered).", "",
                  "| worker | PSS before (MB) | PSS held (MB) | added (MB) | sockets added | ≤ 50 MB |",
                  "|---|---|---|---|---|---|"]
        all_held = cl.get("answered") == IDLE_CONNECTIONS
        for w in idle["workers"]:
            added = w["pss_held_mb"] - w["pss_before_mb"]
            ok = yes(added <= 50) if all_held else \
                f"no verdict: {cl.get('answered', 0)} of {IDLE_CONNECTIONS} answered"
            lines.append(f"| {w['pid']} | {w['pss_before_mb']:.1f} | {fmt(w['pss_held_mb'], '.1f')} | "
                         f"{fmt(added, '+.1f')} | {w['sockets_added']} | {ok} |")
        if idle["restarted"]:
            lines.append(f"\nWorkers that appeared meanwhile (a restart): {idle['restarted']}.")
    if slow:
        a, s, cl = slow["alone"], slow["slow"], slow["client"]
        ratio = s["p99_ms"] / a["p99_ms"] if a["p99_ms"] else math.nan
        ok = not math.isnan(ratio) and ratio <= 2
        lines += ["", "## Slow clients (tfwsgi)", "",
                  f"32 wrk connections for {args.duration} s (after {args.warmup} s not counted), alone and "
                  f"while {SLOW_CLIENTS} connections ({cl.get('connected', '?')} connected, "
                  f"{cl.get('failed', '?')} failed to) trickle a request's headers at 1 byte/s, never "
                  f"ending them; {cl.get('end', {}).get('closed_by_server', '?')} of them had been closed by "
                  "the server at the end. Goal: p99 with them ≤ 2 × p99 without.", "",
                  "| run | req/s | requests | p99 ms | timeouts | socket errors c/r/w | non-2xx |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in (("alone", a), (f"with {SLOW_CLIENTS} slow clients", s)):
            lines.append(f"| {name} | {r['rps']:.0f} | {r['requests']} | {fmt(r['p99_ms'], '.1f')} | "
                         f"{r['timeout']} | {r['connect']}/{r['read']}/{r['write']} | {r['non2xx']} |")
        if not s["requests"]:
            lines += ["", "No request of the 32 wrk connections was answered while the slow clients were "
                      "connected."]
        lines += ["", f"p99 ratio {fmt(ratio, '.2f')}: {yes(ok)}"
                  + ("" if s["errors"] == 0 else f" ({s['errors']} errors with the slow clients)") + "."]
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", "![throughput, in service ÷ C and the fresh connection's first predict against "
              "connections](connection-benchmark.png)"]
    return "\n".join(lines) + "\n"


def raise_fd_limit(need: int) -> list[str]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = int(Path("/proc/sys/fs/nr_open").read_text())
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    note = f"File descriptors: soft limit raised from {soft} to the hard limit {hard}, inherited by wrk, " \
           "the servers and the helper clients"
    if hard < need:
        note += f"; NOT ENOUGH: the largest run needs about {need} in one process"
        print(f"warning: RLIMIT_NOFILE hard limit {hard} < {need}: the largest runs will fail", flush=True)
    return [note + "."]


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] in ("_idle-client", "_slow-client"):
        client = _idle_client if sys.argv[1] == "_idle-client" else _slow_client
        asyncio.run(client(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", default="32,1024,4096,10000")
    parser.add_argument("--duration", type=int, default=20, help="seconds of each counted wrk run")
    parser.add_argument("--warmup", type=int, default=5, help="seconds of the same load before each run")
    parser.add_argument("--tfwsgi-env", default="TFWSGI_ENABLE_BATCHING=true",
                        help="TFWSGI_*=value settings for tfwsgi, space-separated")
    parser.add_argument("--tfwsgi-args", default="", help="extra gunicorn flags for tfwsgi")
    parser.add_argument("--servers", default="tfwsgi,peer")
    parser.add_argument("--no-idle", action="store_true", help="skip the idle-connections memory run")
    parser.add_argument("--no-slow", action="store_true", help="skip the slow-clients run")
    parser.add_argument("--no-rt-client", action="store_true",
                        help="run wrk at normal priority (by default SCHED_FIFO, see RT_CLIENT)")
    args = parser.parse_args()
    if args.no_rt_client or os.geteuid() != 0:
        RT_CLIENT.clear()
    levels = sorted(int(c) for c in args.connections.split(","))
    servers = [s for s in args.servers.split(",") if s]
    assert set(servers) <= {"tfwsgi", "peer"}, servers
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    need = max(levels + ([] if args.no_idle else [IDLE_CONNECTIONS])) + 1000
    notes = raise_fd_limit(need)
    somaxconn_file = Path("/proc/sys/net/core/somaxconn")
    original_somaxconn = somaxconn = int(somaxconn_file.read_text())
    if somaxconn < BACKLOG and os.geteuid() == 0:
        with contextlib.suppress(OSError):  # as an operator would for 10,000 clients; restored at the end
            somaxconn_file.write_text(str(BACKLOG))
            somaxconn = int(somaxconn_file.read_text())
    notes.append(f"Listen backlog: `--backlog {BACKLOG}` on both servers, net.core.somaxconn {somaxconn} "
                 + (f"(raised from {original_somaxconn} for the run, restored after) "
                    if somaxconn != original_somaxconn else "")
                 + f"(the kernel uses the smaller, {min(BACKLOG, somaxconn)}); connections beyond it wait "
                 "for SYN retries (no connect error unless net.ipv4.tcp_abort_on_overflow is set).")
    try:
        return _run(args, levels, servers, notes, somaxconn)
    finally:
        if somaxconn != original_somaxconn:
            somaxconn_file.write_text(str(original_somaxconn))


def _run(args: argparse.Namespace, levels: list[int], servers: list[str], notes: list[str],
         somaxconn: int) -> int:
    env = dict(kv.split("=", 1) for kv in args.tfwsgi_env.split())
    tfwsgi_args = tuple(args.tfwsgi_args.split())
    results: dict[str, dict[int, dict]] = {}
    idle = slow = None
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tfwsgi-connections-") as tmp:
        work = Path(tmp)
        build_mlp(work / "mlp" / "1")
        script = work / "predict.lua"
        script.write_text(LUA)
        for who in servers:
            srv, url = start(who, work, env, tfwsgi_args)
            results[who] = {}
            try:
                for c in levels:
                    r = results[who][c] = load(srv, url, script, c, args.duration, args.warmup)
                    print(f"{who:6s} c={c:5d} {r['rps']:7.0f} req/s mean {r['mean_ms']:8.1f} ms "
                          f"p99 {r['p99_ms']:8.1f} ms in service {r['in_service']:6.0f} "
                          f"({r['in_service'] / c:.2f} C) probe {r['probe_s']:6.2f} s ({r['probe_status']}) "
                          f"allowance {r['allowance_s']:.2f} s errors c/r/w/t "
                          f"{r['connect']}/{r['read']}/{r['write']}/{r['timeout']} non-2xx {r['non2xx']}",
                          flush=True)
            finally:
                srv.stop()
        if "tfwsgi" in servers and not args.no_idle:
            idle = idle_memory(work, env, tfwsgi_args, script)
            print(f"idle: {json.dumps(idle)}", flush=True)
        if "tfwsgi" in servers and not args.no_slow:
            slow = slow_clients(work, env, tfwsgi_args, script, args.duration, args.warmup)
            print(f"slow: alone p99 {slow['alone']['p99_ms']:.1f} ms, with slow clients "
                  f"{slow['slow']['p99_ms']:.1f} ms; {json.dumps(slow['client'])}", flush=True)
    for who, res in results.items():
        if any(r["connect"] for r in res.values()):
            notes.append(f"{who}: wrk counted connect errors: "
                         + ", ".join(f"{r['connect']} at C={c}" for c, r in res.items() if r["connect"])
                         + f" (the listen backlog, {min(BACKLOG, somaxconn)}, or the fd limit).")
        late = [c for c, r in res.items() if not r["probe_in_load"]]
        if late:
            notes.append(f"{who}: the probe ended after the load had stopped at C={late} (it waited longer "
                         f"than the rest of the {args.duration} s run).")
    notes.append(f"wrk leaves requests that time out ({WRK_TIMEOUT}) out of its latency figures, and a "
                 "request still unanswered when a run ends is counted nowhere (not even as a timeout when "
                 f"the run is shorter than {WRK_TIMEOUT}): connections that waited the whole run (in the "
                 "listen queue, or for a worker thread) show only as in service ÷ C below 1. wrk counts a "
                 "connection the server closes mid-request as a read error.")
    notes.append("In service is measured from wrk's side: between a response and its connection's next "
                 "request wrk spends time of its own (its event loop, the Lua that makes the body"
                 + ("" if RT_CLIENT else ", and waiting for a core the servers share")
                 + "), so at few connections and short latencies in service ÷ C is below 1 with no "
                 "request waiting in the server. Each counted run opens its C connections anew, so "
                 "its first seconds include connecting them all (in service above 1 comes from "
                 "requests wrk sent on connections still in the server's listen queue).")
    notes.append(f"The whole run took {(time.monotonic() - started) / 60:.1f} min.")
    text = report(args, levels, results, idle, slow, notes)
    print(text)
    (ROOT / "docs").mkdir(exist_ok=True)
    (ROOT / "docs" / "connection-benchmark.md").write_text(text)
    if results:
        plot(results, levels, ROOT / "docs" / "connection-benchmark.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
