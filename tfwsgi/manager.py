"""The manager: the only place that loads servables, and where callers find them by name, version or label."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidArgument, NotFound, TFWSGIError
from .source import ModelConfig, scan_versions

log = logging.getLogger("tfwsgi")

START = "START"
LOADING = "LOADING"
AVAILABLE = "AVAILABLE"
UNLOADING = "UNLOADING"
END = "END"


Loader = Callable[[str, int, str], Any]


@dataclass
class VersionState:
    """What the manager knows of one version: TF Serving's state, and the error if it failed."""

    version: int
    state: str = START
    error_code: int = 0
    error_message: str = ""
    servable: Any = None


@dataclass
class ModelEntry:
    config: ModelConfig
    versions: dict[int, VersionState] = field(default_factory=dict)


def _default_loader(name: str, version: int, path: str) -> Any:
    from .servable import Servable

    return Servable(name, version, path)


class ModelManager:
    """Loads each aspired version of each configured model once, and resolves requests to them."""

    def __init__(self, configs: Sequence[ModelConfig], loader: Loader = _default_loader) -> None:
        self._loader = loader
        self._lock = threading.Lock()
        self._models: dict[str, ModelEntry] = {c.name: ModelEntry(c) for c in configs}

    @property
    def model_names(self) -> list[str]:
        return list(self._models)

    def load_all(self) -> None:
        """Load every aspired version of every model (called once per worker, after fork)."""
        for entry in self._models.values():
            cfg = entry.config
            on_disk = scan_versions(cfg.base_path)
            aspired = cfg.policy.aspired(on_disk)
            if not aspired:
                log.warning("tfwsgi: no versions of model %s found under base path %s",
                            cfg.name, cfg.base_path)
            for version in sorted(aspired):
                self._load(entry, version, on_disk[version])
            for label, version in cfg.labels.items():
                state = entry.versions.get(version)
                if state is None or state.state != AVAILABLE:
                    log.warning("tfwsgi: label %s of model %s points at version %d, "
                                "which is not available", label, cfg.name, version)

    def _load(self, entry: ModelEntry, version: int, path: str) -> None:
        name = entry.config.name
        state = VersionState(version, LOADING)
        with self._lock:
            entry.versions[version] = state
        started = time.monotonic()
        try:
            servable = self._loader(name, version, path)
        except TFWSGIError as exc:
            state.state, state.error_code, state.error_message = END, exc.code, exc.message
        except Exception as exc:  # a broken version must never stop the others
            state.state, state.error_code, state.error_message = END, 2, f"{type(exc).__name__}: {exc}"
        else:
            state.servable, state.state = servable, AVAILABLE
            log.info("tfwsgi: pid %d loaded model %s version %d in %.2fs",
                     os.getpid(), name, version, time.monotonic() - started)
            return
        log.error("tfwsgi: pid %d failed to load model %s version %d: %s",
                  os.getpid(), name, version, state.error_message)

    def status(self, name: str, version: int | None = None) -> list[VersionState]:
        """Version states, newest first (GetModelStatus)."""
        entry = self._models.get(name)
        if version is not None:
            state = entry.versions.get(version) if entry else None
            if state is None:
                raise NotFound(f"Could not find version {version} of model {name}")
            return [state]
        if entry is None or not entry.versions:
            raise NotFound(f"Could not find any versions of model {name}")
        return [entry.versions[v] for v in sorted(entry.versions, reverse=True)]

    def servable(self, name: str, version: int | None = None, label: str | None = None) -> Any:
        """The servable for a request: latest available, a specific version, or a label's."""
        if version is not None and label is not None:
            raise InvalidArgument(
                f"Both model version ({version}) and model version label ({label}) "
                "cannot be supplied.")
        entry = self._models.get(name)
        if label is not None:
            if entry is None or label not in entry.config.labels:
                raise InvalidArgument(f"Unrecognized servable version label: {label}")
            version = entry.config.labels[label]
        if version is not None:
            state = entry.versions.get(version) if entry else None
            if state is None or state.state != AVAILABLE:
                raise NotFound(f"Servable not found for request: Specific({name}, {version})")
            return state.servable
        if entry is not None:
            for v in sorted(entry.versions, reverse=True):
                if entry.versions[v].state == AVAILABLE:
                    return entry.versions[v].servable
        raise NotFound(f"Servable not found for request: Latest({name})")
