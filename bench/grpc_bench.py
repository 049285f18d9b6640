"""gRPC vs REST benchmark (issue 19): one tfwsgi server, the same models and load over both transports.

    .venv/bin/python bench/grpc_bench.py [--cases mlp-1,mlp-32,conv-1] [--processes 2] [--inflight 16]
        [--duration 10] [--warmup 2] [--rounds 5] [--tfwsgi-env 'TFWSGI_ENABLE_BATCHING=true']
        [--smoke]

Builds the reference models (bench/reference_models.py) and starts ONE tfwsgi server
(``gunicorn -c gunicorn_conf.py tfwsgi:app -w 2``) serving both, REST and gRPC (``TFWSGI_PORT``) on
free loopback ports, prediction cache off. The load comes from ``--processes`` client processes
(this file run as ``grpc_bench.py _client``), each with ``--inflight`` calls in flight at all times:

- gRPC: tensorflow-serving-api's ``PredictionServiceStub`` on ``grpc.aio`` channels (``--channels``
  per process, each its own TCP connection, so the kernel's SO_REUSEPORT hash spreads them over the
  two workers), a ``PredictRequest`` whose tensor is ``tf.make_tensor_proto(x)`` (``tensor_content``).
- REST: ``POST /v1/models/<model>:predict`` with ``{"instances": x.tolist()}`` as JSON, one
  keep-alive HTTP/1.1 connection per call in flight (HTTP/1.1 has no multiplexing), asyncio streams.

Each process builds its bodies once, before any run: ``POOL`` distinct random tensors per case (its
own seed), the same numbers for both transports, used in turn, so no two consecutive calls of a
connection repeat and every call runs the model (the cache is off too). A call's latency is from
its send to its answer, in the client; a run counts the calls answered inside its window, after a
warmup (connections opened, batch sizes met) that is not counted.

Rounds interleave: every round runs every case over both transports, the order of the transports
alternating between rounds; the tables give each figure's median over rounds and the range of
req/s. During every counted window the harness reads, from /proc, the CPU time of each server
process, of each client process and of the whole machine, and which worker holds each connection.

Whether the client is the bottleneck, the harness checks two ways: (1) the CPU the client
processes use (cores, and µs per call, against the server's; and the busiest process: one well
under a core is not CPU-bound); (2) a scaling check, in every round: mlp-1 on both transports with
twice the client processes and half the calls in flight and gRPC channels each (the same totals,
so only the processes change); if the clients were the limit, twice the processes would raise
throughput.

Server and client share this machine's cores; nothing is pinned (pinning the client to a core would
take that core from the server). The client's CPU is measured instead, and the server's share of
the machine is reported beside it, so a reader sees what the server had. Writes
docs/grpc-benchmark.md and docs/grpc-benchmark.png; prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

CASES: dict[str, tuple[str, tuple[int, ...]]] = {
    "mlp-1": ("mlp", (1, 784)),
    "mlp-32": ("mlp", (32, 784)),
    "conv-1": ("conv", (1, 32, 32, 3)),
}
TRANSPORTS = ("grpc", "rest")
POOL = 32  # distinct bodies per client process and case
CALL_TIMEOUT = 30.0  # seconds, a call's deadline (gRPC) or read timeout (REST)
SCALING_CASE = "mlp-1"  # the lightest call for the server, so the client's share is largest
TICK = os.sysconf("SC_CLK_TCK")


# --- pure parts (tests/unit/test_grpc_bench.py) ---------------------------------------------------

def percentiles_ms(latencies: list[float]) -> tuple[float, float]:
    """p50 and p99 (ms) of latencies in seconds; NaN when there are none."""
    if not latencies:
        return float("nan"), float("nan")
    p50, p99 = np.percentile(np.asarray(latencies) * 1000, [50, 99])
    return float(p50), float(p99)


def summarise(runs: list[dict]) -> dict:
    """Runs of one case and transport over the rounds: the median of each figure, the range of
    req/s, and the errors of every run."""
    rps = sorted(r["rps"] for r in runs)

    def med(key: str) -> float:
        return float(np.median([r[key] for r in runs]))

    return {"rps": med("rps"), "rps_min": rps[0], "rps_max": rps[-1], "examples": med("examples"),
            "p50_ms": med("p50_ms"), "p99_ms": med("p99_ms"), "server_cores": med("server_cores"),
            "client_cores": med("client_cores"), "other_cores": med("other_cores"),
            "server_us": med("server_us"), "client_us": med("client_us"),
            "client_proc_max": max(r["client_proc_max"] for r in runs),
            "errors": sum(r["errors"] for r in runs), "rounds": len(runs)}


def cpu_seconds(stat: str) -> float:
    """User + system CPU seconds (every thread) from the text of /proc/<pid>/stat."""
    fields = stat[stat.rindex(")") + 2:].split()  # the command may hold spaces and parentheses
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime: fields 14 and 15 of stat


def machine_seconds(stat: str) -> tuple[float, float]:
    """(busy, total) CPU seconds of all cores from the text of /proc/stat."""
    ticks = [int(x) for x in stat.splitlines()[0].split()[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    total = sum(ticks[:8])  # guest time is already counted in user
    return (total - idle) / TICK, total / TICK


def fmt_range(s: dict) -> str:
    return f"{s['rps']:.0f} ({s['rps_min']:.0f}–{s['rps_max']:.0f})"


def render(cases: list[str], results: dict[str, dict[str, dict]], scaling: dict[str, dict],
           args: dict, notes: list[str]) -> str:
    """docs/grpc-benchmark.md: ``results[case][transport]`` and ``scaling[transport]`` are
    ``summarise`` outputs (``scaling[t]["base"]`` and ``["more"]``)."""
    lines = ["# gRPC vs REST benchmark", ""]
    if args.get("smoke"):
        lines += ["**SMOKE RUN** — short runs on a shared, busy machine, taken to prove the harness, "
                  "not to measure: the figures below are not the benchmark's results.", ""]
    p, m = args["processes"], args["inflight"]
    lines += [
        f"`{args['command']}` on {os.cpu_count()} cores. One tfwsgi server (`gunicorn -c "
        "gunicorn_conf.py tfwsgi:app`, 2 workers, prediction cache off"
        + (f", {args['tfwsgi_env']}" if args.get("tfwsgi_env") else "")
        + "), REST and gRPC on loopback. "
        f"Load: {p} client processes × {m} calls in flight ({p * m} in all); gRPC over "
        f"tensorflow-serving-api's stubs on grpc.aio, {args['channels']} channels (connections) per "
        "process, tensors as `tf.make_tensor_proto` writes them (`tensor_content`); REST "
        "`{\"instances\": x.tolist()}` JSON to `/v1/models/<model>:predict`, one keep-alive "
        "connection per call in flight. Every call a distinct tensor "
        f"({POOL} per case and process, in turn). Each figure is the median of {args['rounds']} "
        f"interleaved rounds of {args['duration']} s (after {args['warmup']} s not counted); req/s is "
        "followed by the range over rounds.",
        "",
        "| case | transport | req/s | examples/s | p50 ms | p99 ms | gRPC ÷ REST req/s | errors "
        "| server CPU (cores) | client CPU (cores) | other CPU (cores) | server µs/call | client µs/call |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        g, r = results[case].get("grpc"), results[case].get("rest")
        for t in TRANSPORTS:
            s = results[case].get(t)
            if s is None:
                continue
            ratio = f"{g['rps'] / r['rps']:.2f}" if t == "grpc" and g and r and r["rps"] else ""
            lines.append(
                f"| {case} | {'gRPC' if t == 'grpc' else 'REST'} | {fmt_range(s)} | {s['examples']:.0f} | "
                f"{s['p50_ms']:.1f} | {s['p99_ms']:.1f} | {ratio} | {s['errors']} | "
                f"{s['server_cores']:.2f} | {s['client_cores']:.2f} | {s['other_cores']:.2f} | "
                f"{s['server_us']:.0f} | {s['client_us']:.0f} |")
    if scaling:
        lines += ["", "## Is the client the bottleneck?", "",
                  f"{SCALING_CASE}, the same {p * m} calls in flight from {p} processes × {m} and from "
                  f"{2 * p} processes × {max(1, m // 2)}, with as many connections (gRPC: "
                  f"{max(1, args['channels'] // 2)} channels per process instead of {args['channels']}), "
                  "in the same rounds (medians; req/s range):", "",
                  f"| transport | {p} processes req/s | {2 * p} processes req/s | ratio | "
                  f"client CPU (cores), {p} → {2 * p} | busiest client process (cores), any run |",
                  "|---|---|---|---|---|---|"]
        for t, s in scaling.items():
            base, more = s["base"], s["more"]
            lines.append(f"| {'gRPC' if t == 'grpc' else 'REST'} | {fmt_range(base)} | {fmt_range(more)} | "
                         f"{more['rps'] / base['rps']:.2f} | {base['client_cores']:.2f} → "
                         f"{more['client_cores']:.2f} | "
                         f"{max(base['client_proc_max'], more['client_proc_max']):.2f} |")
    lines += ["", *[f"- {n}" for n in notes], "", "![req/s and latency, gRPC and REST](grpc-benchmark.png)"]
    return "\n".join(lines) + "\n"


# --- the client process (``grpc_bench.py _client``) -------------------------------------------------

def tensors(case: str, process: int) -> list[np.ndarray]:
    """The ``POOL`` distinct inputs of a client process for a case (the same for both transports)."""
    rng = np.random.default_rng([process, list(CASES).index(case)])
    return [rng.random(CASES[case][1], dtype=np.float32) for _ in range(POOL)]


def _status_length(head: bytes) -> tuple[int, int]:
    lines = head.decode("latin-1").split("\r\n")
    length = -1
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            length = int(value)
    return int(lines[0].split()[1]), length


class _Window:
    """A run's timing and what it saw: the calls answered in [start, end) (whenever sent), their
    latencies, and errors by kind."""

    def __init__(self, t0: float, warmup: float, duration: float) -> None:
        self.start, self.end = t0 + warmup, t0 + warmup + duration
        self.latencies: list[float] = []
        self.errors: dict[str, int] = {}

    def done(self, sent: float, error: str | None) -> None:
        now = time.monotonic()
        if self.start <= now < self.end:
            if error is None:
                self.latencies.append(now - sent)
            else:
                self.errors[error] = self.errors.get(error, 0) + 1


def keeps_alive(head: bytes) -> bool:
    """Whether an HTTP/1.1 answer's head leaves the connection open (a server closes it after its
    answer with ``Connection: close``: tfwsgi after 1000 requests on a connection, as nginx's
    keepalive_requests; gunicorn's sync workers after each)."""
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "connection":
            return "close" not in value.lower()
    return True


