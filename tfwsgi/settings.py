"""Every tfwsgi setting, declared once: name, type, default, environment variable and doc.

Names follow TensorFlow Serving's flags; each is read from ``TFWSGI_<FLAG IN UPPER CASE>``.
``python -m tfwsgi.settings`` prints the Markdown table that the README carries.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

ENV_PREFIX = "TFWSGI_"


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def _non_negative(value: Any) -> None:
    if value < 0:
        raise ValueError(f"must be >= 0, got {value}")


def _port(value: Any) -> None:
    if not 0 < value < 65536:
        raise ValueError(f"must be a TCP port (1-65535), got {value}")


def _one_of(*choices: str) -> Callable[[Any], None]:
    def check(value: Any) -> None:
        if value not in choices:
            raise ValueError(f"must be {' or '.join(choices)}, got {value!r}")
    return check


def _positive(value: Any) -> None:
    if value <= 0:
        raise ValueError(f"must be > 0, got {value}")


@dataclass(frozen=True)
class Setting:
    """One setting: its TF Serving flag name, type, default, optional validator and doc."""

    name: str
    type: type
    default: Any
    doc: str
    validate: Callable[[Any], None] | None = field(default=None, compare=False)

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    def parse(self, text: str) -> Any:
        """Parse the environment's text into this setting's type, or raise ConfigError."""
        try:
            value = _parse_bool(text) if self.type is bool else self.type(text.strip())
            if self.validate is not None:
                self.validate(value)
        except ValueError as exc:
            raise ConfigError(f"{self.env}={text!r}: {exc}") from None
        return value


SETTINGS: tuple[Setting, ...] = (
    Setting("env_file", str, "",
            "A file of `TFWSGI_*=value` lines applied at start and again on every SIGHUP, so a "
            "reload picks up changed settings (the environment of a running master cannot change)."),
    Setting("model_name", str, "default",
            "Name of the model served from `model_base_path` (ignored with `model_config_file`)."),
    Setting("model_base_path", str, "",
            "Directory holding the model's numeric version subdirectories "
            "(`<base>/<version>/saved_model.pb`)."),
    Setting("model_config_file", str, "",
            "TF Serving `ModelServerConfig` text proto (`model_config_list { config { … } }`); "
            "overrides `model_name`/`model_base_path`."),
    Setting("tensorflow_intra_op_parallelism", int, 0,
            "Threads one op may use in each worker. 0 fits it to the machine: "
            "cores ÷ workers, at least 1 (TF's own 0 would give every worker every core).",
            _non_negative),
    Setting("tensorflow_inter_op_parallelism", int, 0,
            "Ops run in parallel in each worker. 0 fits it to the machine: 1.", _non_negative),
    Setting("cpu_affinity", bool, True,
            "Pin each worker to its share of the cores this server may use (split evenly over "
            "the workers, as the TF threads are; with more workers than cores, one core each, "
            "balanced): its threads stay on one core, where the GIL changes hands cheaply. "
            "Turn it off when other busy processes share the cores."),
    Setting("file_system_poll_wait_seconds", int, 1,
            "How often each worker looks for new, removed or changed versions under the base "
            "paths; 0 looks once, at start.", _non_negative),
    Setting("model_config_file_poll_wait_seconds", int, 0,
            "How often each worker re-reads `model_config_file` (models added or removed, "
            "policies, labels); 0 reads it once.", _non_negative),
    Setting("max_num_load_retries", int, 5,
            "Retries of a version that failed to load (it is reported, never served).",
            _non_negative),
    Setting("load_retry_interval_micros", int, 60_000_000,
            "Time between those retries, in microseconds.", _non_negative),
    Setting("enable_model_warmup", bool, True,
            "Replay `assets.extra/tf_serving_warmup_requests` before a version is AVAILABLE."),
    Setting("num_request_iterations_for_warmup", int, 1,
            "How many times each warmup record is replayed.", _positive),
    Setting("enable_batching", bool, False,
            "Merge concurrent requests on the same signature into one run (TF Serving's "
            "`--enable_batching`; each worker's request threads are the concurrent requests)."),
    Setting("batching_parameters_file", str, "",
            "TF Serving's batching parameters text file (`max_batch_size { value: 32 }`, "
            "`batch_timeout_micros`, `max_enqueued_batches`, `num_batch_threads`, "
            "`allowed_batch_sizes`); empty: TF Serving's defaults."),
    Setting("preload_tensorflow", bool, True,
            "Import (never run) TensorFlow in gunicorn's master before it forks, so every worker "
            "shares its code pages instead of loading its own copy."),
    Setting("memory_allocator", str, "jemalloc",
            "`jemalloc`: gunicorn's master starts itself again with jemalloc preloaded (when "
            "libjemalloc.so.2 is installed) and TensorFlow allocates through it, so the memory of "
            "an unloaded model version goes back to the system; `system`: glibc's malloc, and "
            "TensorFlow keeps the large blocks it once used. Read at start.",
            _one_of("jemalloc", "system")),
    Setting("rest_api_port", int, 8501,
            "Port of the REST API when gunicorn's `-b/--bind` is not given "
            "(binds 0.0.0.0).", _port),
    Setting("rest_api_enable_cors_support", bool, False,
            "Answer CORS preflight requests and add `Access-Control-Allow-Origin: *`."),
    Setting("rest_api_timeout_in_ms", int, 30_000,
            "Deadline of each REST request, from the moment it is all received: one still "
            "unanswered then gets DEADLINE_EXCEEDED (504, JSON error) and one whose deadline passed "
            "while it waited is dropped before it runs (TF Serving's flag); 0: no deadline.",
            _non_negative),
    Setting("max_waiting_requests", int, 0,
            "Requests that may wait in one worker for a request thread; past it a request gets "
            "503 with `Retry-After` at once. 0 derives it: what the worker serves within one "
            "deadline at the rate it measures (requests that would wait longer could only time "
            "out), never fewer than its threads.", _non_negative),
    Setting("workers", int, 0,
            "gunicorn worker processes when `-w` is not given; 0 means one per core.",
            _non_negative),
    Setting("max_request_bytes", int, 64 * 1024 * 1024,
            "Largest accepted request body; larger bodies get 413 with a JSON error.", _positive),
    Setting("cache_enabled", bool, True,
            "Cache predictions (memcached when `memcached` is set, else an LRU in each worker)."),
    Setting("cache_ttl_seconds", int, 3600,
            "How long a cached prediction lives; 0 keeps it until evicted.", _non_negative),
    Setting("cache_model_ttl", str, "",
            "Per-model overrides of the TTL, `model=seconds` or `model=off`, comma-separated."),
    Setting("cache_key_prefix", str, "tfwsgi:",
            "Prefix of every cache key, to keep deployments sharing a memcached apart."),
    Setting("cache_local_max_bytes", int, 64 * 1024 * 1024,
            "Size of each worker's in-process LRU (used when no memcached is set).", _positive),
    Setting("cache_lease_ms", int, 1000,
            "With memcached: on a miss, one request anywhere computes while identical ones wait "
            "up to this long for its answer (a memcached `add` lease); 0 turns it off.",
            _non_negative),
    Setting("cache_hmac_key", str, "",
            "A secret that signs every cached value (HMAC-SHA256 over its key and bytes): a value "
            "without a valid signature is a miss and is recomputed, so whoever can write to "
            "memcached but lacks the secret cannot plant answers. Every instance sharing a "
            "memcached needs the same one. Empty: values are not signed."),
    Setting("cache_hmac_key_file", str, "",
            "A file holding that secret (surrounding white space ignored), which keeps it out of "
            "the environment; if both are set they must be equal, or the server does not start."),
    Setting("memcached", str, "",
            "Memcached servers shared by all workers and hosts, `host:port[,host:port…]` "
            "(keys spread by rendezvous hashing)."),
    Setting("memcached_connect_timeout_ms", int, 100,
            "Connect timeout for memcached; past it the request is served as a miss.", _positive),
    Setting("memcached_timeout_ms", int, 100,
            "Read/write timeout for memcached; past it the request is served as a miss.", _positive),
    Setting("memcached_retry_attempts", int, 2,
            "Failures before a memcached server is set aside (its keys go to the others).", _positive),
    Setting("memcached_retry_timeout_seconds", int, 1,
            "After a failure, how long a server is treated as a miss before it is tried again.",
            _non_negative),
    Setting("memcached_dead_timeout_seconds", int, 5,
            "How long a server set aside stays out before it is tried again.", _non_negative),
    Setting("memcached_max_item_bytes", int, 1024 * 1024,
            "memcached's item size limit (`-I`); larger predictions are served but not cached.",
            _positive),
    Setting("monitoring_config_file", str, "",
            "TF Serving's monitoring config (`prometheus_config { enable: true path: \"/monitoring/"
            "prometheus/metrics\" }`): where Prometheus metrics are served, besides `/metrics`, or "
            "`enable: false` for none. Empty: both paths on (TF Serving turns them off by default)."),
    Setting("log_format", str, "text",
            "gunicorn's access and error logs, and tfwsgi's: `text` (gunicorn's formats) or `json` "
            "(one JSON object a line). Read at start; a SIGHUP does not change it.",
            _one_of("text", "json")),
    Setting("prometheus_multiproc_dir", str, "",
            "Directory for the workers' metric files, wiped at start; empty: a fresh temporary "
            "directory (or `PROMETHEUS_MULTIPROC_DIR` if set)."),
)

_BY_NAME = {s.name: s for s in SETTINGS}


class Settings:
    """The values in force, one attribute per setting."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        for s in SETTINGS:
            setattr(self, s.name, values.get(s.name, s.default))

    def __getattr__(self, name: str) -> Any:  # only reached for unknown names
        raise AttributeError(f"no setting named {name!r}")

    def __repr__(self) -> str:
        body = ", ".join(f"{s.name}={getattr(self, s.name)!r}" for s in SETTINGS)
        return f"Settings({body})"

    def replace(self, **changes: Any) -> Settings:
        values = {s.name: getattr(self, s.name) for s in SETTINGS}
        for name in changes:
            if name not in _BY_NAME:
                raise ConfigError(f"unknown setting {name!r}")
        values.update(changes)
        return Settings(values)


