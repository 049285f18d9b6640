"""metrics.py: request counting, the exposition names, the monitoring config, dead-worker compaction."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector

from conftest import metric_total
from tfwsgi import metrics
from tfwsgi.errors import ConfigError, NotFound


def _count(name: str, status: str) -> float:
    metrics.flush()
    return metric_total(metrics.render()[0].decode(), ":tensorflow:serving:request_count",
                        model_name=name, status=status)


def test_requests_are_counted_with_tf_serving_names_and_status() -> None:
    before_ok, before_nf = _count("m/1", "OK"), _count("m/1", "NOT_FOUND")

    def missing() -> None:
        raise NotFound("Servable not found")

    for _ in range(3):
        assert metrics.observe_request("m%2F1", "PREDICT", lambda x: x + 1, 1) == 2
    with pytest.raises(NotFound):
        metrics.observe_request("m%2F1", "predict", missing)
    assert _count("m/1", "OK") == before_ok + 3
    assert _count("m/1", "NOT_FOUND") == before_nf + 1
    text = metrics.render()[0].decode()
    assert "# TYPE :tensorflow:serving:request_count counter" in text
    assert ":tensorflow:serving:request_count_total" not in text
    assert metric_total(text, ":tensorflow:serving:request_latency_count", model_name="m/1",
                        API="Predict", entrypoint="REST") >= 4
    assert 'le="10.0"' in text and 'le="188.9568"' in text


def test_counts_are_not_lost_between_flushes() -> None:
    before = _count("flushy", "OK")
    for i in range(50):
        metrics.observe_request("flushy", "regress", int, i)
        if i % 7 == 0:
            metrics.flush()
    assert _count("flushy", "OK") == before + 50


def test_monitoring_config(tmp_path: Path) -> None:
    assert metrics.prometheus_paths("") == ["/monitoring/prometheus/metrics", "/metrics"]
    conf = tmp_path / "monitoring.config"
    conf.write_text('prometheus_config { enable: true, path: "/my/metrics" }\n')
    assert metrics.prometheus_paths(str(conf)) == ["/my/metrics", "/metrics"]
    conf.write_text("prometheus_config { enable: true }\n")
    assert metrics.prometheus_paths(str(conf)) == ["/monitoring/prometheus/metrics", "/metrics"]
    conf.write_text("prometheus_config { enable: false }\n")
    assert metrics.prometheus_paths(str(conf)) == []
    conf.write_text("prometheus_config { enabled: true }\n")
    with pytest.raises(ConfigError, match="enabled"):
        metrics.prometheus_paths(str(conf))
    with pytest.raises(ConfigError):
        metrics.prometheus_paths(str(tmp_path / "missing"))


def _write(path: Path, values: list[tuple[str, str, dict[str, str], float]]) -> None:
    d = MmapedDict(str(path))
    for metric, sample, labels, value in values:
        d.write_value(mmap_key(metric, sample, list(labels), list(labels.values()), "help"), value, 0.0)
    d.close()


def _exposition(path: Path) -> str:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))
    return "\n".join(sorted(generate_latest(registry).decode().splitlines()))  # order: glob's


def test_compaction_keeps_totals_and_bounds_files(tmp_path: Path) -> None:
    """Dead workers' counter and histogram files fold into one archive each; totals stay equal."""
    for pid in range(100, 130):
        _write(tmp_path / f"counter_{pid}.db", [("c", "c_total", {"m": "a"}, 2.0),
                                                 ("c", "c_total", {"m": str(pid % 3)}, 1.0)])
        _write(tmp_path / f"histogram_{pid}.db", [("h", "h_sum", {}, 0.5),
                                                   ("h", "h_bucket", {"le": "1.0"}, 1.0),
                                                   ("h", "h_bucket", {"le": "+Inf"}, pid % 2)])
    _write(tmp_path / "counter_999.db", [("c", "c_total", {"m": "a"}, 5.0)])  # a live worker
    before = _exposition(tmp_path)
    for pid in range(100, 130):
        metrics.compact_dead_process(pid, str(tmp_path))
    assert _exposition(tmp_path) == before
    assert sorted(os.listdir(tmp_path)) == [".tfwsgi-metrics.lock", "counter_999.db",
                                            "counter_archive.db", "histogram_archive.db"]
    assert metric_total(before, "c_total", m="a") == 65
    assert metric_total(before, "h_count") == 30 + 15
    metrics.compact_dead_process(12345, str(tmp_path))  # unknown pid: nothing happens
    assert _exposition(tmp_path) == before


def test_status_names_are_the_canonical_codes() -> None:
    from werkzeug.exceptions import RequestEntityTooLarge

    from tfwsgi.errors import TFWSGIError, Unavailable

    assert metrics._status_name(Unavailable("busy")) == "UNAVAILABLE"
    assert metrics._status_name(TFWSGIError("tf", 15)) == "DATA_LOSS"
    assert metrics._status_name(TFWSGIError("tf", 99)) == "UNKNOWN"
    assert metrics._status_name(RequestEntityTooLarge()) == "RESOURCE_EXHAUSTED"
    assert metrics._status_name(KeyError("x")) == "UNKNOWN"


