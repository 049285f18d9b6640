"""``tfwsgi-model-server`` (also ``python -m tfwsgi``): tensorflow_model_server's command line.

It takes TF Serving's flags, with their names, their ``--flag=value`` syntax and their defaults
(tensorflow_serving/model_servers/main.cc and server.h ``Server::Options``), turns them into the
``TFWSGI_*`` variables they stand for, and then *becomes* ``gunicorn -c gunicorn_conf.py
tfwsgi:app`` (``os.execve``), the primary way to run tfwsgi. Exec rather than running gunicorn's
application class in this process: the master is then exactly that command, with this command's
PID (Docker's and systemd's signals reach gunicorn itself), nothing of this module stays in it, and
a SIGHUP reload re-reads the same environment and config file as under plain gunicorn.

Every tfwsgi setting is a flag of the same name (``--enable_batching`` is
``TFWSGI_ENABLE_BATCHING``; ``--port`` is ``TFWSGI_PORT``, gRPC's); a flag beats the environment.
Besides those: ``--tensorflow_session_parallelism`` and ``--version``. A tensorflow_model_server
flag that tfwsgi does not support, or any other argument, is refused with one line naming it.
With no model flag at all, the model is found as TF Serving's Docker image finds it:
``$MODEL_BASE_PATH/$MODEL_NAME`` (``/models/model``).

Parsing is pure (``parse``); only ``main`` prints, reads the process environment and execs.
"""

from __future__ import annotations

import os
import re
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ConfigError
from .settings import SETTINGS, Setting, from_env, with_env_file
from .source import model_configs

PROG = "tfwsgi-model-server"
USAGE_EXIT = 2

# TF Serving's Docker image (tensorflow_serving/tools/docker/Dockerfile):
#   ENV MODEL_BASE_PATH=/models
#   ENV MODEL_NAME=model
#   tensorflow_model_server --port=8500 --rest_api_port=8501 \
#     --model_name=${MODEL_NAME} --model_base_path=${MODEL_BASE_PATH}/${MODEL_NAME} "$@"
DOCKER_MODEL_NAME = ("MODEL_NAME", "model")
DOCKER_MODEL_BASE_PATH = ("MODEL_BASE_PATH", "/models")
MODEL_FLAGS = ("model_name", "model_base_path", "model_config_file")


@dataclass(frozen=True)
class Flag:
    """A tensorflow_model_server flag that is not a tfwsgi setting, handled by this module."""

    name: str
    type: type
    default: Any  # TF Serving's
    doc: str


EXTRA_FLAGS: dict[str, Flag] = {f.name: f for f in (
    Flag("tensorflow_session_parallelism", int, 0,
         "Sets both `tensorflow_intra_op_parallelism` and `tensorflow_inter_op_parallelism` when "
         "neither is set (TF Serving's rule; setting all three is refused, as there); 0: auto."),
    Flag("version", bool, False, "Print the versions and exit."),
)}

# tensorflow_model_server's other flags (main.cc), each refused with the reason.
UNSUPPORTED_FLAGS: dict[str, str] = {
    "grpc_socket_path": "gRPC on a UNIX socket is not implemented: every worker would bind the "
                        "one path, and the kernel spreads connections over workers only for "
                        "TCP (SO_REUSEPORT)",
    "use_alts_credentials": "gRPC with ALTS credentials is not implemented (terminate them in "
                            "front of tfwsgi)",
    "ssl_config_file": "gRPC with TLS is not implemented (terminate it in front of tfwsgi)",
    "rest_api_num_threads": "each gunicorn worker has its own request threads; size the server "
                            "with --workers",
    "allow_version_labels_for_unavailable_models": "not implemented",
    "enable_per_model_batching_parameters": "not implemented; --batching_parameters_file "
                                            "applies to every model",
    "num_load_threads": "each worker loads its versions one at a time",
    "num_unload_threads": "each worker unloads its versions one at a time",
    "flush_filesystem_caches": "not implemented",
    "tensorflow_session_config_file": "not implemented; use --tensorflow_intra_op_parallelism "
                                      "and --tensorflow_inter_op_parallelism",
    "platform_config_file": "tfwsgi serves only the TensorFlow platform",
    "per_process_gpu_memory_fraction": "tfwsgi does not configure GPUs",
    "remove_unused_fields_from_bundle_metagraph": "not implemented",
    "prefer_tflite_model": "TensorFlow Lite models are not served",
    "num_tflite_pools": "TensorFlow Lite models are not served",
    "num_tflite_interpreters_per_pool": "TensorFlow Lite models are not served",
    "xla_cpu_compilation_enabled": "not implemented",
    "xla_gpu_compilation_enabled": "not implemented",
    "enable_profiler": "not implemented",
    "thread_pool_factory_config_file": "not implemented",
    "mixed_precision": "not implemented",
    "skip_initialize_tpu": "tfwsgi does not run on TPUs",
}

