"""``ModelService.HandleReloadConfigRequest`` in every worker of one gunicorn master.

A call lands in one worker, but each worker has its own manager. The worker that takes it checks
the new ``ModelServerConfig`` (TF Serving's checks and messages), writes it whole into a
directory that the master made before the first fork, under the next *generation* number, and
waits, within the call's deadline, until every live worker has recorded that it applied that
generation (or a later one) or failed to. Each worker polls the directory's listing (a few
microseconds, every ``POLL_SECONDS``), applies a newer generation through its source (models
left out unload, added ones load, availability first, as a changed config file does), and
records the outcome. A worker started later (max_requests, a crash, a SIGHUP) starts from the
latest generation, not from the config file. TF-free and grpc-free: the master imports it.

The directory (``$_TFWSGI_RELOAD_DIR``)::

    config-00000007.pbtxt   a reload's ModelServerConfig, text format (written to a dot file, renamed)
    lock                    flock'ed while a generation number is taken
    workers/<pid>.json      what a worker applied: {"generation": g, "code": c, "message": m}
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import CODE_NAMES, Code, ConfigError, DeadlineExceeded, InvalidArgument, NotFound, TFWSGIError
from .source import ModelConfig, aspired_versions, parse_model_config, scan_versions

if TYPE_CHECKING:
    from .manager import ModelManager

log = logging.getLogger("tfwsgi")

RELOAD_DIR_ENV = "_TFWSGI_RELOAD_DIR"  # set by the master (hooks.on_starting); not a setting
POLL_SECONDS = 0.05  # how often a worker looks for a new generation
WAIT_SECONDS = 600.0  # how long a call without a deadline waits for every worker
KEEP = 8  # config files kept (a worker reads only the newest)
STARTING = -1  # the generation a worker records while it loads its first models
_CONFIG = re.compile(r"config-(\d+)\.pbtxt")

# tensorflow_serving/model_servers/model_service_impl.cc, HandleReloadConfigRequest.
UNSUPPORTED = ("ServerModelConfig type not supported by HandleReloadConfigRequest. "
               "Only ModelConfigList is currently supported")


@dataclass(frozen=True)
class Applied:
    """What one worker did with a generation: OK, or the error it met."""

    generation: int
    code: int = Code.OK
    message: str = ""


# ---------------------------------------------------------------------- checking a config


def parse(text: str) -> list[ModelConfig]:
    """A ReloadConfigRequest's config (text format) as model configs, checked as TF Serving's
    ``ServerCore::ReloadConfig`` checks it (``ValidateModelConfigList``), with its messages."""
    from . import textformat

    msg = textformat.parse(textformat.model_server_config(), text, "ReloadConfigRequest")
    if msg.WhichOneof("config") != "model_config_list":
        raise InvalidArgument(UNSUPPORTED)
    names: set[str] = set()
    for c in msg.model_config_list.config:
        if c.name in names:
            raise InvalidArgument(f"Illegal to list model {c.name} multiple times in config list")
        names.add(c.name)
        if not os.path.isabs(c.base_path) and "://" not in c.base_path:
            raise InvalidArgument(f"Expected model {c.name} to have an absolute path or URI; "
                                  f"got base_path()={c.base_path}")
    try:
        return parse_model_config(text, origin="ReloadConfigRequest")
    except ConfigError as exc:
        raise InvalidArgument(str(exc)) from None


def check_versions(configs: Sequence[ModelConfig]) -> None:
    """Every model has a version to load. TF Serving, by default, waits for ever for a model whose
    base path is missing or empty (tensorflow/serving#1565); we answer at once with the errors
    its ``servable_versions_always_present`` option gives (file_system_storage_path_source.cc:
    ``PollFileSystemForServable`` and ``FailIfZeroVersions``), and change nothing."""
    for c in configs:
        if not os.path.isdir(c.base_path):
            raise InvalidArgument(f"Could not find base path {c.base_path} for servable {c.name} "
                                  f"with error NOT_FOUND: {c.base_path}; No such file or directory")
        if not aspired_versions(c, scan_versions(c.base_path)).versions:
            raise NotFound(f"Unable to find a numerical version path for servable {c.name} "
                           f"at: {c.base_path}")


def outcome(manager: ModelManager, before: Collection[str], configs: Sequence[ModelConfig]) -> Applied:
    """Did every model new in ``configs`` (not in ``before``) become available? TF Serving's
    ``ServerCore::WaitUntilModelsAvailable`` error (UNKNOWN) names those that did not."""
    from .manager import AVAILABLE

    failed: list[str] = []
    for c in configs:
        if c.name in before:
            continue
        try:
            states = manager.status(c.name)
        except TFWSGIError:
            states = []
        if any(s.state == AVAILABLE for s in states):
            continue
        broken = [s for s in states if s.error_code]
        if broken:
            s = broken[0]
            failed.append(f"{{{{name: {c.name} version: {s.version}}} due to error: "
                          f"{CODE_NAMES.get(s.error_code, 'UNKNOWN')}: {s.error_message}}}, ")
        else:
            failed.append(f"{{{{name: {c.name} version: ?}}}}, ")
    if not failed:
        return Applied(0)
    return Applied(0, Code.UNKNOWN,
                   f"{len(failed)} model(s) did not become available: {{{''.join(failed)}}}")


# ---------------------------------------------------------------------- the directory


def prepare_dir(environ: dict[str, str] | os._Environ[str] = os.environ) -> str:
    """Master, before the first fork: a fresh directory for this master's reloads, named in the
    environment its workers inherit."""
    path = tempfile.mkdtemp(prefix="tfwsgi-reloads-")
    os.mkdir(os.path.join(path, "workers"))
    environ[RELOAD_DIR_ENV] = path
    return path


def remove_dir(environ: Mapping[str, str] = os.environ) -> None:
    """Master, leaving: its reload directory goes."""
    path = environ.get(RELOAD_DIR_ENV)
    if path and os.path.basename(path).startswith("tfwsgi-reloads-"):
        shutil.rmtree(path, ignore_errors=True)


def _write(path: str, text: str) -> None:
    """``path`` written whole: readers see the old file or the new one, never a part."""
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def generations(directory: str) -> list[int]:
    """The generations whose config is in ``directory``, oldest first."""
    found = (_CONFIG.fullmatch(name) for name in os.listdir(directory))
    return sorted(int(m.group(1)) for m in found if m)


def _config_path(directory: str, generation: int) -> str:
    return os.path.join(directory, f"config-{generation:08d}.pbtxt")


def publish(directory: str, text: str) -> int:
    """Write a new config under the next generation number (one writer at a time); return it."""
    with open(os.path.join(directory, "lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        known = generations(directory)
        generation = (known[-1] if known else 0) + 1
        _write(_config_path(directory, generation), text)
        for old in known[:max(0, len(known) - (KEEP - 1))]:  # KEEP files with the new one
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_config_path(directory, old))
    return generation


def latest(directory: str) -> tuple[int, str] | None:
    """The newest generation and its config text, if any reload was published."""
    for generation in reversed(generations(directory)):
        try:
            with open(_config_path(directory, generation), encoding="utf-8") as f:
                return generation, f.read()
        except FileNotFoundError:  # pruned meanwhile: a newer one exists
            continue
    return None


def _status_path(directory: str, pid: int) -> str:
    return os.path.join(directory, "workers", f"{pid}.json")


def record(directory: str, pid: int, applied: Applied) -> None:
    _write(_status_path(directory, pid), json.dumps(
        {"generation": applied.generation, "code": int(applied.code), "message": applied.message}))


def forget(directory: str | None, pid: int) -> None:
    """A worker left: nobody waits for it any more."""
    if directory:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_status_path(directory, pid))


def statuses(directory: str) -> dict[int, Applied]:
    """What each registered worker last recorded."""
    found: dict[int, Applied] = {}
    workers = os.path.join(directory, "workers")
    for name in os.listdir(workers):
        if not name.endswith(".json") or not name[:-5].isdigit():
            continue
        try:
            with open(os.path.join(workers, name), encoding="utf-8") as f:
                data = json.load(f)
        except (FileNotFoundError, ValueError):
            continue  # gone meanwhile
        found[int(name[:-5])] = Applied(int(data["generation"]), int(data["code"]), str(data["message"]))
    return found


def alive(pid: int) -> bool:
    """Is ``pid`` a running process (not gone, not a zombie its master has yet to reap)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def wait(directory: str, generation: int, deadline: float | None) -> None:
    """Return once every live worker has applied ``generation`` or a later one; raise the error a
    worker met applying it, or DEADLINE_EXCEEDED (the config stays published: workers apply it)."""
    until = deadline if deadline is not None else time.monotonic() + WAIT_SECONDS
    while True:
        pending: list[int] = []
        failure: Applied | None = None
        for pid, applied in sorted(statuses(directory).items()):
            if not alive(pid):
                continue
            if applied.generation < generation:
                pending.append(pid)
            elif applied.generation == generation and applied.code and failure is None:
                failure = applied
        if not pending:
            if failure is not None:
                raise TFWSGIError(failure.message, failure.code)
            return
        if time.monotonic() >= until:
            raise DeadlineExceeded(f"The model config was not applied by every worker in time "
                                   f"(waiting for pids {', '.join(map(str, pending))}); "
                                   "they apply it once their loads finish")
        time.sleep(0.02)


# ---------------------------------------------------------------------- a worker's side


@dataclass(frozen=True)
class Start:
    """Where a worker starts: the latest reload's generation and configs, or the config file's."""

    generation: int = 0
    configs: list[ModelConfig] | None = None


def begin(directory: str | None) -> Start:
    """Worker, before its manager is built: register (so a reload waits for it), then read the
    latest generation (so one published meanwhile is either read here or seen by the watcher)."""
    if not directory:
        return Start()
    record(directory, os.getpid(), Applied(STARTING))
    found = latest(directory)
    if found is None:
        return Start()
    try:
        return Start(found[0], parse(found[1]))
    except TFWSGIError as exc:  # pragma: no cover - published configs were checked
        log.error("tfwsgi: reloaded model config %d unusable, starting from the config file: %s",
                  found[0], exc.message)
        return Start(found[0])


class Reloads:
    """One worker's side of HandleReloadConfigRequest: take a call (``reload``), and apply what
    any worker published (a polling thread). Without a directory (no gunicorn master: one
    process) a call is applied here directly."""

    def __init__(self, manager: ModelManager, directory: str | None = None,
                 start: Start | None = None) -> None:
        self.manager = manager
        self.directory = directory or None
        self.applied = (start or Start()).generation
        self._local = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def reload(self, text: str, deadline: float | None = None) -> None:
        """Apply a ReloadConfigRequest's config (text format) in every worker; raise its error."""
        configs = parse(text)
        check_versions(configs)
        if self.directory is None:
            with self._local:
                result = self._apply(configs)
            if result.code:
                raise TFWSGIError(result.message, result.code)
            return
        generation = publish(self.directory, text)
        log.info("tfwsgi: pid %d published model config %d (%d models)", os.getpid(), generation,
                 len(configs))
        wait(self.directory, generation, deadline)

    def _apply(self, configs: Sequence[ModelConfig]) -> Applied:
        before = {c.name for c in self.manager.source.configs}
        self.manager.source.set_configs(configs)
        return outcome(self.manager, before, configs)

    def started(self) -> None:
        """The first models are loaded: record the generation they came from, and watch."""
        if self.directory is None:
            return
        configs = self.manager.source.configs
        result = outcome(self.manager, (), configs)
        record(self.directory, os.getpid(), Applied(self.applied, result.code, result.message))
        self._thread = threading.Thread(target=self._watch, name="tfwsgi-reload-watcher", daemon=True)
        self._thread.start()

    def poll(self) -> None:
        """Apply the latest generation if it is newer than this worker's, and record how it went."""
        assert self.directory is not None
        found = latest(self.directory)
        if found is None or found[0] <= self.applied:
            return
        generation, text = found
        try:
            result = self._apply(parse(text))
        except Exception as exc:  # recorded for the caller; the worker goes on
            log.exception("tfwsgi: pid %d could not apply model config %d", os.getpid(), generation)
            code = exc.code if isinstance(exc, TFWSGIError) else Code.UNKNOWN
            message = exc.message if isinstance(exc, TFWSGIError) else f"{type(exc).__name__}: {exc}"
            result = Applied(0, code, message)
        self.applied = generation
        record(self.directory, os.getpid(), Applied(generation, result.code, result.message))
        log.info("tfwsgi: pid %d applied model config %d%s", os.getpid(), generation,
                 f" with error: {result.message}" if result.code else "")

    def _watch(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            try:
                self.poll()
            except OSError as exc:  # the directory went (the master is leaving)
                log.warning("tfwsgi: reload directory unreadable: %s", exc)
                self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
