"""The manager: the only place that loads and unloads servables, and where callers find them.

Its source (``source.Source``) proposes each model's aspired versions; the manager applies them
with TF Serving's availability-preserving policy in each worker: a new aspired version is loaded
(and warmed up) before anything that depended on an old one moves; a version leaves only when
another is available, or when its model is no longer proposed; a version that fails to load is
reported (state END with its error) and retried as TF Serving does, never served. It announces
every change to its listeners (metrics, the batcher, memory release).

Readers (requests) never take a lock: every change publishes a new, immutable snapshot of a
model's versions and labels, which a request reads once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import Code, InvalidArgument, NotFound, TFWSGIError
from .settings import Settings, names
from .source import AspiredVersions, ModelConfig, Source, model_configs

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
    error_code: int = Code.OK
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
    aspired: AspiredVersions = field(default_factory=AspiredVersions)
    snapshot: Snapshot = field(default_factory=Snapshot)


@dataclass(frozen=True)
class RetryPolicy:
    """TF Serving's ``max_num_load_retries`` and ``load_retry_interval_micros``."""

    max_retries: int = 5
    interval_seconds: float = 60.0


class Listener:
    """What the manager announces, in the thread that applies a proposal; override what you need.
    A listener that raises is logged and passed over: it never stops the manager."""

    def state(self, name: str, version: int, old: str | None, new: str) -> None:
        """A version moved from state ``old`` (None: it was not known) to ``new``."""

    def load_finished(self, name: str, seconds: float, ok: bool) -> None:
        """A load (and warmup) of a version of model ``name`` ended, in ``seconds``."""

    def loaded(self, name: str, version: int, servable: Any) -> None:
        """``servable`` is available: requests may be handed it from now on."""

    def unloaded(self, name: str, version: int) -> None:
        """A version no longer serves, and the manager holds it no more (announced once the
        proposal is applied; a request in flight may still hold it)."""


def _default_loader(name: str, version: int, path: str) -> Any:
    from .servable import Servable

    return Servable(name, version, path)