_SETTINGS = {s.name: s for s in SETTINGS}
_INT = re.compile(r"-?[0-9]+\Z")  # TF's flags read ints with sscanf("%d%c"): digits only


class UsageError(Exception):
    """A command line this command refuses; its message is the one line printed."""


@dataclass(frozen=True)
class Invocation:
    """What a command line asks for: ``serve`` with ``env`` (the whole environment gunicorn gets),
    ``help`` or ``version``; ``notes`` are the lines to log before serving."""

    action: str
    env: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()


def _value(name: str, kind: type, sep: str, text: str) -> Any:
    """One flag's value, read as TF's command_line_flags.cc reads it: ``--flag=value``;
    a bool also as a bare ``--flag``, and only ``true`` or ``false``."""
    if kind is bool:
        if not sep:
            return True
        if text in ("true", "false"):
            return text == "true"
        raise UsageError(f"--{name}={text}: expected true or false")
    if not sep:
        raise UsageError(f"--{name} needs a value: --{name}=…")
    if kind is int:
        if not _INT.match(text):
            raise UsageError(f"--{name}={text}: expected an integer")
        return int(text)
    return text


def _env_text(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def read_flags(argv: Sequence[str]) -> dict[str, Any]:
    """The flags given, typed, the last of a repeated flag winning (as in TF's parser).
    Raises UsageError naming the first argument that is not a flag tfwsgi takes."""
    given: dict[str, Any] = {}
    for arg in argv:
        if arg in ("-h", "--help", "--helpfull"):
            given["help"] = True
            continue
        if not arg.startswith("--") or arg == "--":
            raise UsageError(f"unknown argument {arg!r}: flags are --name=value (see --help)")
        name, sep, text = arg[2:].partition("=")
        if name in UNSUPPORTED_FLAGS:
            raise UsageError(f"--{name} is a tensorflow_model_server flag tfwsgi does not "
                             f"support: {UNSUPPORTED_FLAGS[name]}")
        setting: Setting | Flag | None = _SETTINGS.get(name) or EXTRA_FLAGS.get(name)
        if setting is None:
            raise UsageError(f"unknown flag --{name} (see --help)")
        value = _value(name, setting.type, sep, text)
        if name == "num_request_iterations_for_warmup" and value <= 0:
            # server.cc reads it "only if > 0": 0 is TF Serving's default, one iteration.
            given.pop(name, None)
            continue
        if name == "rest_api_port" and value == 0:
            raise UsageError("--rest_api_port=0 turns TF Serving's REST API off, and the REST API "
                             "is what tfwsgi serves")
        if isinstance(setting, Setting) and setting.validate is not None:
            try:
                setting.validate(value)
            except ValueError as exc:
                raise UsageError(f"--{name}={text}: {exc}") from None
        given[name] = value
    return given


def parse(argv: Sequence[str], environ: Mapping[str, str]) -> Invocation:
    """Pure: the invocation ``argv`` (without the program name) asks for, in ``environ``."""
    given = read_flags(argv)
    if given.pop("help", False):
        return Invocation("help")
    if given.pop("version", False):
        return Invocation("version")
    try:
        configured = with_env_file(environ, set())[0]  # what gunicorn_conf.py will apply too
        current = from_env(configured)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    _session_parallelism(given, current.tensorflow_intra_op_parallelism,
                         current.tensorflow_inter_op_parallelism)
    notes: list[str] = []
    if not any(f in given for f in MODEL_FLAGS) and not any(
            _SETTINGS[f].env in configured for f in MODEL_FLAGS):
        name = environ.get(DOCKER_MODEL_NAME[0]) or DOCKER_MODEL_NAME[1]
        base = environ.get(DOCKER_MODEL_BASE_PATH[0]) or DOCKER_MODEL_BASE_PATH[1]
        given["model_name"], given["model_base_path"] = name, f"{base}/{name}"
        notes.append(f"no model flags: serving model {name!r} from {base}/{name} "
                     "($MODEL_BASE_PATH/$MODEL_NAME, as TF Serving's Docker image does)")
    env = dict(environ)
    env.update({_SETTINGS[n].env: _env_text(v) for n, v in given.items()})
    try:
        settings = from_env(with_env_file(env, set())[0])
        model_configs(settings)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    return Invocation("serve", env, tuple(notes))


def _session_parallelism(given: dict[str, Any], intra_env: int, inter_env: int) -> None:
    """server.cc: intra and inter, if either is set; else --tensorflow_session_parallelism for
    both; all three set is an error (worded as there, with the flags' names)."""
    session = given.pop("tensorflow_session_parallelism", 0)
    if session <= 0:
        return
    intra = given.get("tensorflow_intra_op_parallelism", intra_env)
    inter = given.get("tensorflow_inter_op_parallelism", inter_env)
    if intra > 0 and inter > 0:
        raise UsageError("Either configure --tensorflow_session_parallelism or "
                         "(--tensorflow_intra_op_parallelism, --tensorflow_inter_op_parallelism) "
                         "separately. You cannot configure all.")
    if intra <= 0 and inter <= 0:
        given["tensorflow_intra_op_parallelism"] = given["tensorflow_inter_op_parallelism"] = session


def usage() -> str:
    """``--help``: every flag taken, with its default, then the tensorflow_model_server flags
    refused."""
    lines = [f"usage: {PROG} --model_base_path=PATH [--model_name=NAME] [--flag=value …]",
             "       (or --model_config_file=FILE; with no model flag, "
             "$MODEL_BASE_PATH/$MODEL_NAME, default /models/model)", "",
             "Serves with `gunicorn -c gunicorn_conf.py tfwsgi:app`; each flag sets the TFWSGI_ "
             "variable of its name (docs/settings.md).", "", "Flags:"]
    rows: list[tuple[str, type, Any, str]] = [(s.name, s.type, s.default, s.doc) for s in SETTINGS]
    rows += [(f.name, f.type, f.default, f.doc) for f in EXTRA_FLAGS.values()]
    for name, kind, default, doc in sorted(rows):
        shown = _env_text(default) if kind is not str else repr(default)
        lines.append(f"  --{name}={kind.__name__} (default {shown})")
        lines.append(textwrap.fill(doc, 100, initial_indent=" " * 6, subsequent_indent=" " * 6))
    lines += ["", "tensorflow_model_server flags not supported:"]
    lines += [f"  --{name}: {why}" for name, why in sorted(UNSUPPORTED_FLAGS.items())]
    return "\n".join(lines)


def gunicorn_conf() -> str:
    """gunicorn_conf.py: beside the package in a checkout (or an editable install), else where
    setup.cfg's ``data_files`` installs it (``<prefix>/share/tfwsgi``)."""
    for path in (Path(__file__).resolve().parent.parent / "gunicorn_conf.py",
                 Path(sys.prefix) / "share" / "tfwsgi" / "gunicorn_conf.py"):
        if path.is_file():
            return str(path)
    raise UsageError("gunicorn_conf.py not found beside the tfwsgi package nor in "
                     f"{sys.prefix}/share/tfwsgi")


def _tensorflow_version() -> str:
    try:
        return metadata.version("tensorflow")
    except metadata.PackageNotFoundError:
        return "not installed"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command: print help or the versions, or exec gunicorn (never returns then)."""
    args = sys.argv[1:] if argv is None else argv
    try:
        invocation = parse(args, os.environ)
        if invocation.action == "help":
            print(usage())
            return 0
        if invocation.action == "version":
            # main.cc prints "TensorFlow ModelServer: …" and "TensorFlow Library: …".
            print(f"TensorFlow ModelServer: tfwsgi {__version__}\n"
                  f"TensorFlow Library: {_tensorflow_version()}")
            return 0
        conf = gunicorn_conf()
    except UsageError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return USAGE_EXIT
    for note in invocation.notes:
        print(f"{PROG}: {note}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    command = [sys.executable, "-m", "gunicorn", "-c", conf, "tfwsgi:app"]
    os.execve(sys.executable, command, invocation.env)
    return 0  # pragma: no cover - execve does not return
