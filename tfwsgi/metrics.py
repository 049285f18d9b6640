"""Every Prometheus metric, and the view over all workers (prometheus_client multiprocess mode).

gunicorn's master points ``PROMETHEUS_MULTIPROC_DIR`` at a wiped directory before it forks
(``hooks.on_starting``), so each worker writes its own files there and a scrape in any worker
adds them all up. Without it (a single process), the default registry is used.
"""

from __future__ import annotations

import fcntl
import glob
import os
import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from contextlib import contextmanager
from http import HTTPStatus
from time import perf_counter
from typing import Any, TypeVar
from urllib.parse import unquote

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess
from prometheus_client.mmap_dict import MmapedDict

from . import textformat
from .errors import Code, ConfigError, TFWSGIError
from .manager import Listener

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
T = TypeVar("T")

# TF Serving's own metrics (servables/tensorflow/util.cc), under the names its Prometheus exporter
# gives them ("/" → ":"). Counters are written without prometheus_client's "_total" (see render).
REQUEST_COUNT = Counter(
    ":tensorflow:serving:request_count", "The total number of requests.",
    ["model_name", "status"])
REQUEST_LATENCY = Histogram(
    ":tensorflow:serving:request_latency",
    "Distribution of wall time (in microseconds) for Tensorflow Serving request.",
    ["model_name", "API", "entrypoint"],
    buckets=[round(10 * 1.8**i, 4) for i in range(33)])  # TF's Buckets::Exponential(10, 1.8, 33)
_TF_COUNTERS = (b":tensorflow:serving:request_count",)

CACHE_LOOKUPS = Counter(
    "tfwsgi_cache_lookups_total",
    "Prediction cache lookups by result: hit, miss, refresh (no-cache), bypass (no-store or off), "
    "collapsed (answered by a concurrent identical request), error (cache unreachable: served "
    "as a miss), corrupt (unreadable or forged value: recomputed).",
    ["model_name", "result"])
CACHE_STORES = Counter(
    "tfwsgi_cache_stores_total",
    "Prediction cache writes by result: stored, too_large (served, not cached), error.",
    ["model_name", "result"])
MODEL_RUNS = Counter(
    "tfwsgi_model_runs_total",
    "Times a servable's signature was run (cache hits do not run it).",
    ["model_name", "version", "signature_name", "method"])


BATCH_SIZE = Histogram(
    "tfwsgi_batch_size",
    "Rows in each batch the dynamic batcher ran (before padding).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
BATCH_QUEUE_DEPTH = Gauge(
    "tfwsgi_batch_queue_depth",
    "Requests waiting in the dynamic batcher's queues, over the live workers.",
    multiprocess_mode="livesum")
MODEL_LOAD_SECONDS = Histogram(
    "tfwsgi_model_load_seconds",
    "Time each worker took to load (and warm up) a model version, by result: ok, error.",
    ["model_name", "result"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600))
MODEL_VERSION_STATE = Gauge(
    "tfwsgi_model_version_state",
    "Live workers holding each model version in each TF Serving state (LOADING, AVAILABLE, "
    "UNLOADING, END).",
    ["model_name", "version", "state"], multiprocess_mode="livesum")
WORKER_CONNECTIONS = Gauge(
    "tfwsgi_worker_connections",
    "Open client connections held by each live worker (idle keep-alive ones included).",
    multiprocess_mode="liveall")
REQUESTS_WAITING = Gauge(
    "tfwsgi_requests_waiting",
    "Complete requests waiting in each live worker for a request thread.",
    multiprocess_mode="liveall")
REQUEST_WAIT_SECONDS = Histogram(
    "tfwsgi_request_wait_seconds",
    "Time from a request being all received to a request thread taking it.",
    buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30))
REQUESTS_DROPPED = Counter(
    "tfwsgi_requests_dropped_total",
    "Requests answered or dropped without running: overload (503, too many waiting in the "
    "worker), deadline (504, not answered within rest_api_timeout_in_ms) or client_closed (the "
    "client closed its connection while the request waited for a thread).",
    ["reason"])
WORKER_EXITS = Counter(
    "tfwsgi_worker_exits_total",
    "gunicorn workers that exited (max_requests, SIGHUP, timeouts, crashes); the master starts "
    "a new one for each while it runs.")

# ------------------------------------------------------------------- prometheus_client internals
# Everything tfwsgi relies on beyond prometheus_client's public API, and only here: setup.cfg
# bounds its version, and tests/unit/test_metrics.py (test_prometheus_client_internals_*) checks
# each name, signature and behaviour against the installed release, so an upgrade that changes
# one fails there. Written against prometheus_client 0.26 (client_python's prometheus_client/
# metrics.py ``Histogram``, mmap_dict.py ``MmapedDict``, multiprocess.py ``MultiProcessCollector``).
#
# Relied on besides the helpers below: in multiprocess mode every process writes its values to
# ``<kind>_<pid>.db`` files (``gauge_<mode>_<pid>.db`` for gauges), which MultiProcessCollector
# globs as ``*.db`` and reads by the kind before the first "_", whatever follows it; and a
# histogram's file holds each bucket's own count (not cumulative), the collector adds them up.

