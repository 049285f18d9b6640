"""Every tfwsgi setting, declared once: name, type, default, environment variable and doc.

Names follow TensorFlow Serving's flags; each is read from ``TFWSGI_<FLAG IN UPPER CASE>``.
``Settings`` is a frozen dataclass with one typed field per setting, so mypy rejects a misspelled
setting (``settings.max_request_bytez``) or one used as the wrong type (tests/typecheck/).
``python -m tfwsgi.settings`` prints the Markdown table that docs/settings.md carries.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .errors import ConfigError

ENV_PREFIX = "TFWSGI_"
T = TypeVar("T")


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def _non_negative(value: int) -> None:
    if value < 0:
        raise ValueError(f"must be >= 0, got {value}")


def _port(value: int) -> None:
    if not 0 < value < 65536:
        raise ValueError(f"must be a TCP port (1-65535), got {value}")


def _port_or_off(value: int) -> None:
    if not 0 <= value < 65536:
        raise ValueError(f"must be a TCP port (1-65535) or 0 (off), got {value}")


def _one_of(*choices: str) -> Callable[[str], None]:
    def check(value: str) -> None:
        if value not in choices:
            raise ValueError(f"must be {' or '.join(choices)}, got {value!r}")
    return check


def _positive(value: int) -> None:
    if value <= 0:
        raise ValueError(f"must be > 0, got {value}")


def _tags(value: str) -> None:
    if not names(value):
        raise ValueError("must name at least one tag")


def _module_names(value: str) -> None:
    for name in names(value):
        if not all(part.isidentifier() for part in name.split(".")):
            raise ValueError(f"{name!r} is not a Python module name")


def names(value: str) -> tuple[str, ...]:
    """The items of a comma-separated setting (``saved_model_tags``, ``custom_op_modules``),
    stripped, empty ones left out."""
    return tuple(item.strip() for item in value.split(",") if item.strip())


INT32_MAX = 2**31 - 1
_ATOI = re.compile(r"[ \t\n\v\f\r]*[+-]?[0-9]+[ \t\n\v\f\r]*\Z")  # absl::SimpleAtoi's shape


def channel_arguments(value: str) -> tuple[tuple[str, int | str], ...]:
    """``grpc_channel_arguments`` as TF Serving's server.cc reads them (``parseGrpcChannelArgs``):
    comma-separated ``key=value``, a value that is an int32 (``absl::SimpleAtoi``: decimal, sign
    and surrounding white space allowed) passed as an int, any other as a string. Where
    server.cc would crash (an item without ``=``) or silently drop text (``a=b=c``), ValueError."""
    out: list[tuple[str, int | str]] = []
    if not value:
        return ()
    for item in value.split(","):
        parts = item.split("=")
        if len(parts) != 2 or not parts[0]:
            raise ValueError(f"expected comma-separated key=value, got {item!r}")
        key, text = parts
        if key == "grpc.so_reuseport":
            raise ValueError("grpc.so_reuseport cannot be changed: every worker binds the port")
        number = int(text) if _ATOI.match(text) else None
        out.append((key, number if number is not None and -INT32_MAX - 1 <= number <= INT32_MAX
                    else text))
    return tuple(out)


def _channel_arguments(value: str) -> None:
    channel_arguments(value)


def setting(default: T, doc: str, validate: Callable[[T], None] | None = None, secret: bool = False) -> T:
    """Declare one setting as a ``Settings`` field: the field's name is the TF Serving flag, its
    annotation the type, ``TFWSGI_<NAME>`` the environment variable; ``validate`` raises
    ValueError for a value of the right type that cannot be used; a ``secret`` stays out of repr."""
    return field(default=default, repr=not secret, metadata={"doc": doc, "validate": validate})


@dataclass(frozen=True)
class Settings:
    """The values in force, one typed, read-only attribute per setting."""

    env_file: str = setting("",
            "A file of `TFWSGI_*=value` lines applied at start and again on every SIGHUP, so a "
            "reload picks up changed settings (the environment of a running master cannot change).")
    model_name: str = setting("default",
            "Name of the model served from `model_base_path` (ignored with `model_config_file`).")
    model_base_path: str = setting("",
            "Directory holding the model's numeric version subdirectories "
            "(`<base>/<version>/saved_model.pb`).")
    model_config_file: str = setting("",
            "TF Serving `ModelServerConfig` text proto (`model_config_list { config { … } }`); "
            "overrides `model_name`/`model_base_path`.")
    saved_model_tags: str = setting("serve",
            "Comma-separated tags of the meta graph loaded from every SavedModel (TF Serving's "
            "`--saved_model_tags`); a version with no meta graph of exactly these tags fails to "
            "load, with TF Serving's message.", _tags)
    custom_op_modules: str = setting("",
            "Comma-separated Python modules each worker imports before it loads a model, for "
            "models with custom ops (`tensorflow_text` registers its ops on import; TF Serving "
            "needs a custom build for them). Never imported in gunicorn's master; a module that "
            "fails to import stops the worker's start.", _module_names)
    tensorflow_intra_op_parallelism: int = setting(0,
            "Threads one op may use in each worker. 0 fits it to the machine: "
            "cores ÷ workers, at least 1 (TF's own 0 would give every worker every core).",
            _non_negative)
    tensorflow_inter_op_parallelism: int = setting(0,
            "Ops run in parallel in each worker. 0 fits it to the machine: 1, which runs each "
            "model's graph in the thread that calls it (no hand-off to a pool thread), one run "
            "at a time in a worker, as runs take turns on TF Serving's one inter-op thread.",
            _non_negative)
    cpu_affinity: bool = setting(True,
            "Pin each worker to its share of the cores this server may use (split evenly over "
            "the workers, as the TF threads are; with more workers than cores, one core each, "
            "balanced): its threads stay on one core, where the GIL changes hands cheaply. "
            "Turn it off when other busy processes share the cores.")
    sched_batch: bool = setting(True,
            "Run each worker's request threads under Linux's SCHED_BATCH policy (its event "
            "loop, batch thread and TensorFlow threads stay normal): a request thread that wakes "
            "up does not preempt the running one, often the one holding the GIL "
            "(docs/architecture.md has the figures). With tfwsgi's worker class only.")
    file_system_poll_wait_seconds: int = setting(1,
            "How often each worker looks for new, removed or changed versions under the base "
            "paths; 0 looks once, at start.", _non_negative)
    model_config_file_poll_wait_seconds: int = setting(0,
            "How often each worker re-reads `model_config_file` (models added or removed, "
            "policies, labels); 0 reads it once.", _non_negative)
    max_num_load_retries: int = setting(5,
            "Retries of a version that failed to load (it is reported, never served).",
            _non_negative)
    load_retry_interval_micros: int = setting(60_000_000,
            "Time between those retries, in microseconds.", _non_negative)
    enable_model_warmup: bool = setting(True,
            "Replay `assets.extra/tf_serving_warmup_requests` before a version is AVAILABLE.")
    num_request_iterations_for_warmup: int = setting(1,
            "How many times each warmup record is replayed.", _positive)
    enable_batching: bool = setting(False,
            "Merge concurrent requests on the same signature into one run (TF Serving's "
            "`--enable_batching`; each worker's request threads are the concurrent requests).")
    batching_parameters_file: str = setting("",
            "TF Serving's batching parameters text file (`max_batch_size { value: 32 }`, "
            "`batch_timeout_micros`, `max_enqueued_batches`, `num_batch_threads`, "
            "`allowed_batch_sizes`); empty: TF Serving's defaults.")
    preload_tensorflow: bool = setting(True,
            "Import (never run) TensorFlow in gunicorn's master before it forks, so every worker "
            "shares its code pages instead of loading its own copy.")
    memory_allocator: str = setting("jemalloc",
            "`jemalloc`: gunicorn's master starts itself again with jemalloc preloaded (when "
            "libjemalloc.so.2 is installed) and TensorFlow allocates through it, so the memory of "
            "an unloaded model version goes back to the system; `system`: glibc's malloc, and "
            "TensorFlow keeps the large blocks it once used. Read at start.",
            _one_of("jemalloc", "system"))
    port: int = setting(8500,
            "Port of TF Serving's gRPC API (PredictionService, ModelService), served by every "
            "worker on 0.0.0.0 with SO_REUSEPORT (the kernel spreads connections over the "
            "workers); 0 turns gRPC off.", _port_or_off)
    grpc_max_threads: int = setting(0,
            "Threads of each worker's gRPC server (TF Serving's `--grpc_max_threads`): calls "
            "beyond them wait for one. 0: TF Serving's default, 4 × the cores this worker may use.",
            _non_negative)
    grpc_channel_arguments: str = setting("",
            "gRPC server arguments, comma-separated `key=value` as TF Serving reads them (an "
            "int32 value is passed as an int, others as strings), e.g. "
            "`grpc.max_receive_message_length=4194304,grpc.max_connection_age_ms=60000`; they "
            "override tfwsgi's own (message limits of 2^31-1 bytes, as TF Serving's; "
            "`grpc.so_reuseport` cannot be changed).", _channel_arguments)
    enable_grpc_healthcheck_service: bool = setting(False,
            "Serve gRPC's standard health service (`grpc.health.v1.Health`) on every worker: "
            "`\"\"`, `ModelService` and `PredictionService` are SERVING once this worker has a "
            "version of every configured model available (as `/v2/health/ready`), each model's "
            "name while it has one; NOT_SERVING while loading, after an unload and once the "
            "worker stops. Off by default, as in TF Serving.")
    enable_serialization_as_tensor_content: bool = setting(False,
            "gRPC Predict answers carry their tensors in `tensor_content` (raw bytes) instead of "
            "the typed value fields (`float_val` …), as TF Serving's flag does.")
    grpc_max_connection_age_ms: int = setting(10_000,
            "A gRPC connection is sent a graceful GOAWAY after about this long (±10%) and its "
            "client reconnects, which the kernel may give to any worker: how connections spread "
            "again over the workers after a restart, and how a stopping worker's clients move to "
            "the others without a failed call (it waits for them up to gunicorn's "
            "graceful_timeout, so keep this below it); 0: never (grpc's default).", _non_negative)
    rest_api_port: int = setting(8501,
            "Port of the REST API when gunicorn's `-b/--bind` is not given "
            "(binds 0.0.0.0).", _port)
    enable_signature_method_name_check: bool = setting(False,
            "Refuse a predict on a signature whose method name is not TF Serving's predict, "
            "classify or regress (500 INTERNAL, TF Serving's message); off by default, as in TF Serving.")
    rest_api_enable_cors_support: bool = setting(False,
            "Answer CORS preflight requests and add `Access-Control-Allow-Origin: *`.")
    rest_api_timeout_in_ms: int = setting(30_000,
            "Deadline of each REST request, from the moment it is all received: one still "
            "unanswered then gets DEADLINE_EXCEEDED (504, JSON error) and one whose deadline passed "
            "while it waited is dropped before it runs (TF Serving's flag); 0: no deadline.",
            _non_negative)
    max_waiting_requests: int = setting(0,
            "Requests that may wait in one worker for a request thread; past it a request gets "
            "503 with `Retry-After` at once. 0 derives it: what the worker serves within one "
            "deadline at the rate it measures (requests that would wait longer could only time "
            "out), never fewer than its threads.", _non_negative)
    workers: int = setting(0,
            "gunicorn worker processes when `-w` is not given; 0 means one per core.",
            _non_negative)
    max_request_bytes: int = setting(64 * 1024 * 1024,
            "Largest accepted request body; larger bodies get 413 with a JSON error.", _positive)
    cache_enabled: bool = setting(True,
            "Cache predictions (memcached when `memcached` is set, else an LRU in each worker).")
    cache_ttl_seconds: int = setting(3600,
            "How long a cached prediction lives; 0 keeps it until evicted.", _non_negative)
    cache_model_ttl: str = setting("",
            "Per-model overrides of the TTL, `model=seconds` or `model=off`, comma-separated.")
    cache_key_prefix: str = setting("tfwsgi:",
            "Prefix of every cache key, to keep deployments sharing a memcached apart.")
    cache_local_max_bytes: int = setting(64 * 1024 * 1024,
            "Size of each worker's in-process LRU (used when no memcached is set).", _positive)
    cache_lease_ms: int = setting(1000,
            "With memcached: on a miss, one request anywhere computes while identical ones wait "
            "up to this long for its answer (a memcached `add` lease); 0 turns it off.",
            _non_negative)
    cache_hmac_key: str = setting("",
            "A secret that signs every cached value (HMAC-SHA256 over its key and bytes): a value "
            "without a valid signature is a miss and is recomputed, so whoever can write to "
            "memcached but lacks the secret cannot plant answers. Every instance sharing a "
            "memcached needs the same one. Empty: values are not signed.", secret=True)
    cache_hmac_key_file: str = setting("",
            "A file holding that secret (surrounding white space ignored), which keeps it out of "
            "the environment; if both are set they must be equal, or the server does not start.")
    memcached: str = setting("",
            "Memcached servers shared by all workers and hosts, `host:port[,host:port…]` "
            "(keys spread by rendezvous hashing).")
    memcached_connect_timeout_ms: int = setting(100,
            "Connect timeout for memcached; past it the request is served as a miss.", _positive)
    memcached_timeout_ms: int = setting(100,
            "Read/write timeout for memcached; past it the request is served as a miss.", _positive)
    memcached_retry_attempts: int = setting(2,
            "Failures before a memcached server is set aside (its keys go to the others).", _positive)
    memcached_retry_timeout_seconds: int = setting(1,
            "After a failure, how long a server is treated as a miss before it is tried again.",
            _non_negative)
    memcached_dead_timeout_seconds: int = setting(5,
            "How long a server set aside stays out before it is tried again.", _non_negative)
    memcached_max_item_bytes: int = setting(1024 * 1024,
            "memcached's item size limit (`-I`); larger predictions are served but not cached.",
            _positive)
    monitoring_config_file: str = setting("",
            "TF Serving's monitoring config (`prometheus_config { enable: true path: \"/monitoring/"
            "prometheus/metrics\" }`): where Prometheus metrics are served, besides `/metrics`, or "
            "`enable: false` for none. Empty: both paths on (TF Serving turns them off by default).")
    log_format: str = setting("text",
            "gunicorn's access and error logs, and tfwsgi's: `text` (gunicorn's formats) or `json` "
            "(one JSON object a line). Read at start; a SIGHUP does not change it.",
            _one_of("text", "json"))
    prometheus_multiproc_dir: str = setting("",
            "Directory for the workers' metric files, wiped at start; empty: a fresh temporary "
            "directory (or `PROMETHEUS_MULTIPROC_DIR` if set).")

    def replace(self, **changes: Any) -> Settings:
        """A copy with ``changes`` applied; an unknown name or a value of the wrong type is a
        ConfigError (``dataclasses.replace`` does the same, checked by mypy instead)."""
        for name, value in changes.items():
            s = _BY_NAME.get(name)
            if s is None:
                raise ConfigError(f"unknown setting {name!r}")
            if type(value) is not s.type:
                raise ConfigError(f"setting {name!r} is {s.type.__name__}, got {value!r}")
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class Setting:
    """One setting as declared on ``Settings``: its TF Serving flag name, type, default, doc and
    optional validator (what the environment parser and the settings table read)."""

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


def _declarations() -> tuple[Setting, ...]:
    types = typing.get_type_hints(Settings)
    return tuple(Setting(f.name, types[f.name], f.default, f.metadata["doc"], f.metadata["validate"])
                 for f in dataclasses.fields(Settings))


SETTINGS: tuple[Setting, ...] = _declarations()
_BY_NAME = {s.name: s for s in SETTINGS}


def from_env(environ: Mapping[str, str] | None = None) -> Settings:
    """Read every setting from ``TFWSGI_*`` variables, falling back to the defaults."""
    env = os.environ if environ is None else environ
    values = {s.name: s.parse(env[s.env]) for s in SETTINGS if s.env in env}
    return Settings(**values)


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
    """The settings table (docs/settings.md), generated from the declarations above."""
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
    """Rewrite the table between the settings-table markers of a Markdown file (docs/settings.md)."""
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
