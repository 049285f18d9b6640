"""The manager: the only place that loads and unloads servables, and where callers find them.

It follows TF Serving's availability-preserving policy in each worker: a new aspired version is
loaded (and warmed up) before anything that depended on an old one moves; a version leaves only
when another is available, or when its model is removed from the config; a version that fails to
load is reported (state END with its error) and retried as TF Serving does, never served.

Readers (requests) never take a lock: every change publishes a new, immutable snapshot of a
model's versions and labels, which a request reads once.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .allocator import release_free_memory
from .errors import InvalidArgument, NotFound, TFWSGIError
from .settings import Settings
from .source import LATEST, ModelConfig, model_configs, scan_versions

log = logging.getLogger("tfwsgi")

START = "START"
LOADING = "LOADING"
AVAILABLE = "AVAILABLE"
UNLOADING = "UNLOADING"
END = "END"


Loader = Callable[[str, int, str], Any]


@dataclass(frozen=True)
class VersionState:
    """What the manager knows of one version: TF Serving's state, and the error if it failed."""

    version: int
    state: str = START
    error_code: int = 0
    error_message: str = ""
    servable: Any = None
    attempts: int = 0
    last_attempt: float = 0.0
    path: str = ""


@dataclass(frozen=True)
class Snapshot:
    """One model as requests see it: its versions, the latest available, its labels in force."""

    versions: Mapping[int, VersionState] = field(default_factory=dict)
    latest: int | None = None
    labels: Mapping[str, int] = field(default_factory=dict)


@dataclass
class ModelEntry:
    config: ModelConfig
    snapshot: Snapshot = field(default_factory=Snapshot)


@dataclass(frozen=True)
class RetryPolicy:
    """TF Serving's ``max_num_load_retries`` and ``load_retry_interval_micros``."""

    max_retries: int = 5
    interval_seconds: float = 60.0


def _default_loader(name: str, version: int, path: str) -> Any:
    from .servable import Servable

    return Servable(name, version, path)