async def _rest_loop(port: int, requests: list[bytes], w: _Window, offset: int) -> None:
    """One keep-alive connection, one call at a time; a failed call is counted and the connection
    opened anew, as is one the server closes after its answer (``Connection: close``), as a
    browser or wrk does, without counting an error."""
    i = offset
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
    while time.monotonic() < w.end:
        sent = time.monotonic()
        try:
            if conn is None:
                conn = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), CALL_TIMEOUT)
            reader, writer = conn
            writer.write(requests[i % len(requests)])
            i += 1
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CALL_TIMEOUT)
            status, length = _status_length(head)
            if length < 0:
                raise ValueError("no Content-Length")
            await reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError,
                ValueError) as exc:
            w.done(sent, type(exc).__name__)
            if conn is not None:
                conn[1].close()
            conn = None
            await asyncio.sleep(0.01)  # not a busy loop while the server is away
            continue
        w.done(sent, None if status == 200 else f"HTTP {status}")
        if not keeps_alive(head):
            conn[1].close()
            conn = None
    if conn is not None:
        conn[1].close()


async def _grpc_loop(stub: Any, requests: list[Any], w: _Window, offset: int) -> None:
    import grpc

    i = offset
    while time.monotonic() < w.end:
        sent = time.monotonic()
        try:
            await stub.Predict(requests[i % len(requests)], timeout=CALL_TIMEOUT)
            w.done(sent, None)
        except grpc.aio.AioRpcError as exc:
            w.done(sent, exc.code().name)
        i += 1