DB_GLOB = "*.db"


def _bucket_bounds(histogram: Histogram) -> list[float]:
    """A histogram's bucket upper bounds, +Inf last (``Histogram._upper_bounds``)."""
    return list(histogram._upper_bounds)


def _add_observations(histogram: Histogram, total: float, counts: list[float]) -> None:
    """Add many observations to a histogram (or a labelled child) at once: ``total`` to its sum
    and ``counts[i]`` to bucket i (per bucket): what prometheus_client 0.26 ``metrics.py``
    ``Histogram.observe`` writes one observation at a time (``_sum``, ``_buckets``: ``ValueClass``
    objects), without its exemplars."""
    histogram._sum.inc(total)
    for bucket, n in zip(histogram._buckets, counts, strict=True):
        if n:
            bucket.inc(n)


def _db_file(path: str, kind: str, pid: int | str) -> str:
    """The multiprocess file of one process's counters or histograms (``kind``)."""
    return os.path.join(path, f"{kind}_{pid}.db")


def _add_file(source: str, target: str) -> None:
    """Add every value of one multiprocess metric file to another's (created if missing), via
    ``MmapedDict`` (``read_all_values_from_file``, ``read_value``, ``write_value``, ``close``).
    Zero values are written too: the collector shows only the buckets some file holds, and a
    histogram without its empty buckets (``+Inf`` among them) breaks ``histogram_quantile``."""
    archive = MmapedDict(target)
    try:
        for key, value, _, _ in list(MmapedDict.read_all_values_from_file(source)):
            archive.write_value(key, archive.read_value(key)[0] + value, 0.0)
    finally:
        archive.close()


# ---------------------------------------------------------------------------------- per request
# A request only adds to plain floats in this process (≈0.5 µs); ``flush`` moves them into
# prometheus_client's values (≈0.8 µs per mmap write, four writes a request) once a second, before
# this worker renders a scrape, and when it exits. A scrape is at most a second behind.

_MAX_KEYS = 1000  # distinct (model name, method, status, entrypoint) kept; later ones count as "<other>"
_APIS = {"predict": "Predict", "classify": "Classify", "regress": "Regress",
         "multi_inference": "MultiInference"}
_BOUNDS = _bucket_bounds(REQUEST_LATENCY)  # the finite bounds and +Inf
_lock = threading.Lock()
_Key = tuple[str, str, str, str]  # raw model name, method, status, entrypoint (REST or GRPC)
_pending: dict[_Key, list[float]] = {}  # count, sum, per-bucket counts
_flushed: dict[_Key, list[float]] = {}


def _status_name(exc: BaseException) -> str:
    if isinstance(exc, TFWSGIError):
        return exc.code.name
    if getattr(exc, "code", None) == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:  # werkzeug's, as gRPC names it
        return Code.RESOURCE_EXHAUSTED.name
    return Code.UNKNOWN.name


def _new_key(key: _Key) -> list[float]:
    if len(_pending) >= _MAX_KEYS:
        key = ("<other>", key[1], key[2], key[3])
        if key in _pending:
            return _pending[key]
    acc = _pending[key] = [0.0] * (2 + len(_BOUNDS))
    return acc


def observe_request(raw_name: str, method: str, handler: Callable[..., T], *args: Any,
                    entrypoint: str = "REST") -> T:
    """Run ``handler(*args)`` for a predict/classify/regress call on model ``raw_name`` (as in
    the URL, percent-encoded) and count it in TF Serving's request_count and request_latency
    (µs), whose ``entrypoint`` label is ``REST`` or ``GRPC`` (TF Serving's values)."""
    start = perf_counter()
    status = Code.OK.name
    try:
        return handler(*args)
    except BaseException as exc:
        status = _status_name(exc)
        raise
    finally:
        micros = (perf_counter() - start) * 1e6
        key = (raw_name, method, status, entrypoint)
        with _lock:
            acc = _pending.get(key) or _new_key(key)
            acc[0] += 1
            acc[1] += micros
            acc[2 + bisect_left(_BOUNDS, micros)] += 1


_WAIT_BOUNDS = _bucket_bounds(REQUEST_WAIT_SECONDS)
_waits = [0.0] * (1 + len(_WAIT_BOUNDS))  # sum, then per-bucket counts, since the last flush


def observe_wait(seconds: float) -> None:
    """Count one request's wait for a thread (added to the histogram at the next flush)."""
    with _lock:
        _waits[0] += seconds
        _waits[1 + bisect_left(_WAIT_BOUNDS, seconds)] += 1


def count_dropped(reason: str) -> None:
    REQUESTS_DROPPED.labels(reason).inc()


def set_connection_state(connections: int, waiting: int) -> None:
    WORKER_CONNECTIONS.set(connections)
    REQUESTS_WAITING.set(waiting)


