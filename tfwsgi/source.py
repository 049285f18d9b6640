"""The source: model configs and the versions on disk, polled, proposed to the manager. Loads nothing.

As TF Serving's file-system source does, it scans each model's base path and proposes the *aspired
versions* under the model's version policy to its target (the manager's ``set_aspired_versions``)
in one call for all models; a model left out of a proposal is no longer configured. It polls the
base paths, and the model config file when that poll is on, in a thread of the worker.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from . import textformat
from .errors import ConfigError
from .settings import Settings

log = logging.getLogger("tfwsgi")

LATEST = "latest"
ALL = "all"
SPECIFIC = "specific"


@dataclass(frozen=True)
class VersionPolicy:
    """TF Serving's ``model_version_policy``: latest N (the default, N=1), all, or specific."""

    kind: str = LATEST
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def aspired(self, available: Iterable[int]) -> list[int]:
        """The versions to serve out of those on disk, newest first."""
        versions = sorted(set(available), reverse=True)
        if self.kind == ALL:
            return versions
        if self.kind == SPECIFIC:
            wanted = set(self.versions)
            return [v for v in versions if v in wanted]
        return versions[: self.num_versions]


@dataclass(frozen=True)
class ModelConfig:
    """One entry of ``model_config_list``."""

    name: str
    base_path: str
    policy: VersionPolicy = VersionPolicy()
    labels: dict[str, int] = field(default_factory=dict)


def scan_versions(base_path: str) -> dict[int, str]:
    """Numeric subdirectories of ``base_path`` (``00000123`` is version 123) → their paths."""
    try:
        entries = list(os.scandir(base_path))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return {}
    found: dict[int, str] = {}
    for entry in entries:
        if entry.name.isdigit() and entry.is_dir():
            version = int(entry.name)
            # Two spellings of one number ("1", "01"): keep the first seen in name order.
            if version not in found or entry.path < found[version]:
                found[version] = entry.path
    return found


def _policy_from_proto(name: str, proto: object) -> VersionPolicy:
    which = proto.WhichOneof("policy_choice")  # type: ignore[attr-defined]
    if which is None or which == "latest":
        num = proto.latest.num_versions if which else 1  # type: ignore[attr-defined]
        if num < 0:
            raise ConfigError(f"model {name!r}: latest.num_versions must be >= 0")
        return VersionPolicy(LATEST, num_versions=num or 1)
    if which == "all":
        return VersionPolicy(ALL)
    versions = tuple(int(v) for v in proto.specific.versions)  # type: ignore[attr-defined]
    if not versions:
        raise ConfigError(f"model {name!r}: specific policy lists no versions")
    return VersionPolicy(SPECIFIC, versions=versions)


def parse_model_config(text: str, origin: str = "<config>") -> list[ModelConfig]:
    """Parse TF Serving's ``ModelServerConfig`` text format with its own protobuf messages."""
    msg = textformat.parse(textformat.model_server_config(), text, origin)
    if msg.WhichOneof("config") == "custom_model_config":
        raise ConfigError(f"{origin}: custom_model_config is not supported")
    models: list[ModelConfig] = []
    seen: set[str] = set()
    for c in msg.model_config_list.config:
        if not c.name:
            raise ConfigError(f"{origin}: a model config has no name")
        if c.name in seen:
            raise ConfigError(f"{origin}: model {c.name!r} is configured twice")
        seen.add(c.name)
        if not c.base_path:
            raise ConfigError(f"{origin}: model {c.name!r} has no base_path")
        if c.model_platform not in ("", "tensorflow"):
            raise ConfigError(
                f"{origin}: model {c.name!r}: model_platform {c.model_platform!r} is not supported")
        models.append(ModelConfig(
            name=c.name,
            base_path=os.path.abspath(c.base_path),
            policy=_policy_from_proto(c.name, c.model_version_policy),
            labels=dict(c.version_labels),
        ))
    return models