async def _client_run(cmd: dict, bodies: dict[str, dict[str, list[Any]]], ports: dict[str, int]) -> dict:
    w = _Window(cmd["t0"], cmd["warmup"], cmd["duration"])
    await asyncio.sleep(max(0.0, cmd["t0"] - time.monotonic()))
    requests = bodies[cmd["case"]][cmd["transport"]]
    n = cmd["inflight"]
    if cmd["transport"] == "rest":
        await asyncio.gather(*(_rest_loop(ports["rest"], requests, w, k) for k in range(n)))
    else:
        import grpc
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        # Channels to one target share one connection unless each has its own subchannel pool.
        options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", -1),
                   ("grpc.max_send_message_length", -1)]
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{ports['grpc']}", options=options)
                    for _ in range(min(n, cmd["channels"]))]
        try:
            stubs = [prediction_service_pb2_grpc.PredictionServiceStub(c) for c in channels]
            await asyncio.gather(*(_grpc_loop(stubs[k % len(stubs)], requests, w, k) for k in range(n)))
        finally:
            for c in channels:
                await c.close()
    return {"latencies": w.latencies, "errors": w.errors}


def client_main(argv: list[str]) -> int:
    """One client process: builds its bodies, says ``ready``, then runs each command read from stdin
    (one JSON line) and answers one JSON line, until stdin closes."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    process, rest_port, grpc_port = (int(a) for a in argv)
    ports = {"rest": rest_port, "grpc": grpc_port}
    bodies: dict[str, dict[str, list[Any]]] = {}
    for case, (model, _) in CASES.items():
        rest, grpc_ = [], []
        for x in tensors(case, process):
            body = json.dumps({"instances": x.tolist()}).encode()
            rest.append((f"POST /v1/models/{model}:predict HTTP/1.1\r\nHost: 127.0.0.1:{rest_port}\r\n"
                         f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                         ).encode() + body)
            req = predict_pb2.PredictRequest()
            req.model_spec.name = model
            req.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
            assert req.inputs["x"].tensor_content, "make_tensor_proto wrote typed fields"
            grpc_.append(req)
        bodies[case] = {"rest": rest, "grpc": grpc_}

    async def serve() -> None:  # one event loop for every run (grpc.aio keeps to one loop)
        loop = asyncio.get_running_loop()
        print(json.dumps({"ready": os.getpid()}), flush=True)
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            result = await _client_run(json.loads(line), bodies, ports)
            print(json.dumps(result), flush=True)

    asyncio.run(serve())
    return 0


# --- the harness ---------------------------------------------------------------------------------

class Clients:
    """The client processes, started once (each imports TensorFlow for its stubs and tensors)."""

    def __init__(self, count: int, rest_port: int, grpc_port: int) -> None:
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)}
        self.procs = [subprocess.Popen(
            [sys.executable, __file__, "_client", str(i), str(rest_port), str(grpc_port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            for i in range(count)]
        for p in self.procs:
            line = p.stdout.readline() if p.stdout else ""
            if not line.startswith('{"ready"'):
                raise RuntimeError(f"client {p.pid} did not start: {line!r}")

    def pids(self, n: int) -> list[int]:
        return [p.pid for p in self.procs[:n]]

    def send(self, n: int, cmd: dict) -> None:
        for p in self.procs[:n]:
            assert p.stdin
            p.stdin.write(json.dumps(cmd) + "\n")
            p.stdin.flush()

    def collect(self, n: int) -> list[dict]:
        return [json.loads(p.stdout.readline()) for p in self.procs[:n] if p.stdout]

    def stop(self) -> None:
        for p in self.procs:
            with contextlib.suppress(OSError):
                if p.stdin:
                    p.stdin.close()
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)


def read_cpu(pids: list[int]) -> dict[int, float]:
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            out[pid] = cpu_seconds(Path(f"/proc/{pid}/stat").read_text())
    return out


def connection_owners(port: int, pids: set[int]) -> dict[int, int]:
    """Established TCP connections on local ``port`` that each of ``pids`` holds (/proc)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                inodes.add(fields[9])
    owners = {}
    for pid in pids:
        n = 0
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    n += link.startswith("socket:[") and link[8:-1] in inodes
        owners[pid] = n
    return owners