# ------------------------------------------------------------------ prometheus_client internals
# metrics.py's "prometheus_client internals" section, checked against the installed release: an
# upgrade that renames, re-signs or changes the behaviour of any of them fails here.


def test_prometheus_client_internals_names_and_signatures() -> None:
    import inspect

    from prometheus_client import Histogram

    h = Histogram("internals_sig", "h", registry=CollectorRegistry())
    assert hasattr(h, "_upper_bounds") and hasattr(h, "_sum") and hasattr(h, "_buckets")
    assert len(h._buckets) == len(h._upper_bounds) and callable(h._sum.inc)
    assert list(inspect.signature(MmapedDict).parameters)[:1] == ["filename"]
    assert list(inspect.signature(MmapedDict.write_value).parameters) == ["self", "key", "value", "timestamp"]
    assert list(inspect.signature(MmapedDict.read_value).parameters) == ["self", "key"]
    assert list(inspect.signature(MmapedDict.read_all_values_from_file).parameters)[:1] == ["filename"]
    assert list(inspect.signature(mmap_key).parameters) == [
        "metric_name", "name", "labelnames", "labelvalues", "help_text"]


def test_prometheus_client_internals_histogram_observations() -> None:
    """Adding observations by bucket writes what observe writes, one by one."""
    from prometheus_client import Histogram

    one, many = CollectorRegistry(), CollectorRegistry()
    observed = Histogram("h_seconds", "h", ["m"], buckets=(1, 2), registry=one).labels("a")
    added = Histogram("h_seconds", "h", ["m"], buckets=(1, 2), registry=many).labels("a")
    assert metrics._bucket_bounds(added) == [1.0, 2.0, float("inf")]
    for value in (0.5, 3.0, 0.0, 1.5):
        observed.observe(value)
    metrics._add_observations(added, 5.0, [2, 1, 1])
    def samples(registry: CollectorRegistry) -> list[str]:
        return [x for x in generate_latest(registry).decode().splitlines() if "_created" not in x]

    assert samples(many) == samples(one)
    assert 'h_seconds_bucket{le="2.0",m="a"} 3.0' in samples(many)


_WORKER = """
import os, sys
from prometheus_client import Counter, Gauge, Histogram
Counter("c", "c", ["m"]).labels("a").inc(2)
Histogram("h", "h", buckets=(1, 2)).observe(0.5)
Gauge("g", "g", multiprocess_mode="livesum").set(7)
print(os.getpid())
"""


def test_prometheus_client_internals_multiprocess_files(tmp_path: Path) -> None:
    """Multiprocess mode: the file names compaction looks for, per-bucket histogram values,
    archive files read by the collector as their kind, and live gauges retired by pid."""
    import subprocess
    import sys

    env = {**os.environ, metrics.MULTIPROC_ENV: str(tmp_path)}
    pid = int(subprocess.run([sys.executable, "-c", _WORKER], env=env, check=True, timeout=60,
                             capture_output=True, text=True).stdout)
    assert sorted(os.listdir(tmp_path)) == sorted(
        os.path.basename(metrics._db_file(str(tmp_path), kind, pid))
        for kind in ("counter", "histogram", "gauge_livesum"))
    assert sorted(metrics.db_files(str(tmp_path))) == sorted(str(p) for p in tmp_path.iterdir())
    histogram = metrics._db_file(str(tmp_path), "histogram", pid)
    raw = {key: value for key, value, _, _ in MmapedDict.read_all_values_from_file(histogram)}
    assert sorted(raw.values()) == [0.0, 0.0, 0.5, 1.0]  # the +Inf bucket holds 0: not cumulative
    before = _exposition(tmp_path)
    assert 'h_bucket{le="+Inf"} 1.0' in before and 'c_total{m="a"} 2.0' in before
    assert "g 7.0" in before
    metrics._add_file(histogram, metrics._db_file(str(tmp_path), "histogram", "archive"))
    os.unlink(histogram)
    assert _exposition(tmp_path) == before  # an archive is read as a histogram file
    _multiprocess_mark_dead(pid, tmp_path)
    assert "g 7.0" not in _exposition(tmp_path)
    assert 'c_total{m="a"} 2.0' in _exposition(tmp_path)


def _multiprocess_mark_dead(pid: int, path: Path) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(path))


def test_compaction_keeps_empty_buckets(tmp_path: Path) -> None:
    """Regression: the archive dropped zero values, so a dead worker's histogram lost its empty
    buckets (+Inf among them) from the exposition once no live worker held that histogram."""
    _write(tmp_path / "histogram_7.db", [("h", "h_sum", {}, 0.5), ("h", "h_bucket", {"le": "1.0"}, 1.0),
                                          ("h", "h_bucket", {"le": "2.0"}, 0.0),
                                          ("h", "h_bucket", {"le": "+Inf"}, 0.0)])
    before = _exposition(tmp_path)
    assert 'h_bucket{le="+Inf"} 1.0' in before
    metrics.compact_dead_process(7, str(tmp_path))
    assert _exposition(tmp_path) == before
