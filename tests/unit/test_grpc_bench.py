"""The pure parts of bench/grpc_bench.py: statistics, /proc parsing, the report's table."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

PATH = Path(__file__).resolve().parents[2] / "bench" / "grpc_bench.py"


@pytest.fixture(scope="module")
def gb() -> ModuleType:
    spec = importlib.util.spec_from_file_location("grpc_bench_under_test", PATH)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(rps: float, p99: float = 10.0, errors: int = 0) -> dict:
    return {"rps": rps, "examples": rps * 32, "p50_ms": p99 / 2, "p99_ms": p99, "errors": errors,
            "server_cores": 1.5, "client_cores": 0.2, "other_cores": 0.1, "server_us": 700.0,
            "client_us": 90.0, "client_proc_max": rps / 5000}


def test_the_harness_imports_neither_tensorflow_nor_grpc_at_module_level() -> None:
    """The unit tier loads it: TensorFlow and grpc are imported only by the functions that use them."""
    source = PATH.read_text()
    top = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert not [line for line in top if "tensorflow" in line or "grpc" in line], top


def test_percentiles_are_in_ms_and_nan_without_calls(gb: ModuleType) -> None:
    p50, p99 = gb.percentiles_ms([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert p50 == pytest.approx(50.5) and p99 == pytest.approx(99.01)
    assert all(math.isnan(x) for x in gb.percentiles_ms([]))


def test_summarise_takes_medians_the_range_of_rates_and_every_error(gb: ModuleType) -> None:
    s = gb.summarise([run(100, 30, 1), run(300, 10), run(200, 20, 2)])
    assert (s["rps"], s["rps_min"], s["rps_max"]) == (200, 100, 300)
    assert s["p99_ms"] == 20 and s["examples"] == 200 * 32
    assert s["errors"] == 3 and s["rounds"] == 3
    assert s["client_proc_max"] == 300 / 5000  # the busiest of every run


def test_cpu_seconds_reads_utime_and_stime_whatever_the_command(gb: ModuleType) -> None:
    tick = gb.TICK
    stat = f"1234 (my (odd) cmd) S 1 2 3 4 5 6 7 8 9 10 {3 * tick} {2 * tick} 0 0 20 0 1 0 99"
    assert gb.cpu_seconds(stat) == 5.0
    own = Path("/proc/self/stat").read_text()
    assert 0 < gb.cpu_seconds(own) < 1e6


def test_machine_seconds_counts_idle_and_iowait_as_not_busy(gb: ModuleType) -> None:
    tick = gb.TICK
    stat = f"cpu  {10 * tick} 0 {5 * tick} {80 * tick} {5 * tick} 0 0 0 0 0\ncpu0 1 2 3 4\n"
    assert gb.machine_seconds(stat) == (15.0, 100.0)


def test_client_tensors_are_distinct_per_call_and_process_and_repeatable(gb: ModuleType) -> None:
    a, b = gb.tensors("mlp-32", 0), gb.tensors("mlp-32", 1)
    assert len(a) == gb.POOL and a[0].shape == (32, 784) and a[0].dtype == np.float32
    assert len({x.tobytes() for x in a + b}) == 2 * gb.POOL
    assert all(np.array_equal(x, y) for x, y in zip(a, gb.tensors("mlp-32", 0), strict=True))


def test_status_and_length_of_a_response_head(gb: ModuleType) -> None:
    head = b"HTTP/1.1 400 BAD REQUEST\r\nContent-Type: application/json\r\ncontent-length: 17\r\n\r\n"
    assert gb._status_length(head) == (400, 17)
    assert gb._status_length(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n") == (200, -1)


def test_render_gives_the_ratio_the_scaling_check_and_labels_a_smoke_run(gb: ModuleType) -> None:
    results = {"mlp-32": {"grpc": gb.summarise([run(600)]), "rest": gb.summarise([run(200)])}}
    scaling = {"grpc": {"base": gb.summarise([run(1000)]), "more": gb.summarise([run(1050)])}}
    args = {"processes": 2, "inflight": 16, "channels": 4, "rounds": 1, "duration": 3.0, "warmup": 1.0,
            "tfwsgi_env": "", "command": "bench/grpc_bench.py --smoke", "smoke": True}
    text = gb.render(["mlp-32"], results, scaling, args, ["a note"])
    assert "SMOKE RUN" in text and "`bench/grpc_bench.py --smoke`" in text
    rows = [line for line in text.splitlines() if line.startswith("| mlp-32 |")]
    assert rows[0].startswith("| mlp-32 | gRPC | 600 (600–600) | 19200 | 5.0 | 10.0 | 3.00 | 0 |")
    assert rows[1].startswith("| mlp-32 | REST | 200 (200–200) | 6400 | 5.0 | 10.0 |  | 0 |")
    assert "| gRPC | 1000 (1000–1000) | 1050 (1050–1050) | 1.05 | 0.20 → 0.20 | 0.21 |" in text
    assert "- a note" in text
    assert "SMOKE" not in gb.render(["mlp-32"], results, {}, {**args, "smoke": False}, [])