def measure(srv: Any, clients: Clients, ports: dict[str, int], transport: str, case: str, n: int,
            inflight: int, channels: int, warmup: float, duration: float) -> dict:
    """One run: ``n`` client processes × ``inflight`` calls over ``channels`` connections each."""
    return run_window(srv.pid, sorted(srv.worker_pids()), ports[transport], clients, n,
                      {"transport": transport, "case": case, "inflight": inflight, "channels": channels},
                      CASES[case][1][0], warmup, duration)


def run_window(master: int, workers: list[int], port: int, clients: Clients, n: int, command: dict,
               examples: int, warmup: float, duration: float) -> dict:
    """One run of ``command`` on ``n`` client processes (each call ``examples`` examples), for any
    server: the client's figures and, over the counted window, the CPU of the server (``master``
    and its ``workers``), the clients and the machine, and the connections each worker holds on
    ``port``."""
    server = [master, *workers]
    t0 = time.monotonic() + 0.3
    clients.send(n, {**command, "t0": t0, "warmup": warmup, "duration": duration})
    time.sleep(max(0.0, t0 + warmup - time.monotonic()))
    machine0 = machine_seconds(Path("/proc/stat").read_text())
    server0, client0 = read_cpu(server), read_cpu(clients.pids(n))
    time.sleep(duration / 2)
    owners = connection_owners(port, set(workers))
    time.sleep(max(0.0, t0 + warmup + duration - time.monotonic()))
    machine1 = machine_seconds(Path("/proc/stat").read_text())
    server1, client1 = read_cpu(server), read_cpu(clients.pids(n))
    answers = clients.collect(n)
    latencies = [x for a in answers for x in a["latencies"]]
    errors: dict[str, int] = {}
    for a in answers:
        for k, v in a["errors"].items():
            errors[k] = errors.get(k, 0) + v
    calls = len(latencies)
    server_s = sum(server1[p] - server0[p] for p in server1 if p in server0)
    client_s = sum(client1[p] - client0[p] for p in client1 if p in client0)
    busy_s = machine1[0] - machine0[0]
    p50, p99 = percentiles_ms(latencies)
    return {"rps": calls / duration, "examples": calls * examples / duration,
            "p50_ms": p50, "p99_ms": p99, "errors": sum(errors.values()), "error_kinds": errors,
            "server_cores": server_s / duration, "client_cores": client_s / duration,
            "other_cores": max(0.0, busy_s - server_s - client_s) / duration,
            "server_us": server_s / calls * 1e6 if calls else float("nan"),
            "client_us": client_s / calls * 1e6 if calls else float("nan"),
            "client_proc_max": max((client1[p] - client0[p] for p in client1 if p in client0),
                                   default=0.0) / duration,
            "worker_cores": [(server1[p] - server0[p]) / duration for p in workers if p in server0],
            "connections": [owners[p] for p in workers]}


