"""Every Prometheus metric, and the view over all workers (prometheus_client multiprocess mode).

gunicorn's master points ``PROMETHEUS_MULTIPROC_DIR`` at a wiped directory before it forks
(``hooks.on_starting``), so each worker writes its own files there and a scrape in any worker
adds them all up. Without it (a single process), the default registry is used.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _multiprocess

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

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


def render() -> tuple[bytes, str]:
    """The exposition text of every metric of every worker, and its content type."""
    path = os.environ.get(MULTIPROC_ENV)
    if path and os.path.isdir(path):
        registry = CollectorRegistry()
        _multiprocess.MultiProcessCollector(registry, path=path)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    """Called by the master when a worker exits (gunicorn's ``child_exit``)."""
    if os.environ.get(MULTIPROC_ENV):
        _multiprocess.mark_process_dead(pid)
