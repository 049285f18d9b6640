"""Model configs and the versions on disk: which versions each model aspires to serve. Loads nothing."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from . import textformat
from .errors import ConfigError
from .settings import Settings

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