def from_env(environ: Mapping[str, str] | None = None) -> Settings:
    """Read every setting from ``TFWSGI_*`` variables, falling back to the defaults."""
    env = os.environ if environ is None else environ
    values = {s.name: s.parse(env[s.env]) for s in SETTINGS if s.env in env}
    return Settings(values)


def read_env_file(path: str) -> dict[str, str]:
    """``TFWSGI_*`` assignments from an env file (``KEY=value``, ``#`` comments, optional quotes)."""
    values: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise ConfigError(f"TFWSGI_ENV_FILE: cannot read {path}: {exc}") from None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ConfigError(f"{path}:{number}: expected KEY=value")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if key.startswith(ENV_PREFIX) and key != "TFWSGI_ENV_FILE":
            values[key] = value
    return values


def with_env_file(environ: Mapping[str, str], applied: set[str]) -> tuple[dict[str, str], set[str]]:
    """The environment with the env file's values in force (keys it no longer sets are dropped),
    and the keys it set. Raises ConfigError, leaving nothing changed, if the result is invalid."""
    env = {k: v for k, v in environ.items() if k not in applied}
    path = env.get("TFWSGI_ENV_FILE", "")
    values = read_env_file(path) if path else {}
    env.update(values)
    from_env(env)  # every value must parse before any is used
    return env, set(values)


def markdown_table() -> str:
    """The README's settings table, generated from the declarations above."""
    lines = ["| environment variable | type | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        if s.type is str:
            default = repr(s.default)
        else:
            default = str(s.default).lower() if s.type is bool else str(s.default)
        lines.append(f"| `{s.env}` | {s.type.__name__} | `{default}` | {s.doc} |")
    return "\n".join(lines)


TABLE_START = "<!-- settings-table:start -->"
TABLE_END = "<!-- settings-table:end -->"


def update_readme(path: str) -> None:
    """Rewrite the table between the README's settings-table markers."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    start = text.index(TABLE_START) + len(TABLE_START)
    end = text.index(TABLE_END)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text[:start] + "\n" + markdown_table() + "\n" + text[end:])


if __name__ == "__main__":
    if sys.argv[1:2] == ["--update"]:
        update_readme(sys.argv[2])
    else:
        sys.stdout.write(markdown_table() + "\n")