def flush() -> None:
    """Add what requests counted since the last flush to the metric values (shared files)."""
    with _lock:
        waits = _waits[:]
        _waits[:] = [0.0] * len(_waits)
        deltas = []
        for key, acc in _pending.items():
            last = _flushed.get(key)
            if last is None:
                last = _flushed[key] = [0.0] * len(acc)
            if acc[0] != last[0]:
                deltas.append((key, [a - b for a, b in zip(acc, last, strict=True)]))
                last[:] = acc
    if any(waits[1:]):
        _add_observations(REQUEST_WAIT_SECONDS, waits[0], waits[1:])
    for (raw_name, method, status, entrypoint), delta in deltas:
        name = unquote(raw_name)
        REQUEST_COUNT.labels(name, status).inc(delta[0])
        latency = REQUEST_LATENCY.labels(name, _APIS.get(method.lower(), method), entrypoint)
        _add_observations(latency, delta[1], delta[2:])


def start_flushing(interval: float = 1.0) -> None:
    """In a worker: flush every ``interval`` seconds from a daemon thread."""

    def run() -> None:
        while True:
            time.sleep(interval)
            flush()

    threading.Thread(target=run, name="tfwsgi-metrics-flush", daemon=True).start()


# ---------------------------------------------------------------------------------- endpoints

TF_SERVING_PATH = "/monitoring/prometheus/metrics"  # TF Serving's default prometheus_config.path


def prometheus_paths(monitoring_config_file: str) -> list[str]:
    """Where metrics are served: TF Serving's path and /metrics; with a monitoring config file,
    as its ``prometheus_config { enable path }`` says (TF Serving's ``--monitoring_config_file``)."""
    if not monitoring_config_file:
        return [TF_SERVING_PATH, "/metrics"]
    origin = f"TFWSGI_MONITORING_CONFIG_FILE: {monitoring_config_file}"
    try:
        with open(monitoring_config_file, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"{origin}: {exc}") from None
    msg = textformat.parse(textformat.monitoring_config(), text, origin)
    if not msg.prometheus_config.enable:
        return []
    path = msg.prometheus_config.path or TF_SERVING_PATH
    if not path.startswith("/"):
        raise ConfigError(f"TFWSGI_MONITORING_CONFIG_FILE: path must start with '/', got {path!r}")
    return list(dict.fromkeys([path, "/metrics"]))


# ---------------------------------------------------------------------------------- multiprocess

_LOCK_NAME = ".tfwsgi-metrics.lock"  # not *.db: the collector reads only those
ARCHIVE_PID = "archive"  # counter_archive.db, histogram_archive.db: the totals of dead workers


@contextmanager
def _dir_lock(path: str, exclusive: bool) -> Any:
    """Scrapes (shared) and the master's compaction (exclusive) never see each other halfway."""
    fd = os.open(os.path.join(path, _LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def render() -> tuple[bytes, str]:
    """The exposition text of every metric of every worker, and its content type."""
    flush()
    path = os.environ.get(MULTIPROC_ENV)
    if path and os.path.isdir(path):
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry, path=path)
        with _dir_lock(path, exclusive=False):
            text = generate_latest(registry)
    else:
        text = generate_latest()
    for name in _TF_COUNTERS:  # TF Serving's counters carry no "_total" suffix
        text = text.replace(name + b"_total", name)
    return text, CONTENT_TYPE_LATEST


def compact_dead_process(pid: int, path: str) -> None:
    """Fold a dead worker's counter and histogram files into the archive files and delete them,
    so its counts stay in the totals while the directory holds a bounded number of files."""
    with _dir_lock(path, exclusive=True):
        for kind in ("counter", "histogram"):
            dead = _db_file(path, kind, pid)
            if not os.path.exists(dead):
                continue
            # Per-bucket histogram counts, not cumulative, so they simply add.
            _add_file(dead, _db_file(path, kind, ARCHIVE_PID))
            os.unlink(dead)


def db_files(path: str) -> list[str]:
    """The metric files in the multiprocess directory."""
    return glob.glob(os.path.join(path, DB_GLOB))


def mark_process_dead(pid: int) -> None:
    """Called by the master when a worker exits (gunicorn's ``child_exit``): count it, retire its
    live gauges and fold its counters into the archive."""
    path = os.environ.get(MULTIPROC_ENV)
    WORKER_EXITS.inc()
    if path:
        _multiprocess.mark_process_dead(pid, path)
        compact_dead_process(pid, path)


class ModelObserver(Listener):
    """Listens to the model manager: version state changes and load times."""

    def state(self, name: str, version: int, old: str | None, new: str) -> None:
        if old is not None:
            MODEL_VERSION_STATE.labels(name, str(version), old).dec()
        MODEL_VERSION_STATE.labels(name, str(version), new).inc()

    def load_finished(self, name: str, seconds: float, ok: bool) -> None:
        MODEL_LOAD_SECONDS.labels(name, "ok" if ok else "error").observe(seconds)