def check_agreement(ports: dict[str, int]) -> None:
    """Both transports give the same predictions for the same tensor (else the comparison is void)."""
    import grpc
    import requests
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}") as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        for case, (model, _) in CASES.items():
            x = tensors(case, 0)[0]
            req = predict_pb2.PredictRequest()
            req.model_spec.name = model
            req.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
            by_grpc = tf.make_ndarray(stub.Predict(req, timeout=CALL_TIMEOUT).outputs["y"])
            by_rest = requests.post(f"http://127.0.0.1:{ports['rest']}/v1/models/{model}:predict",
                                    json={"instances": x.tolist()}, timeout=CALL_TIMEOUT).json()
            assert np.allclose(by_grpc, by_rest["predictions"], rtol=1e-4, atol=1e-6), case


def plot(cases: list[str], results: dict[str, dict[str, dict]], path: Path, smoke: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(cases), figsize=(4 * len(cases), 6.5), squeeze=False)
    names = {"grpc": "gRPC", "rest": "REST"}
    for col, case in enumerate(cases):
        res = results[case]
        ts = [t for t in TRANSPORTS if t in res]
        rps = [res[t]["rps"] for t in ts]
        err = [[res[t]["rps"] - res[t]["rps_min"] for t in ts],
               [res[t]["rps_max"] - res[t]["rps"] for t in ts]]
        axes[0][col].bar([names[t] for t in ts], rps, yerr=err, capsize=4, color=["C0", "C1"][: len(ts)])
        axes[0][col].set_title(case)
        axes[0][col].set_ylabel("requests/s (median, range)")
        xs = np.arange(len(ts))
        axes[1][col].bar(xs - 0.2, [res[t]["p50_ms"] for t in ts], 0.4, label="p50")
        axes[1][col].bar(xs + 0.2, [res[t]["p99_ms"] for t in ts], 0.4, label="p99")
        axes[1][col].set_xticks(xs, [names[t] for t in ts])
        axes[1][col].set_ylabel("latency (ms)")
        axes[1][col].legend()
        for ax in axes[:, col]:
            ax.grid(True, axis="y", alpha=0.3)
    if smoke:
        fig.suptitle("SMOKE RUN (busy shared machine, short runs): not the benchmark's figures")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def add_common_arguments(parser: argparse.ArgumentParser, cases: Mapping[str, Any], output: str,
                         tfwsgi_env: str, inflight_help: str) -> None:
    """The options both harnesses (this one and v2_bench) take."""
    parser.add_argument("--cases", default=",".join(cases))
    parser.add_argument("--processes", type=int, default=2, help="client processes")
    parser.add_argument("--inflight", type=int, default=16, help=inflight_help)
    parser.add_argument("--duration", type=float, default=10, help="seconds of each counted run")
    parser.add_argument("--warmup", type=float, default=2, help="seconds of load before each, not counted")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tfwsgi-env", default=tfwsgi_env,
                        help="TFWSGI_*=value settings for tfwsgi, space-separated")
    parser.add_argument("--no-scaling", action="store_true", help="skip the client-scaling check")
    parser.add_argument("--smoke", action="store_true",
                        help="label the docs a smoke run (short runs to prove the harness)")
    parser.add_argument("--output", default=str(ROOT / "docs" / output),
                        help="the markdown file (the plot is written beside it, .png)")