def model_configs(settings: Settings) -> list[ModelConfig]:
    """The models to serve, from the config file or from ``model_name``/``model_base_path``."""
    if settings.model_config_file:
        path = settings.model_config_file
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError(f"TFWSGI_MODEL_CONFIG_FILE: cannot read {path}: {exc}") from None
        return parse_model_config(text, origin=path)
    if not settings.model_base_path:
        raise ConfigError(
            "no model to serve: set TFWSGI_MODEL_BASE_PATH (and TFWSGI_MODEL_NAME) "
            "or TFWSGI_MODEL_CONFIG_FILE")
    return [ModelConfig(settings.model_name, os.path.abspath(settings.model_base_path))]


@dataclass(frozen=True)
class AspiredVersions:
    """What the source proposes for one model: the versions to serve (newest first, with their
    paths), its version labels, and under "latest" the older versions on disk that a worker in
    which no aspired version loads may serve instead (newest first; under a pinned policy none:
    it names exactly what may serve)."""

    versions: Mapping[int, str] = field(default_factory=dict)
    labels: Mapping[str, int] = field(default_factory=dict)
    fallback: Mapping[int, str] = field(default_factory=dict)


def aspired_versions(config: ModelConfig, on_disk: Mapping[int, str]) -> AspiredVersions:
    """One model's proposal, from the versions found under its base path."""
    aspired = config.policy.aspired(on_disk)
    fallback: dict[int, str] = {}
    if aspired and config.policy.kind == LATEST:
        fallback = {v: on_disk[v] for v in sorted(on_disk, reverse=True)
                    if v < aspired[0] and v not in aspired}
    return AspiredVersions({v: on_disk[v] for v in aspired}, dict(config.labels), fallback)


Target = Callable[[Mapping[str, AspiredVersions]], None]


class Source:
    """Polls the base paths (and the config file) and proposes every model's aspired versions to
    ``target`` in one call."""

    def __init__(self, configs: Sequence[ModelConfig], target: Target,
                 read_configs: Callable[[], Sequence[ModelConfig]] | None = None) -> None:
        self.configs = list(configs)
        self._target = target
        self._read_configs = read_configs
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # One proposal at a time, each from the configs in force when it is made: a poll's scan
        # must not land after (and undo) a new config proposed from another thread (a reload).
        self._proposing = threading.RLock()

    def propose(self, initial: bool = False) -> None:
        """Scan every base path and propose what each model aspires to (``initial``: the first
        look, which warns of a model with no versions)."""
        with self._proposing:
            proposal: dict[str, AspiredVersions] = {}
            for config in self.configs:
                aspired = aspired_versions(config, scan_versions(config.base_path))
                if initial and not aspired.versions:
                    log.warning("tfwsgi: no versions of model %s found under base path %s",
                                config.name, config.base_path)
                proposal[config.name] = aspired
            self._target(proposal)

    def set_configs(self, configs: Sequence[ModelConfig]) -> None:
        """A new model config: propose from it at once (added models load, removed ones unload)."""
        with self._proposing:
            self.configs = list(configs)
            self.propose()

    def poll_config(self) -> None:
        """Read the model config file again; a change is proposed, a bad edit keeps the config in force."""
        if self._read_configs is None:
            return
        try:
            configs = list(self._read_configs())
        except Exception as exc:
            log.error("tfwsgi: model config not reloaded: %s", exc)
            return
        if configs != self.configs:
            log.info("tfwsgi: pid %d model config changed", os.getpid())
            self.set_configs(configs)

    def start(self, fs_poll_seconds: float, config_poll_seconds: float = 0.0) -> None:
        """Poll base paths (and the config file) in a background thread of this worker."""
        config_poll = config_poll_seconds if self._read_configs is not None else 0.0
        if fs_poll_seconds <= 0 and config_poll <= 0:
            return  # TF Serving: 0 means look once, at start

        def run() -> None:
            next_fs = next_cfg = time.monotonic()
            while not self._stop.is_set():
                now = time.monotonic()
                if config_poll > 0 and now >= next_cfg:
                    next_cfg = now + config_poll
                    self.poll_config()
                if fs_poll_seconds > 0 and now >= next_fs:
                    next_fs = now + fs_poll_seconds
                    self.propose()
                waits = [t for t, on in ((next_fs, fs_poll_seconds > 0), (next_cfg, config_poll > 0)) if on]
                self._stop.wait(max(0.05, min(waits) - time.monotonic()))

        self._thread = threading.Thread(target=run, name="tfwsgi-model-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
