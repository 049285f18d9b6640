"""bench/model_call.py runs both callers on the reference MLP, checks they agree, and prints a
row for each (the timings themselves are the harness's business, not a test's)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PATH = Path(__file__).resolve().parents[2] / "bench" / "model_call.py"


def test_it_times_both_callers_at_each_batch_size() -> None:
    out = subprocess.run([sys.executable, str(PATH), "--calls", "5", "--rounds", "1", "--batches", "1,3"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "µs" not in line]
    assert [r.split(" | ")[:2] for r in rows] == [
        ["| 1", "tfwsgi (Session callable)"], ["| 1", "eager signature call"],
        ["| 3", "tfwsgi (Session callable)"], ["| 3", "eager signature call"]], out.stdout