def reference_config(work: Path) -> Path:
    """The MLP and the conv net (bench/reference_models.py) under ``work``, in one model config."""
    from reference_models import build_conv, build_mlp

    build_mlp(work / "mlp" / "1")
    build_conv(work / "conv" / "1")
    config = work / "models.config"
    config.write_text("model_config_list {\n"
                      + "".join(f'  config {{ name: "{m}" base_path: "{work / m}" '
                                'model_platform: "tensorflow" }\n' for m in ("mlp", "conv"))
                      + "}\n")
    return config


def report_run(rnd: int, case: str, transport: str, r: dict, spread: list[str]) -> None:
    """Print one run's line, and keep its connections' spread for the notes."""
    spread.append(f"{case} {transport}: connections per worker {r['connections']}, worker CPU "
                  + "/".join(f"{c:.2f}" for c in r["worker_cores"]))
    print(f"round {rnd + 1} {case:7s} {transport:10s} {r['rps']:7.0f} req/s "
          f"{r['examples']:8.0f} ex/s p50 {r['p50_ms']:6.1f} p99 {r['p99_ms']:6.1f} ms "
          f"errors {r['error_kinds'] or 0} server {r['server_cores']:.2f} client "
          f"{r['client_cores']:.2f} other {r['other_cores']:.2f} cores; "
          f"{spread[-1].split(': ', 1)[1]}", flush=True)