class ModelManager:
    """Applies the aspired versions its source proposes, resolves requests, announces changes."""

    def __init__(self, configs: Sequence[ModelConfig], loader: Loader = _default_loader,
                 retry: RetryPolicy | None = None, observer: Listener | None = None,
                 read_configs: Callable[[], Sequence[ModelConfig]] | None = None) -> None:
        self._loader = loader
        self._retry = retry or RetryPolicy()
        self._listeners: list[Listener] = []
        if observer is not None:
            self.add_listener(observer)
        self._write = threading.RLock()  # one proposal applied at a time
        # Configured models are known (not ready) before the first proposal.
        self._models: dict[str, ModelEntry] = {c.name: ModelEntry() for c in configs}
        self._removed: dict[str, ModelEntry] = {}
        self._unloaded: list[tuple[str, int]] = []  # announced once the proposal is applied
        self.source = Source(configs, self.set_aspired_versions, read_configs)

    def add_listener(self, listener: Listener) -> None:
        """Announce every later change to ``listener`` too."""
        self._listeners.append(listener)

    def _announce(self, hook: str, *args: Any) -> None:
        for listener in self._listeners:
            try:
                getattr(listener, hook)(*args)
            except Exception:
                log.exception("tfwsgi: model listener %r failed on %s%r", listener, hook, args)

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

    # ------------------------------------------------------------------ writing (the source)

    def load_all(self) -> None:
        """Load every aspired version of every model: the source's first look (once per worker,
        after fork)."""
        self.source.propose(initial=True)

    def set_aspired_versions(self, proposal: Mapping[str, AspiredVersions]) -> None:
        """Apply the source's proposal (every model's aspired versions; a model left out is
        removed), availability first; then announce the versions that left."""
        with self._write:
            models = dict(self._models)
            for name in list(models):
                if name not in proposal:
                    self._removed[name] = models.pop(name)
            for name, aspired in proposal.items():
                if name in models:
                    models[name] = ModelEntry(aspired, models[name].snapshot)
                else:
                    self._removed.pop(name, None)
                    models[name] = ModelEntry(aspired)
            self._models = models  # published whole: readers see the old or the new dict
            for name, entry in models.items():
                try:
                    self._apply(name, entry)
                except Exception:  # one model's trouble must not stop the others
                    log.exception("tfwsgi: applying the aspired versions of model %s failed", name)
            for name, entry in list(self._removed.items()):
                self._unload_all(name, entry)
            # Announced after the pass, when no frame of the manager holds an old snapshot.
            unloaded, self._unloaded = self._unloaded, []
            for name, version in unloaded:
                self._announce("unloaded", name, version)

    def _publish(self, entry: ModelEntry, versions: Mapping[int, VersionState]) -> None:
        available = [v for v, s in versions.items() if s.state == AVAILABLE]
        latest = max(available) if available else None
        labels: dict[str, int] = {}
        for label, target in entry.aspired.labels.items():
            state = versions.get(target)
            if state is not None and state.state == AVAILABLE:
                labels[label] = target
            elif label in entry.snapshot.labels:
                # TF Serving moves a label only to a loaded version: until then it stays put.
                old = entry.snapshot.labels[label]
                if old in versions and versions[old].state == AVAILABLE:
                    labels[label] = old
        entry.snapshot = Snapshot(dict(versions), latest, labels)

    def _set(self, name: str, entry: ModelEntry, state: VersionState) -> None:
        versions = dict(entry.snapshot.versions)
        old = versions.get(state.version)
        versions[state.version] = state
        self._publish(entry, versions)
        if old is None or old.state != state.state:
            self._announce("state", name, state.version, old and old.state, state.state)

    def _apply(self, name: str, entry: ModelEntry) -> None:
        aspired = entry.aspired
        now = time.monotonic()
        for version, path in aspired.versions.items():  # newest first
            state = entry.snapshot.versions.get(version)
            if state is None or (state.state == END and not state.error_code):
                self._load(name, entry, version, path, attempts=0)
            elif (state.state == END and state.error_code
                  and state.attempts <= self._retry.max_retries
                  and now - state.last_attempt >= self._retry.interval_seconds):
                self._load(name, entry, version, path, attempts=state.attempts)
        versions = entry.snapshot.versions
        if not any(s.state == AVAILABLE for s in versions.values()):
            # Nothing to serve: every aspired version failed in this (perhaps fresh) worker. Load
            # the newest older version that works, as the workers that had it keep serving it.
            for version, path in aspired.fallback.items():  # newest first
                state = versions.get(version)
                if state is None or (state.state == END and not state.error_code):
                    log.warning("tfwsgi: model %s: no aspired version loads, falling back to %d",
                                name, version)
                    self._load(name, entry, version, path, attempts=0)
                    if entry.snapshot.versions[version].state == AVAILABLE:
                        break
        # Unload what is no longer aspired, but never the last available version of a model.
        versions = entry.snapshot.versions
        aspired_available = [v for v in aspired.versions
                             if versions.get(v) and versions[v].state == AVAILABLE]
        leaving = sorted((v for v, s in versions.items()
                          if s.state == AVAILABLE and v not in aspired.versions), reverse=True)
        if not aspired_available and leaving:
            leaving = leaving[1:]  # keep the newest one serving until an aspired version is up
        for version in leaving:
            self._unload(name, entry, version)
        # Labels whose target became available since the last pass move now.
        versions = entry.snapshot.versions  # not the one from before the unloads
        if dict(entry.snapshot.labels) != {k: v for k, v in aspired.labels.items()
                                           if versions.get(v) and versions[v].state == AVAILABLE}:
            self._publish(entry, entry.snapshot.versions)

    def _load(self, name: str, entry: ModelEntry, version: int, path: str, attempts: int) -> None:
        self._set(name, entry, VersionState(version, LOADING, attempts=attempts + 1,
                                            last_attempt=time.monotonic(), path=path))
        started = time.monotonic()
        try:
            servable = self._loader(name, version, path)
        except Exception as exc:  # a broken version must never stop the others
            code, message = ((exc.code, exc.message) if isinstance(exc, TFWSGIError)
                             else (TFWSGIError.code, f"{type(exc).__name__}: {exc}"))  # UNKNOWN
            state = replace(entry.snapshot.versions[version], state=END, error_code=code,
                            error_message=message)
            self._set(name, entry, state)
            self._announce("load_finished", name, time.monotonic() - started, False)
            left = self._retry.max_retries - attempts
            log.error("tfwsgi: pid %d failed to load model %s version %d (%s): %s",
                      os.getpid(), name, version,
                      f"{left} retries left" if left > 0 else "no retries left", message)
            return
        self._set(name, entry, replace(entry.snapshot.versions[version], state=AVAILABLE,
                                       servable=servable, error_code=Code.OK, error_message=""))
        self._announce("load_finished", name, time.monotonic() - started, True)
        self._announce("loaded", name, version, servable)
        log.info("tfwsgi: pid %d loaded model %s version %d in %.2fs",
                 os.getpid(), name, version, time.monotonic() - started)

    def _unload(self, name: str, entry: ModelEntry, version: int) -> None:
        """Stop serving a version; listeners hear of it once the proposal is applied."""
        state = entry.snapshot.versions[version]
        self._set(name, entry, replace(state, state=UNLOADING))
        self._set(name, entry, replace(state, state=END, servable=None))
        self._unloaded.append((name, version))
        log.info("tfwsgi: pid %d unloaded model %s version %d", os.getpid(), name, version)

    def _unload_all(self, name: str, entry: ModelEntry) -> None:
        for version, state in list(entry.snapshot.versions.items()):
            if state.state in (AVAILABLE, LOADING):
                self._unload(name, entry, version)
        del self._removed[name]


def manager_from_settings(settings: Settings,
                          configs: Sequence[ModelConfig] | None = None) -> ModelManager:
    """The manager the settings describe: models (``configs``, or the settings' own), load
    retries, warmup in its loader, and its listeners for metrics and for memory release."""

    def loader(name: str, version: int, path: str) -> Any:
        from .servable import Servable

        servable = Servable(name, version, path, names(settings.saved_model_tags))
        if settings.enable_model_warmup:
            servable.warmup(settings.num_request_iterations_for_warmup)
        return servable

    from .allocator import MemoryRelease
    from .metrics import ModelObserver

    retry = RetryPolicy(settings.max_num_load_retries, settings.load_retry_interval_micros / 1e6)
    read = (lambda: model_configs(settings)) if settings.model_config_file else None
    start = model_configs(settings) if configs is None else configs
    manager = ModelManager(start, loader, retry, ModelObserver(), read)
    manager.add_listener(MemoryRelease())
    return manager


def watch(manager: ModelManager, settings: Settings) -> None:
    """Start this worker's polling of base paths and of the model config file."""
    manager.source.start(settings.file_system_poll_wait_seconds,
                         settings.model_config_file_poll_wait_seconds)
