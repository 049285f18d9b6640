"""gunicorn hook bodies. The master never runs TensorFlow; a worker sets its process up in
``post_fork`` (cores, TF threads, malloc), then gunicorn installs its signal handlers and loads
``tfwsgi:app``, whose factory loads the worker's models (``application.create_app``)."""

from __future__ import annotations

import gc
import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError
from .settings import Settings, from_env, with_env_file
from .source import model_configs

log = logging.getLogger("tfwsgi")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own variable

def fitted_threads(settings: Settings, workers: int, cores: int | None = None) -> tuple[int, int]:
    """TF intra/inter-op threads for one worker: the settings, or 0 → cores ÷ workers and 1."""
    cores = cores or os.cpu_count() or 1
    intra = settings.tensorflow_intra_op_parallelism or max(1, cores // max(1, workers))
    inter = settings.tensorflow_inter_op_parallelism or 1
    return intra, inter


def cpu_groups(cpus: list[int], workers: int) -> list[tuple[int, ...]]:
    """The cores split over the workers: ``cores ÷ workers`` each (as ``fitted_threads`` fits
    TF's threads), or one each when there are more workers than cores."""
    cpus = sorted(cpus)
    if workers >= len(cpus):
        return [(c,) for c in cpus]
    k = len(cpus) // max(1, workers)
    return [tuple(cpus[i * k:(i + 1) * k]) for i in range(workers)]


def pick_cpus(groups: list[tuple[int, ...]], taken: list[tuple[int, ...] | None]) -> tuple[int, ...]:
    """The group the fewest live workers hold (the first of equals)."""
    return min(groups, key=lambda g: (taken.count(g), groups.index(g)))


def pre_fork(server: Any, worker: Any) -> None:
    """Master, before each fork: choose the new worker's cores (``TFWSGI_CPU_AFFINITY``) among
    those its live siblings leave, so a replaced worker takes the cores of the one it replaces."""
    if not from_env().cpu_affinity or not hasattr(os, "sched_getaffinity"):
        return
    groups = cpu_groups(list(os.sched_getaffinity(0)), server.num_workers)
    taken = [getattr(w, "tfwsgi_cpus", None) for w in server.WORKERS.values()]
    worker.tfwsgi_cpus = pick_cpus(groups, taken)


def _pin(worker: Any) -> None:
    """Worker: run on the cores the master chose; threads started from here on inherit them."""
    cpus = getattr(worker, "tfwsgi_cpus", None)
    if cpus:
        try:
            os.sched_setaffinity(0, cpus)
        except OSError as exc:  # a cpuset changed under us: run unpinned
            log.warning("tfwsgi: could not pin worker %d to cores %s: %s", os.getpid(), cpus, exc)


def _share_gunicorn_logging(server: Any) -> None:
    """Send the ``tfwsgi`` logger to gunicorn's error log, at its level."""
    error_log = server.log.error_log
    log.handlers = list(error_log.handlers)
    log.setLevel(error_log.level)
    log.propagate = False


_env_file_keys: set[str] = set()
_config_loaded = False


def _apply_env_file() -> None:
    """Put the env file's settings into the master's environment (inherited by new workers)."""
    global _env_file_keys
    env, keys = with_env_file(os.environ, _env_file_keys)
    model_configs(from_env(env))  # the model config must hold too
    for key in _env_file_keys - keys:
        os.environ.pop(key, None)
    os.environ.update({k: env[k] for k in keys})
    _env_file_keys = keys


def config_settings() -> Settings:
    """The settings ``gunicorn_conf.py`` uses, with the env file applied; it runs at start (where
    a bad file stops the server) and again on every SIGHUP (where it keeps the previous values)."""
    global _config_loaded
    try:
        _apply_env_file()
    except ConfigError as exc:
        if not _config_loaded:
            raise
        log.error("tfwsgi: settings not reloaded, the previous ones stay: %s", exc)
    _config_loaded = True
    return from_env()


_activated_bind: list[str] | None = None


def bind_addresses(settings: Settings, environ: Mapping[str, str] | None = None) -> list[str]:
    """gunicorn's ``bind``: 0.0.0.0 on the REST port, or, under systemd socket activation
    (``LISTEN_PID`` is this process), the value of the first load, kept across SIGHUP: gunicorn
    would otherwise drop the passed socket and bind anew whenever the value changed."""
    global _activated_bind
    env = os.environ if environ is None else environ
    bind = [f"0.0.0.0:{settings.rest_api_port}"]
    if _activated_bind is None and env.get("LISTEN_PID") == str(os.getpid()):
        _activated_bind = bind  # gunicorn uses the passed sockets and ignores this value
    if _activated_bind is not None:
        if bind != _activated_bind:
            log.warning("tfwsgi: TFWSGI_REST_API_PORT ignored: the socket comes from systemd")
        return _activated_bind
    return bind


def logger_class(settings: Settings) -> str:
    """gunicorn's ``logger_class`` for ``TFWSGI_LOG_FORMAT``."""
    return "tfwsgi.logs.JsonLogger" if settings.log_format == "json" else "gunicorn.glogging.Logger"


def on_starting(server: Any) -> None:
    """Master, before anything forks: check the settings and the model config, TF-free."""
    _share_gunicorn_logging(server)
    settings = from_env()
    configs = model_configs(settings)
    _prepare_metrics_dir(settings)
    from .reloads import prepare_dir

    prepare_dir()  # where a gRPC config reload reaches every worker (tfwsgi.reloads)
    from .metrics import prometheus_paths

    prometheus_paths(settings.monitoring_config_file)  # a bad monitoring config stops the start
    if settings.memcached:
        from .cache import parse_servers

        parse_servers(settings.memcached)
    from .cache import signing_key

    signing_key(settings)  # an unreadable key file, or two different keys, stops the start
    for c in configs:
        server.log.info("tfwsgi: model %s from %s (%s)", c.name, c.base_path, c.policy.kind)
    if settings.preload_tensorflow:
        # No collections during the import: the cycles they would free leave holes all over the
        # heap, which each worker's first allocations fill, copying those pages (4 MB a worker).
        gc.disable()
        _import_tensorflow(server)
    # Every object the master holds now (TensorFlow's modules among them) moves to a generation
    # the collector never walks, so no collection in a worker writes to (and copies) their pages.
    gc.freeze()
    gc.enable()


def _import_tensorflow(server: Any) -> None:
    """Import TensorFlow in the master so forked workers share its pages. Import only: a TF
    runtime created before fork deadlocks the children, so nothing here may run an op."""
    started = time.monotonic()
    # What every worker imports next (Flask, werkzeug, pymemcache, orjson): shared pages too.
    import flask  # noqa: F401
    import orjson  # noqa: F401
    import pymemcache.client.hash  # noqa: F401
    import werkzeug.http  # noqa: F401

    from . import servable  # TensorFlow, protobufs, our TF module

    if servable.runtime_initialized():  # pragma: no cover - would be a bug in this module
        raise RuntimeError("TensorFlow's runtime was initialised in gunicorn's master")
    server.log.info("tfwsgi: TensorFlow imported in the master in %.2fs (not initialised)",
                    time.monotonic() - started)


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
    """Master, when a worker exits: count it, retire its live gauges, archive its counters, and
    take it out of the connection balance of the threaded workers."""
    from .metrics import mark_process_dead
    from .reloads import RELOAD_DIR_ENV, forget
    from .worker import retire

    mark_process_dead(worker.pid)
    retire(worker.age)
    forget(os.environ.get(RELOAD_DIR_ENV), worker.pid)  # a config reload waits for it no more


def on_exit(server: Any) -> None:
    """Master, leaving: remove its config reload directory."""
    from .reloads import remove_dir

    remove_dir()


def worker_exit(server: Any, worker: Any) -> None:
    """Worker, leaving (max_requests, reload, stop): stop its gRPC server (calls in flight
    finish), then write out the requests it counted."""
    from .reloads import RELOAD_DIR_ENV, forget

    forget(os.environ.get(RELOAD_DIR_ENV), os.getpid())  # leaving: a config reload waits not for it
    setup: WorkerSetup | None = getattr(worker, "tfwsgi", None)
    if setup is not None and setup.grpc is not None:
        from .grpc_api import drain

        if setup.grpc_core is not None:
            setup.grpc_core.shutdown()  # health NOT_SERVING (max_requests: no SIGTERM came)
        # Its clients move to the other workers first; within gunicorn's graceful_timeout,
        # after which the master kills the worker.
        drain(setup.grpc, setup.grpc_port, timeout=max(1.0, server.cfg.graceful_timeout - 1.0))
        setup.grpc = None
    from .metrics import flush

    flush()


_M_ARENA_MAX = -8  # glibc's mallopt parameter


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas: by default every request thread may get one of its own (up to
    8 per core), and memory freed in one is not reused by the others, so a threaded worker's
    memory creeps up under load. Read by glibc only at start from MALLOC_ARENA_MAX, hence mallopt."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return  # the operator chose
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, arenas)
    except (OSError, AttributeError):  # not glibc
        pass