def publish(script: str, text: Callable[[str], str], output: str,
            plot_to: Callable[[Path], None]) -> None:
    """Write the report (``text(command)``, the command as run) and its plot beside it."""
    command = f".venv/bin/python bench/{script} " + " ".join(
        a if " " not in a else f"'{a}'" for a in sys.argv[1:])
    report = text(command.strip())
    print(report)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    plot_to(out.with_suffix(".png"))


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_client":
        return client_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, CASES, "grpc-benchmark.md", "TFWSGI_ENABLE_BATCHING=true",
                         "calls in flight per client process")
    parser.add_argument("--channels", type=int, default=8,
                        help="gRPC channels (connections) per process; SO_REUSEPORT hashes each to a worker, "
                        "and few connections can leave one worker with most of them")
    args = parser.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    assert set(cases) <= set(CASES), cases
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import Server, free_port

    started = time.monotonic()
    runs: dict[str, dict[str, list[dict]]] = {c: {t: [] for t in TRANSPORTS} for c in cases}
    scale_runs: dict[str, dict[str, list[dict]]] = {t: {"base": [], "more": []} for t in TRANSPORTS}
    scaling = not args.no_scaling and SCALING_CASE in cases
    spread: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tfwsgi-grpc-bench-") as tmp:
        work = Path(tmp)
        config = reference_config(work)
        grpc_port = free_port()
        env = {"TFWSGI_MODEL_CONFIG_FILE": str(config), "TFWSGI_PORT": str(grpc_port),
               "TFWSGI_CACHE_ENABLED": "false", **dict(kv.split("=", 1) for kv in args.tfwsgi_env.split())}
        srv = Server(env, workers=2, log_path=work / "tfwsgi.log")
        clients = None
        try:
            srv.wait_ready()
            ports = {"rest": srv.port, "grpc": grpc_port}
            check_agreement(ports)
            clients = Clients(2 * args.processes if scaling else args.processes, srv.port, grpc_port)
            p, m = args.processes, args.inflight
            for rnd in range(args.rounds):
                order = TRANSPORTS if rnd % 2 == 0 else TRANSPORTS[::-1]
                for case in cases:
                    for t in order:
                        r = measure(srv, clients, ports, t, case, p, m, args.channels, args.warmup,
                                    args.duration)
                        runs[case][t].append(r)
                        report_run(rnd, case, t, r, spread)
                        if scaling and case == SCALING_CASE:
                            scale_runs[t]["base"].append(r)
                            r2 = measure(srv, clients, ports, t, case, 2 * p, max(1, m // 2),
                                         max(1, args.channels // 2), args.warmup, args.duration)
                            scale_runs[t]["more"].append(r2)
                            print(f"round {rnd + 1} {case:6s} {t:4s} {2 * p} processes × {max(1, m // 2)}: "
                                  f"{r2['rps']:7.0f} req/s client {r2['client_cores']:.2f} cores "
                                  f"errors {r2['error_kinds'] or 0}", flush=True)
        finally:
            if clients is not None:
                clients.stop()
            srv.stop()
    results = {c: {t: summarise(rs) for t, rs in runs[c].items() if rs} for c in cases}
    scaled = {t: {k: summarise(v) for k, v in s.items()} for t, s in scale_runs.items() if s["base"]} \
        if scaling else {}
    worst = max((max(r["connections"]) - min(r["connections"]) for c in runs.values() for rs in c.values()
                 for r in rs), default=0)
    notes = [
        "CPU figures are read from /proc over each counted window: the server is gunicorn's master and "
        "its 2 workers, the client its processes (every thread, grpcio's included), other is the rest "
        "of the machine (other people's work on a shared machine; the harness itself is a few ms). "
        "µs/call is CPU time per answered call.",
        "Nothing is pinned: server and client share the cores, and the client's CPU is what the server "
        "could not have.",
        f"Connections per worker and each worker's CPU, every run: largest difference between the two "
        f"workers' connection counts {worst}. " + "; ".join(spread[: 2 * len(cases)])
        + ("; …" if len(spread) > 2 * len(cases) else "") + ".",
        f"The whole run took {(time.monotonic() - started) / 60:.1f} min.",
    ]
    publish("grpc_bench.py",
            lambda command: render(cases, results, scaled, {**vars(args), "command": command}, notes),
            args.output, lambda png: plot(cases, results, png, args.smoke))
    return 0


if __name__ == "__main__":
    sys.exit(main())
