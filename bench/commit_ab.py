"""Throughput of tfwsgi at several commits side by side, with the plain peer, interleaved.

    .venv/bin/python bench/commit_ab.py --commits bf06f5d,HEAD [--rounds 6] [--connections 32]

Each commit is checked out in a temporary git worktree and served by its own
``gunicorn -c gunicorn_conf.py tfwsgi:app -w 2`` (this checkout's venv, the commit's code first on
``PYTHONPATH``; cache off, ``TFWSGI_ENABLE_BATCHING=true``), beside the plain Flask + gunicorn peer
(bench/peers/plain_app.py), all on the reference MLP with 1-example bodies. Each round runs every
server in turn (wrk, 2 s warm-up, then ``--duration`` s counted; each round starts with the next
server, so none always runs first), so a noisy machine moves all of them alike; the summary gives
each server's median rate with its range, and the median of its per-round ratios to the peer.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

import throughput_bench as tb  # noqa: E402
from reference_models import build_mlp  # noqa: E402

import conftest  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commits", required=True, help="comma-separated commits (e.g. bf06f5d,HEAD)")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--duration", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tfwsgi-ab-") as tmp:
        work = Path(tmp)
        build_mlp(work / "mlp" / "1")
        body_file = work / "mlp-1.json"
        body_file.write_text(tb.body_for((1, 784)))
        servers: list[tuple[str, object, str]] = []
        trees: list[Path] = []
        try:
            for commit in args.commits.split(","):
                tree = work / f"tree-{len(trees)}"
                subprocess.run(["git", "worktree", "add", "-q", "--detach", str(tree), commit], cwd=ROOT,
                               check=True)
                trees.append(tree)
                env = {"TFWSGI_MODEL_NAME": "m", "TFWSGI_MODEL_BASE_PATH": str(work / "mlp"),
                       "TFWSGI_CACHE_ENABLED": "false", "TFWSGI_ENABLE_BATCHING": "true",
                       "PYTHONPATH": str(tree)}
                conftest.ROOT = tree  # gunicorn runs in the commit's tree (its gunicorn_conf.py)
                srv = conftest.Server(env, workers=2, log_path=work / f"{commit}.log")
                conftest.ROOT = ROOT
                servers.append((commit, srv, srv.url + "/v1/models/m:predict"))
            peer = tb.Peer(work / "mlp" / "1", work / "peer.log")
            for _, srv, _ in servers:
                srv.wait_ready()  # type: ignore[attr-defined]
            peer.wait(body_file.read_text())
            targets = [*servers, ("peer", peer, peer.url)]
            runs: dict[str, list[dict]] = {name: [] for name, _, _ in targets}
            for r in range(args.rounds):
                # Each round starts one server further along, so that no server always runs
                # first (or right after the same one): the order moves every server alike.
                for name, _, url in targets[r % len(targets):] + targets[:r % len(targets)]:
                    tb.wrk(url, body_file, args.connections, 2)
                    got = tb.wrk(url, body_file, args.connections, args.duration)
                    runs[name].append(got)
                    print(f"round {r} {name:>10} {got['rps']:7.0f} req/s p99 {got['p99_ms']:6.1f} ms "
                          f"errors {got['errors']}", flush=True)
            peer_rates = [x["rps"] for x in runs["peer"]]
            for name, got in runs.items():
                rates = [x["rps"] for x in got]
                ratios = [a / b for a, b in zip(rates, peer_rates, strict=True)]
                print(f"{name}: {statistics.median(rates):.0f} req/s ({min(rates):.0f}-{max(rates):.0f}), "
                      f"p99 {statistics.median([x['p99_ms'] for x in got]):.1f} ms, ratio to the peer "
                      f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}), "
                      f"errors {sum(x['errors'] for x in got)}")
        finally:
            for _, srv, _ in servers:
                srv.stop()  # type: ignore[attr-defined]
            if "peer" in locals():
                peer.stop()
            for tree in trees:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
