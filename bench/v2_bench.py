"""KServe v2 benchmark (issue 20): 32-example requests over v2 binary, v2 JSON and v1 JSON on one
tfwsgi server, against the plain Flask app.

    .venv/bin/python bench/v2_bench.py [--cases mlp-32,conv-32] [--processes 2] [--inflight 16]
        [--duration 10] [--warmup 2] [--rounds 5] [--tfwsgi-env 'TFWSGI_…=…'] [--smoke]

Builds the reference models (bench/reference_models.py) and starts ONE tfwsgi server
(``gunicorn -c gunicorn_conf.py tfwsgi:app -w 2``, prediction cache off) serving both, and, per
model, the plain Flask app (bench/peers/plain_app.py, ``gunicorn -w 2``, JSON). Every request
carries 32 examples (a float32 tensor [32, 784] or [32, 32, 32, 3]) as:

- ``v2-binary``: ``POST /v2/models/<m>/infer``, a JSON header then the tensor's raw bytes
  (``Inference-Header-Content-Length``, ``binary_data_size``), the output asked for as binary
  (``binary_data``): what ``tritonclient.http`` sends with ``binary_data=True``;
- ``v2-json``: the same route, the tensor as flat ``data`` (as tritonclient and kserve write it);
- ``v1-json``: ``POST /v1/models/<m>:predict`` with ``{"instances": x.tolist()}``;
- ``plain-json``: the same body to the plain Flask app (gunicorn's sync workers close the
  connection after each answer: the client then opens a new one, as wrk does).

The load, the clients and the accounting are bench/grpc_bench.py's (its helpers are imported, not
copied): ``--processes`` client processes (this file run as ``v2_bench.py _client``; numpy and
asyncio streams only, no TensorFlow), each with ``--inflight`` keep-alive HTTP/1.1 connections,
one call in flight on each; ``POOL`` distinct tensors per case and process, used in turn, the same
numbers for every transport; rounds interleave the transports (their order rotating), every
figure is the median over rounds; during every counted window /proc gives the CPU time of the
server's processes (master and workers), the client's and the whole machine's. Whether the client
is the bottleneck: its CPU against the server's, and a scaling check (the first case over v2
binary, the lightest call for the server, with twice the processes and half the calls in flight
each). Before the runs, all four answers are checked to agree on the same tensor. Writes
docs/v2-benchmark.md and docs/v2-benchmark.png; prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from grpc_bench import (  # noqa: E402
    Clients,
    _rest_loop,
    _Window,
    add_common_arguments,
    fmt_range,
    publish,
    reference_config,
    report_run,
    run_window,
    summarise,
)

CASES: dict[str, tuple[str, tuple[int, ...]]] = {
    "mlp-32": ("mlp", (32, 784)),
    "conv-32": ("conv", (32, 32, 32, 3)),
}
TRANSPORTS = ("v2-binary", "v2-json", "v1-json", "plain-json")
PEER = "plain-json"  # the baseline of the ratio column
SCALING = "v2-binary"
POOL = 32  # distinct tensors per client process and case
CALL_TIMEOUT = 30.0


# --- pure parts (tests/unit/test_v2_bench.py) ------------------------------------------------------

def http_request(path: str, port: int, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    """A whole HTTP/1.1 keep-alive POST, ready to write to a socket."""
    head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in (headers or {"Content-Type": "application/json"}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def request_body(transport: str, x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """The body and headers of one request carrying ``x`` (float32) over ``transport``."""
    json_type = {"Content-Type": "application/json"}
    if transport == "v2-binary":
        raw = np.ascontiguousarray(x, dtype="<f4").tobytes()
        header = json.dumps({
            "inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                        "parameters": {"binary_data_size": len(raw)}}],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}).encode()
        return header + raw, {"Content-Type": "application/octet-stream",
                              "Inference-Header-Content-Length": str(len(header))}
    if transport == "v2-json":
        doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                           "data": x.reshape(-1).tolist()}]}
        return json.dumps(doc).encode(), json_type
    if transport in ("v1-json", "plain-json"):
        return json.dumps({"instances": x.tolist()}).encode(), json_type
    raise ValueError(f"unknown transport {transport!r}")


def request_path(transport: str, model: str) -> str:
    if transport.startswith("v2"):
        return f"/v2/models/{model}/infer"
    return "/v1/models/m:predict" if transport == PEER else f"/v1/models/{model}:predict"


def response_tensor(transport: str, body: bytes, header_length: str | None) -> np.ndarray:
    """The output ``y`` of an answer, whatever the transport."""
    if transport == "v2-binary":
        assert header_length is not None, "a binary answer has Inference-Header-Content-Length"
        n = int(header_length)
        out = json.loads(body[:n])["outputs"][0]
        return np.frombuffer(body[n:n + out["parameters"]["binary_data_size"]], "<f4").reshape(out["shape"])
    doc = json.loads(body)
    if transport == "v2-json":
        out = doc["outputs"][0]
        return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    return np.asarray(doc["predictions"], dtype=np.float32)




def tensors(case: str, process: int) -> list[np.ndarray]:
    """The ``POOL`` distinct inputs of a client process for a case (the same for every transport)."""
    rng = np.random.default_rng([process, list(CASES).index(case)])
    return [rng.random(CASES[case][1], dtype=np.float32) for _ in range(POOL)]


def render(cases: list[str], results: dict[str, dict[str, dict]], scaling: dict[str, dict],
           args: dict, notes: list[str]) -> str:
    """docs/v2-benchmark.md: ``results[case][transport]`` and ``scaling["base"/"more"]`` are
    grpc_bench ``summarise`` outputs."""
    lines = ["# KServe v2 benchmark: v2 binary, v2 JSON, v1 JSON and the plain Flask app", ""]
    if args.get("smoke"):
        lines += ["**SMOKE RUN** — short runs on a shared, busy machine, taken to prove the harness, "
                  "not to measure: the figures below are not the benchmark's results.", ""]
    p, m = args["processes"], args["inflight"]
    lines += [
        f"`{args['command']}` on {os.cpu_count()} cores. One tfwsgi server (`gunicorn -c "
        "gunicorn_conf.py tfwsgi:app`, 2 workers, prediction cache off"
        + (f", {args['tfwsgi_env']}" if args.get("tfwsgi_env") else "")
        + ") and, per model, the plain Flask app (`bench/peers/plain_app.py`, `gunicorn -w 2`), on "
        "loopback. Every request carries 32 examples: v2 binary is `/v2/models/<m>/infer` with the "
        "tensor's raw bytes after a JSON header and the output asked for as binary; v2 JSON the same "
        "route with flat `data`; v1 JSON `{\"instances\": x.tolist()}` to `/v1/models/<m>:predict`; the "
        f"plain app the same v1 body. Load: {p} client processes × {m} keep-alive connections, one "
        f"call in flight on each ({p * m} in all; the plain app's sync workers close a connection "
        "after each answer, and the client opens a new one); every call a distinct tensor "
        f"({POOL} per case and process, in turn). Each figure is the median of {args['rounds']} "
        f"interleaved rounds of {args['duration']} s (after {args['warmup']} s not counted); req/s is "
        "followed by the range over rounds.",
        "",
        "| case | transport | req/s | examples/s | p50 ms | p99 ms | ÷ plain app req/s | errors "
        "| server CPU (cores) | client CPU (cores) | other CPU (cores) | server µs/call | client µs/call |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        peer = results[case].get(PEER)
        for t in TRANSPORTS:
            s = results[case].get(t)
            if s is None:
                continue
            ratio = f"{s['rps'] / peer['rps']:.2f}" if peer and peer["rps"] else ""
            lines.append(
                f"| {case} | {t} | {fmt_range(s)} | {s['examples']:.0f} | {s['p50_ms']:.1f} | "
                f"{s['p99_ms']:.1f} | {ratio} | {s['errors']} | {s['server_cores']:.2f} | "
                f"{s['client_cores']:.2f} | {s['other_cores']:.2f} | {s['server_us']:.0f} | "
                f"{s['client_us']:.0f} |")
    if scaling:
        base, more = scaling["base"], scaling["more"]
        lines += ["", "## Is the client the bottleneck?", "",
                  f"{cases[0]} over {SCALING}, the same {p * m} calls in flight from {p} processes × {m} "
                  f"and from {2 * p} processes × {max(1, m // 2)}, in the same rounds (medians; req/s "
                  "range):", "",
                  f"| {p} processes req/s | {2 * p} processes req/s | ratio | client CPU (cores), "
                  f"{p} → {2 * p} | busiest client process (cores), any run |",
                  "|---|---|---|---|---|",
                  f"| {fmt_range(base)} | {fmt_range(more)} | {more['rps'] / base['rps']:.2f} | "
                  f"{base['client_cores']:.2f} → {more['client_cores']:.2f} | "
                  f"{max(base['client_proc_max'], more['client_proc_max']):.2f} |"]
    lines += ["", *[f"- {n}" for n in notes], "",
              "![req/s and latency per transport](v2-benchmark.png)"]
    return "\n".join(lines) + "\n"


# --- the client process (``v2_bench.py _client``) --------------------------------------------------



def client_main(argv: list[str]) -> int:
    """One client process: builds its requests, says ``ready``, then runs each command read from
    stdin (one JSON line: case, transport, calls in flight, timing) and answers one JSON line."""
    process, tfwsgi_port = int(argv[0]), int(argv[1])
    peer_ports = dict(zip(CASES, (int(a) for a in argv[2:]), strict=True))
    requests: dict[str, dict[str, list[bytes]]] = {}
    for case, (model, _) in CASES.items():
        requests[case] = {}
        for t in TRANSPORTS:
            port = peer_ports[case] if t == PEER else tfwsgi_port
            requests[case][t] = [http_request(request_path(t, model), port, *request_body(t, x))
                                 for x in tensors(case, process)]

    async def run(cmd: dict) -> dict:
        w = _Window(cmd["t0"], cmd["warmup"], cmd["duration"])
        await asyncio.sleep(max(0.0, cmd["t0"] - time.monotonic()))
        port = peer_ports[cmd["case"]] if cmd["transport"] == PEER else tfwsgi_port
        reqs = requests[cmd["case"]][cmd["transport"]]
        await asyncio.gather(*(_rest_loop(port, reqs, w, k) for k in range(cmd["inflight"])))
        return {"latencies": w.latencies, "errors": w.errors}

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        print(json.dumps({"ready": os.getpid()}), flush=True)
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            print(json.dumps(await run(json.loads(line))), flush=True)

    asyncio.run(serve())
    return 0


class V2Clients(Clients):
    """grpc_bench's client processes, running this file's client."""

    def __init__(self, count: int, tfwsgi_port: int, peer_ports: list[int]) -> None:
        import subprocess

        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.procs = [subprocess.Popen(
            [sys.executable, __file__, "_client", str(i), str(tfwsgi_port), *map(str, peer_ports)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env) for i in range(count)]
        for p in self.procs:
            line = p.stdout.readline() if p.stdout else ""
            if not line.startswith('{"ready"'):
                raise RuntimeError(f"client {p.pid} did not start: {line!r}")


# --- the harness -----------------------------------------------------------------------------------

def measure(master: int, workers: list[int], port: int, clients: Clients, transport: str, case: str,
            n: int, inflight: int, warmup: float, duration: float) -> dict:
    """One run (grpc_bench.run_window, for any server): ``n`` client processes × ``inflight``
    calls."""
    return run_window(master, workers, port, clients, n,
                      {"transport": transport, "case": case, "inflight": inflight},
                      CASES[case][1][0], warmup, duration)


def check_agreement(tfwsgi_port: int, peer_ports: dict[str, int]) -> None:
    """Every transport gives the same predictions for the same tensor (else the comparison is void)."""
    import requests

    for case, (model, _) in CASES.items():
        x = tensors(case, 0)[0]
        answers = {}
        for t in TRANSPORTS:
            port = peer_ports[case] if t == PEER else tfwsgi_port
            body, headers = request_body(t, x)
            r = requests.post(f"http://127.0.0.1:{port}{request_path(t, model)}", data=body,
                              headers=headers, timeout=CALL_TIMEOUT)
            assert r.status_code == 200, (case, t, r.text[:300])
            answers[t] = response_tensor(t, r.content, r.headers.get("Inference-Header-Content-Length"))
        for t, y in answers.items():
            assert y.shape == answers[PEER].shape and np.allclose(y, answers[PEER], rtol=1e-4, atol=1e-6), \
                (case, t)


def plot(cases: list[str], results: dict[str, dict[str, dict]], path: Path, smoke: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(cases), figsize=(5 * len(cases), 6.5), squeeze=False)
    for col, case in enumerate(cases):
        res = results[case]
        ts = [t for t in TRANSPORTS if t in res]
        err = [[res[t]["rps"] - res[t]["rps_min"] for t in ts],
               [res[t]["rps_max"] - res[t]["rps"] for t in ts]]
        axes[0][col].bar(ts, [res[t]["rps"] for t in ts], yerr=err, capsize=4,
                         color=[f"C{TRANSPORTS.index(t)}" for t in ts])
        axes[0][col].set_title(f"{case} (32 examples per request)")
        axes[0][col].set_ylabel("requests/s (median, range)")
        xs = np.arange(len(ts))
        axes[1][col].bar(xs - 0.2, [res[t]["p50_ms"] for t in ts], 0.4, label="p50")
        axes[1][col].bar(xs + 0.2, [res[t]["p99_ms"] for t in ts], 0.4, label="p99")
        axes[1][col].set_xticks(xs, ts)
        axes[1][col].set_ylabel("latency (ms)")
        axes[1][col].legend()
        for ax in axes[:, col]:
            ax.grid(True, axis="y", alpha=0.3)
            ax.tick_params(axis="x", labelsize=8)
    if smoke:
        fig.suptitle("SMOKE RUN (busy shared machine, short runs): not the benchmark's figures")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_client":
        return client_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser, CASES, "v2-benchmark.md", "",
                         "connections (calls in flight) per process")
    args = parser.parse_args()
    cases = [c for c in args.cases.split(",") if c]
    assert cases and set(cases) <= set(CASES), cases
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(ROOT / "tests"))
    from throughput_bench import Peer

    from conftest import Server

    started = time.monotonic()
    runs: dict[str, dict[str, list[dict]]] = {c: {t: [] for t in TRANSPORTS} for c in cases}
    scale_runs: dict[str, list[dict]] = {"base": [], "more": []}
    spread: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tfwsgi-v2-bench-") as tmp:
        work = Path(tmp)
        config = reference_config(work)
        env = {"TFWSGI_MODEL_CONFIG_FILE": str(config), "TFWSGI_CACHE_ENABLED": "false",
               **dict(kv.split("=", 1) for kv in args.tfwsgi_env.split())}
        srv = Server(env, workers=2, log_path=work / "tfwsgi.log")
        peers: dict[str, Any] = {}
        clients = None
        try:
            for case, (model, _) in CASES.items():
                peers[case] = Peer(work / model / "1", work / f"peer-{model}.log")
            srv.wait_ready()
            for case, (_, shape) in CASES.items():
                peers[case].wait(request_body(PEER, np.zeros(shape, np.float32))[0].decode())
            peer_ports = {case: peer.port for case, peer in peers.items()}
            check_agreement(srv.port, peer_ports)
            scaling = not args.no_scaling
            clients = V2Clients(2 * args.processes if scaling else args.processes, srv.port,
                                list(peer_ports.values()))
            p, m = args.processes, args.inflight
            for rnd in range(args.rounds):
                order = TRANSPORTS[rnd % len(TRANSPORTS):] + TRANSPORTS[:rnd % len(TRANSPORTS)]
                for case in cases:
                    for t in order:
                        if t == PEER:
                            master, workers, port = peers[case].proc.pid, sorted(peers[case].worker_pids()), \
                                peers[case].port
                        else:
                            master, workers, port = srv.pid, sorted(srv.worker_pids()), srv.port
                        r = measure(master, workers, port, clients, t, case, p, m, args.warmup, args.duration)
                        runs[case][t].append(r)
                        report_run(rnd, case, t, r, spread)
                        if scaling and case == cases[0] and t == SCALING:
                            scale_runs["base"].append(r)
                            r2 = measure(master, workers, port, clients, t, case, 2 * p, max(1, m // 2),
                                         args.warmup, args.duration)
                            scale_runs["more"].append(r2)
                            print(f"round {rnd + 1} {case:7s} {t:10s} {2 * p} processes × {max(1, m // 2)}: "
                                  f"{r2['rps']:6.0f} req/s client {r2['client_cores']:.2f} cores "
                                  f"errors {r2['error_kinds'] or 0}", flush=True)
        finally:
            if clients is not None:
                clients.stop()
            for peer in peers.values():
                peer.stop()
            srv.stop()
    results = {c: {t: summarise(rs) for t, rs in runs[c].items() if rs} for c in cases}
    scaled = {k: summarise(v) for k, v in scale_runs.items()} if scale_runs["base"] else {}
    notes = [
        "CPU figures are read from /proc over each counted window: the server is gunicorn's master and "
        "its 2 workers (tfwsgi's, or the plain app's for its rows), the client its processes, other is "
        "the rest of the machine (other people's work on a shared machine, and the idle server). "
        "µs/call is CPU time per answered call.",
        "Nothing is pinned: server and client share the cores, and the client's CPU is what the server "
        "could not have. The client writes prepared bytes and reads whole answers without decoding "
        "them, the same work for every transport but for the bytes' count.",
        "Connections per worker and each worker's CPU: " + "; ".join(spread[: len(TRANSPORTS) * len(cases)])
        + ("; …" if len(spread) > len(TRANSPORTS) * len(cases) else "") + ".",
        f"The whole run took {(time.monotonic() - started) / 60:.1f} min.",
    ]
    publish("v2_bench.py",
            lambda command: render(cases, results, scaled, {**vars(args), "command": command}, notes),
            args.output, lambda png: plot(cases, results, png, args.smoke))
    return 0


if __name__ == "__main__":
    sys.exit(main())
