"""bench/request_instructions.py's workload runs, answers 200 every time, and fails loudly when
it does not (the callgrind count itself is the harness's business, not a test's)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PATH = Path(__file__).resolve().parents[2] / "bench" / "request_instructions.py"


def test_the_counted_workload_serves_every_request() -> None:
    for batching in ("true", "false"):
        out = subprocess.run([sys.executable, str(PATH), "--child", "5", "--batching", batching],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]


def test_a_tree_it_cannot_serve_fails_the_run(tmp_path: Path) -> None:
    """A tree without the app or its fakes exits non-zero (the parent then reports the run as
    failed) rather than being counted as a cheap one."""
    (tmp_path / "tests" / "unit").mkdir(parents=True)
    out = subprocess.run([sys.executable, str(PATH), "--child", "1", "--tree", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