class _Heartbeat:
    """Tells the master this worker is alive while it loads models and the app, which may take
    longer than gunicorn's ``timeout``; runs from ``post_fork`` until ``post_worker_init``."""

    def __init__(self, worker: Any, interval: float) -> None:
        self._done = threading.Event()
        self._worker = worker
        self._interval = interval
        self._thread = threading.Thread(target=self._beat, name="tfwsgi-load-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._done.wait(self._interval):
            self._worker.notify()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


@dataclass
class WorkerSetup:
    """What ``post_fork`` set up in a worker (kept on gunicorn's worker object as ``tfwsgi``)."""

    started: float
    heartbeat: _Heartbeat | None
    tf_threads: tuple[int, int]
    grpc: Any = None  # this worker's grpc.Server (tfwsgi.grpc_api) on TFWSGI_PORT, if any
    grpc_core: Any = None  # its grpc_api.Core, given the app's DataPlane in post_worker_init
    grpc_port: int = 0


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


def _hold_stop_signals(worker: Any) -> None:
    """Keep a stop signal that comes before gunicorn's worker has its own handlers, and hand it
    to them once they are in place. Between fork and ``init_process`` (which runs after this
    hook) a worker still has the master's handlers, which only queue the signal for the master's
    loop: a SIGTERM sent to the whole process group while a worker started its gRPC server here
    was lost, and the master waited graceful_timeout (30 s) before it killed that worker."""
    held: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        held.append(signum)

    for sig in _STOP_SIGNALS:
        signal.signal(sig, hold)
    init_signals = worker.init_signals

    def init_signals_then_replay() -> None:
        init_signals()  # gunicorn's handlers (gunicorn/workers/base.py Worker.init_signals)
        for signum in dict.fromkeys(held):
            os.kill(os.getpid(), signum)

    worker.init_signals = init_signals_then_replay


def post_fork(server: Any, worker: Any) -> None:
    """Worker, right after fork: its cores, logging, TF's threads and malloc, and its gRPC server
    (TFWSGI_PORT); the models load next, in the app factory, with a heartbeat running meanwhile."""
    started = time.monotonic()
    _hold_stop_signals(worker)
    _pin(worker)  # every thread made below inherits the cores
    _share_gunicorn_logging(server)
    heartbeat = _Heartbeat(worker, interval=min(1.0, server.cfg.timeout / 4))
    tf_threads = fitted_threads(from_env(), server.cfg.workers)
    os.environ.setdefault("OMP_NUM_THREADS", str(tf_threads[0]))
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    from .servable import configure_threads, initialize_runtime

    configure_threads(*tf_threads)
    initialize_runtime()  # here, where its CUDA probe's lines can be left out of the log
    _limit_malloc_arenas()
    worker.tfwsgi = setup = WorkerSetup(started, heartbeat, tf_threads)
    settings = from_env()
    if settings.port:
        # Here, after fork (grpcio's core must never start in the master) and before the models
        # load: a reload's new workers listen at once (tfwsgi.grpc_api.Core).
        from .grpc_api import Core, serve

        age = settings.grpc_max_connection_age_ms / 1000
        if age * 1.1 >= server.cfg.graceful_timeout - 1:
            log.warning("tfwsgi: TFWSGI_GRPC_MAX_CONNECTION_AGE_MS (%d) is not below gunicorn's "
                        "graceful_timeout (%ss): a stopping worker may not wait for every gRPC "
                        "client to move", settings.grpc_max_connection_age_ms, server.cfg.graceful_timeout)
        setup.grpc_core = Core()
        setup.grpc_port = settings.port
        setup.grpc = serve(setup.grpc_core, settings.port, settings)


def _on_graceful_stop(action: Callable[[], None]) -> None:
    """Run ``action`` (in a thread of its own, never in the signal handler's frame) as soon as
    this worker is asked to stop gracefully (SIGTERM: a stop, a reload's retirement), then
    gunicorn's own handler, which lets the requests in flight finish."""
    previous = signal.getsignal(signal.SIGTERM)

    def handle(signum: int, frame: Any) -> None:
        threading.Thread(target=action, name="tfwsgi-graceful-stop", daemon=True).start()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, handle)


def post_worker_init(worker: Any) -> None:
    """Worker, app (and models) loaded, about to take requests: its gRPC calls go to the app's
    core, and its own loop keeps the heartbeat from now on."""
    setup: WorkerSetup = worker.tfwsgi
    if setup.grpc_core is not None:
        state = worker.wsgi.extensions["tfwsgi"]
        setup.grpc_core.set(state.dataplane, state.reloads)  # calls waiting go on
        _on_graceful_stop(setup.grpc_core.shutdown)
    if setup.heartbeat is not None:
        setup.heartbeat.stop()
        setup.heartbeat = None
    from .metrics import start_flushing

    start_flushing()
    cpus = ",".join(map(str, sorted(os.sched_getaffinity(0)))) if hasattr(os, "sched_getaffinity") else "?"
    from .allocator import active

    worker.log.info("tfwsgi: worker %d ready in %.2fs (intra_op=%d inter_op=%d cores=%s malloc=%s)",
                    os.getpid(), time.monotonic() - setup.started, *setup.tf_threads, cpus, active())