class ModelManager:
    """Loads the aspired versions of each configured model, keeps them current, resolves requests."""

    def __init__(self, configs: Sequence[ModelConfig], loader: Loader = _default_loader,
                 retry: RetryPolicy | None = None, observer: Any = None) -> None:
        self._loader = loader
        self._observer = observer  # metrics.ModelObserver: state changes and load times
        self._retry = retry or RetryPolicy()
        self._write = threading.RLock()  # one writer at a time: load_all, reconcile, set_configs
        self._models: dict[str, ModelEntry] = {c.name: ModelEntry(c) for c in configs}
        self._removed: dict[str, ModelEntry] = {}
        self._unloaded: list[weakref.ref[Any]] = []  # unloaded servables not yet freed
        self._collect_in = 0  # passes until the next collection for them (0: none due)
        self._collect_wait = 0  # passes between that collection and the one before
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    # ------------------------------------------------------------------ reading (requests)

    @property
    def model_names(self) -> list[str]:
        return list(self._models)

    def status(self, name: str, version: int | None = None) -> list[VersionState]:
        """Version states, newest first (GetModelStatus)."""
        entry = self._models.get(name) or self._removed.get(name)
        versions = entry.snapshot.versions if entry else {}
        if version is not None:
            state = versions.get(version)
            if state is None:
                raise NotFound(f"Could not find version {version} of model {name}")
            return [state]
        if not versions:
            raise NotFound(f"Could not find any versions of model {name}")
        return [versions[v] for v in sorted(versions, reverse=True)]

    def servable(self, name: str, version: int | None = None, label: str | None = None) -> Any:
        """The servable for a request: latest available, a specific version, or a label's."""
        if version is not None and label is not None:
            raise InvalidArgument(
                f"Both model version ({version}) and model version label ({label}) "
                "cannot be supplied.")
        entry = self._models.get(name)
        snap = entry.snapshot if entry is not None else Snapshot()
        if label is not None:
            if label not in snap.labels:
                raise InvalidArgument(f"Unrecognized servable version label: {label}")
            version = snap.labels[label]
        if version is not None:
            state = snap.versions.get(version)
            if state is None or state.state != AVAILABLE:
                raise NotFound(f"Servable not found for request: Specific({name}, {version})")
            return state.servable
        if snap.latest is None:
            raise NotFound(f"Servable not found for request: Latest({name})")
        return snap.versions[snap.latest].servable

    def ready(self) -> dict[str, bool]:
        """For each configured model: does this worker have a version of it available?"""
        return {name: e.snapshot.latest is not None for name, e in self._models.items()}

    # ------------------------------------------------------------------ writing (the watcher)

    def load_all(self) -> None:
        """Load every aspired version of every model (called once per worker, after fork)."""
        self.reconcile(initial=True)

    def reconcile(self, initial: bool = False) -> None:
        """Bring every model in line with its base path and config, availability first."""
        with self._write:
            for entry in list(self._models.values()):
                try:
                    self._reconcile(entry, initial)
                except Exception:  # one model's trouble must not stop the others
                    log.exception("tfwsgi: reconciling model %s failed", entry.config.name)
            for name, entry in list(self._removed.items()):
                self._unload_all(name, entry)
            self._release_unloaded()

    def _release_unloaded(self) -> None:
        """Free the memory of unloaded versions, at the end of a pass (no frame of the manager
        holds an old snapshot any more). A loaded SavedModel is a web of reference cycles
        (graphs, functions, variables) that only a full collection frees, and one run while
        anything still refers to the version leaves it for some far-off collection. A version
        still held by a request in flight is collected again a pass later, then 2, 4 … 64 passes
        later, and then left to Python's own collections."""
        if self._collect_in == 0:
            return
        self._collect_in -= 1
        if self._collect_in > 0:
            return
        gc.collect()
        release_free_memory()
        self._unloaded = [ref for ref in self._unloaded if ref() is not None]
        self._collect_wait = max(1, self._collect_wait * 2)
        if self._unloaded and self._collect_wait <= 64:
            self._collect_in = self._collect_wait
        else:
            self._unloaded, self._collect_wait = [], 0

    def set_configs(self, configs: Sequence[ModelConfig]) -> None:
        """A new model config: added models load on the next reconcile, removed ones unload."""
        with self._write:
            models = dict(self._models)
            wanted = {c.name: c for c in configs}
            for name in list(models):
                if name not in wanted:
                    self._removed[name] = models.pop(name)
            for name, cfg in wanted.items():
                if name in models:
                    models[name] = ModelEntry(cfg, models[name].snapshot)
                else:
                    self._removed.pop(name, None)
                    models[name] = ModelEntry(cfg)
            self._models = models  # published whole: readers see the old or the new dict

    def _publish(self, entry: ModelEntry, versions: Mapping[int, VersionState]) -> None:
        available = [v for v, s in versions.items() if s.state == AVAILABLE]
        latest = max(available) if available else None
        labels: dict[str, int] = {}
        for label, target in entry.config.labels.items():
            state = versions.get(target)
            if state is not None and state.state == AVAILABLE:
                labels[label] = target
            elif label in entry.snapshot.labels:
                # TF Serving moves a label only to a loaded version: until then it stays put.
                old = entry.snapshot.labels[label]
                if old in versions and versions[old].state == AVAILABLE:
                    labels[label] = old
        entry.snapshot = Snapshot(dict(versions), latest, labels)

    def _set(self, entry: ModelEntry, state: VersionState) -> None:
        versions = dict(entry.snapshot.versions)
        old = versions.get(state.version)
        versions[state.version] = state
        self._publish(entry, versions)
        if self._observer is not None and (old is None or old.state != state.state):
            self._observer.state(entry.config.name, state.version, old and old.state, state.state)

    def _reconcile(self, entry: ModelEntry, initial: bool) -> None:
        cfg = entry.config
        on_disk = scan_versions(cfg.base_path)
        aspired = cfg.policy.aspired(on_disk)
        if not aspired and initial:
            log.warning("tfwsgi: no versions of model %s found under base path %s",
                        cfg.name, cfg.base_path)
        now = time.monotonic()
        for version in aspired:  # newest first
            state = entry.snapshot.versions.get(version)
            if state is None or (state.state == END and not state.error_code):
                self._load(entry, version, on_disk[version], attempts=0)
            elif (state.state == END and state.error_code
                  and state.attempts <= self._retry.max_retries
                  and now - state.last_attempt >= self._retry.interval_seconds):
                self._load(entry, version, on_disk[version], attempts=state.attempts)
        versions = entry.snapshot.versions
        if (aspired and cfg.policy.kind == LATEST
                and not any(s.state == AVAILABLE for s in versions.values())):
            # Nothing to serve: every aspired version failed in this (perhaps fresh) worker. Load
            # the newest older version that works, as the workers that had it keep serving it
            # (only under "latest": a pinned policy names exactly what may serve).
            for version in sorted(on_disk, reverse=True):
                if version in aspired or version > aspired[0]:
                    continue
                state = versions.get(version)
                if state is None or (state.state == END and not state.error_code):
                    log.warning("tfwsgi: model %s: no aspired version loads, falling back to %d",
                                cfg.name, version)
                    self._load(entry, version, on_disk[version], attempts=0)
                    if entry.snapshot.versions[version].state == AVAILABLE:
                        break
        # Unload what is no longer aspired, but never the last available version of a model.
        versions = entry.snapshot.versions
        aspired_set = set(aspired)
        aspired_available = [v for v in aspired if versions.get(v) and versions[v].state == AVAILABLE]
        leaving = sorted((v for v, s in versions.items() if s.state == AVAILABLE and v not in aspired_set),
                         reverse=True)
        if not aspired_available and leaving:
            leaving = leaving[1:]  # keep the newest one serving until an aspired version is up
        for version in leaving:
            self._unload(entry, version)
        # Labels whose target became available since the last pass move now.
        versions = entry.snapshot.versions  # not the one from before the unloads
        if dict(entry.snapshot.labels) != {k: v for k, v in cfg.labels.items()
                                           if versions.get(v) and versions[v].state == AVAILABLE}:
            self._publish(entry, entry.snapshot.versions)

    def _load(self, entry: ModelEntry, version: int, path: str, attempts: int) -> None:
        name = entry.config.name
        self._set(entry, VersionState(version, LOADING, attempts=attempts + 1,
                                      last_attempt=time.monotonic(), path=path))
        started = time.monotonic()
        try:
            servable = self._loader(name, version, path)
        except Exception as exc:  # a broken version must never stop the others
            code, message = ((exc.code, exc.message) if isinstance(exc, TFWSGIError)
                             else (2, f"{type(exc).__name__}: {exc}"))
            state = replace(entry.snapshot.versions[version], state=END, error_code=code,
                            error_message=message)
            self._set(entry, state)
            if self._observer is not None:
                self._observer.loaded(name, time.monotonic() - started, False)
            left = self._retry.max_retries - attempts
            log.error("tfwsgi: pid %d failed to load model %s version %d (%s): %s",
                      os.getpid(), name, version,
                      f"{left} retries left" if left > 0 else "no retries left", message)
            return
        self._set(entry, replace(entry.snapshot.versions[version], state=AVAILABLE,
                                 servable=servable, error_code=0, error_message=""))
        if self._observer is not None:
            self._observer.loaded(name, time.monotonic() - started, True)
        log.info("tfwsgi: pid %d loaded model %s version %d in %.2fs",
                 os.getpid(), name, version, time.monotonic() - started)

    def _unload(self, entry: ModelEntry, version: int) -> None:
        """Stop serving a version; its memory is freed by ``_release_unloaded`` after the pass."""
        state = entry.snapshot.versions[version]
        self._set(entry, replace(state, state=UNLOADING))
        self._set(entry, replace(state, state=END, servable=None))
        self._collect_in, self._collect_wait = 1, 0  # at the end of this pass
        with contextlib.suppress(TypeError):  # no weak reference: collected on this pass only
            self._unloaded.append(weakref.ref(state.servable))
        log.info("tfwsgi: pid %d unloaded model %s version %d", os.getpid(), entry.config.name, version)

    def _unload_all(self, name: str, entry: ModelEntry) -> None:
        for version, state in list(entry.snapshot.versions.items()):
            if state.state in (AVAILABLE, LOADING):
                self._unload(entry, version)
        del self._removed[name]

    # ------------------------------------------------------------------ the watcher thread

    def start_watching(self, fs_poll_seconds: float, config_poll_seconds: float = 0.0,
                       read_configs: Callable[[], Sequence[ModelConfig]] | None = None) -> None:
        """Poll base paths (and the config file) in a background thread of this worker."""
        if fs_poll_seconds <= 0 and (config_poll_seconds <= 0 or read_configs is None):
            return  # TF Serving: 0 means look once, at start

        def run() -> None:
            next_fs = next_cfg = time.monotonic()
            while not self._stop.is_set():
                now = time.monotonic()
                if read_configs is not None and config_poll_seconds > 0 and now >= next_cfg:
                    next_cfg = now + config_poll_seconds
                    try:
                        configs = read_configs()
                    except Exception as exc:  # a bad edit keeps the config in force
                        log.error("tfwsgi: model config not reloaded: %s", exc)
                    else:
                        if [c for c in configs] != [e.config for e in self._models.values()]:
                            log.info("tfwsgi: pid %d model config changed", os.getpid())
                            self.set_configs(configs)
                            self.reconcile()
                if fs_poll_seconds > 0 and now >= next_fs:
                    next_fs = now + fs_poll_seconds
                    self.reconcile()
                waits = [t for t, on in ((next_fs, fs_poll_seconds > 0),
                                         (next_cfg, config_poll_seconds > 0 and read_configs)) if on]
                self._stop.wait(max(0.05, min(waits) - time.monotonic()))

        self._watcher = threading.Thread(target=run, name="tfwsgi-model-watcher", daemon=True)
        self._watcher.start()

    def stop_watching(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=30)


def manager_from_settings(settings: Settings) -> ModelManager:
    """The manager the settings describe: models, load retries, and warmup in its loader."""

    def loader(name: str, version: int, path: str) -> Any:
        from .servable import Servable

        servable = Servable(name, version, path)
        if settings.enable_model_warmup:
            servable.warmup(settings.num_request_iterations_for_warmup)
        return servable

    from .metrics import ModelObserver

    retry = RetryPolicy(settings.max_num_load_retries, settings.load_retry_interval_micros / 1e6)
    return ModelManager(model_configs(settings), loader, retry, ModelObserver())


def watch(manager: ModelManager, settings: Settings) -> None:
    """Start this worker's watcher of base paths and of the model config file."""
    read = (lambda: model_configs(settings)) if settings.model_config_file else None
    manager.start_watching(settings.file_system_poll_wait_seconds,
                           settings.model_config_file_poll_wait_seconds, read)
