"""gunicorn hook bodies. The master never runs TensorFlow: everything TF happens in ``post_fork``."""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .manager import ModelManager
from .settings import Settings, from_env
from .source import model_configs

log = logging.getLogger("tfwsgi")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own variable

_manager: ModelManager | None = None


def worker_manager() -> ModelManager | None:
    """The manager that ``post_fork`` loaded in this worker, if any."""
    return _manager


def fitted_threads(settings: Settings, workers: int, cores: int | None = None) -> tuple[int, int]:
    """TF intra/inter-op threads for one worker: the settings, or 0 → cores ÷ workers and 1."""
    cores = cores or os.cpu_count() or 1
    intra = settings.tensorflow_intra_op_parallelism or max(1, cores // max(1, workers))
    inter = settings.tensorflow_inter_op_parallelism or 1
    return intra, inter


def _share_gunicorn_logging(server: Any) -> None:
    """Send the ``tfwsgi`` logger to gunicorn's error log, at its level."""
    error_log = server.log.error_log
    log.handlers = list(error_log.handlers)
    log.setLevel(error_log.level)
    log.propagate = False


def on_starting(server: Any) -> None:
    """Master, before anything forks: check the settings and the model config, TF-free."""
    _share_gunicorn_logging(server)
    settings = from_env()
    configs = model_configs(settings)
    _prepare_metrics_dir(settings)
    if settings.memcached:
        from .cache import parse_servers

        parse_servers(settings.memcached)
    for c in configs:
        server.log.info("tfwsgi: model %s from %s (%s)", c.name, c.base_path, c.policy.kind)


def _prepare_metrics_dir(settings: Settings) -> None:
    """Point every worker at one wiped directory for metric files (before anything imports
    prometheus_client, which reads the variable once)."""
    path = settings.prometheus_multiproc_dir or os.environ.get(MULTIPROC_ENV, "")
    if not path:
        path = tempfile.mkdtemp(prefix="tfwsgi-metrics-")
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.unlink(os.path.join(path, name))
    os.environ[MULTIPROC_ENV] = path
    log.info("tfwsgi: worker metrics in %s", path)


def child_exit(server: Any, worker: Any) -> None:
    """Master, when a worker exits: retire its live gauges."""
    from .metrics import mark_process_dead

    mark_process_dead(worker.pid)


@contextmanager
def _heartbeat(worker: Any, interval: float = 1.0) -> Iterator[None]:
    """Tell the master this worker is alive while it loads (loading may outlast ``timeout``)."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(interval):
            worker.notify()

    t = threading.Thread(target=beat, name="tfwsgi-load-heartbeat", daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()


def post_fork(server: Any, worker: Any) -> None:
    """Worker, right after fork: fit TF's threads, then load every model once, before traffic."""
    global _manager
    _share_gunicorn_logging(server)
    settings = from_env()
    intra, inter = fitted_threads(settings, server.cfg.workers)
    os.environ.setdefault("OMP_NUM_THREADS", str(intra))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    started = time.monotonic()
    with _heartbeat(worker):
        from .servable import configure_threads

        configure_threads(intra, inter)
        manager = ModelManager(model_configs(settings))
        manager.load_all()
    _manager = manager
    server.log.info("tfwsgi: worker %d ready in %.2fs (intra_op=%d inter_op=%d)",
                    os.getpid(), time.monotonic() - started, intra, inter)
