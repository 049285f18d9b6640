"""``tfwsgi-model-server``, run as a TF Serving user runs tensorflow_model_server: its flags, its
Docker image's MODEL_NAME/MODEL_BASE_PATH, and a model whose custom ops come from tensorflow-text."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from conftest import ROOT, VENV_BIN, free_port

pytestmark = pytest.mark.e2e

CONSOLE_SCRIPT = VENV_BIN / "tfwsgi-model-server"

# A model that needs tensorflow-text's ops: its graph calls CaseFoldUTF8, which TensorFlow knows
# only once tensorflow_text is imported (loading it without gives "Op type not registered").
BUILD_CASE_FOLD = """
import sys
import tensorflow as tf
import tensorflow_text as text

class CaseFold(tf.Module):
    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def fold(self, t):
        return {"folded": text.case_fold_utf8(t)}

m = CaseFold()
tf.saved_model.save(m, sys.argv[1], signatures={"serving_default": m.fold})
"""


def command() -> list[str]:
    """The console script setup.cfg declares, as `make venv` installs it; `python -m tfwsgi` (the
    same ``tfwsgi.cli:main``) where the venv's install predates it."""
    if CONSOLE_SCRIPT.exists():
        return [str(CONSOLE_SCRIPT)]
    return [sys.executable, "-m", "tfwsgi"]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TFWSGI_") and k not in ("MODEL_NAME", "MODEL_BASE_PATH")}
    # gRPC off unless a test gives --port (or TFWSGI_PORT): never TF Serving's 8500, which
    # another server on this machine may hold.
    env.update({"PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2", "TFWSGI_PORT": "0"}, **extra)
    return env


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """half_plus_two (tfwsgi.demo: ``<root>/half_plus_two/1``) and case_fold (tensorflow-text)."""
    root = tmp_path_factory.mktemp("cli-models")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    subprocess.run([sys.executable, "-m", "tfwsgi.demo", str(root)], check=True, cwd=ROOT, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    subprocess.run([sys.executable, "-c", BUILD_CASE_FOLD, str(root / "case_fold" / "1")],
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    return root


class Command:
    """``tfwsgi-model-server ARGS`` in its own process group; it execs into gunicorn's master."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen([*command(), *args], cwd=ROOT, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, port: int, timeout: float = 120.0) -> str:
        """The base URL once a worker has loaded its models and the port answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            if "tfwsgi: worker" in self.log() and " ready in " in self.log():
                try:
                    requests.get(f"http://127.0.0.1:{port}/v2/health/live", timeout=5)
                    return f"http://127.0.0.1:{port}"
                except requests.ConnectionError:
                    pass
            time.sleep(0.2)
        raise TimeoutError(f"not ready in {timeout}s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass


@pytest.fixture
def run(tmp_path: Path) -> Iterator[object]:
    started: list[Command] = []

    def start(args: list[str], **env: str) -> Command:
        cmd = Command(args, child_env(**env), tmp_path / f"command-{len(started)}.log")
        started.append(cmd)
        return cmd

    yield start
    for cmd in started:
        cmd.stop()


def test_tf_serving_flags_serve_half_plus_two(run, models: Path) -> None:
    port = free_port()
    cmd = run([f"--port={free_port()}", f"--rest_api_port={port}", "--model_name=half_plus_two",
               f"--model_base_path={models / 'half_plus_two'}", "--rest_api_timeout_in_ms=5000",
               "--file_system_poll_wait_seconds=0", "--workers=1"])
    url = cmd.wait_ready(port)
    r = requests.post(f"{url}/v1/models/half_plus_two:predict",
                      json={"instances": [1.0, 2.0, 5.0]}, timeout=30)
    assert r.status_code == 200 and r.json() == {"predictions": [2.5, 3.0, 4.5]}
    status = requests.get(f"{url}/v1/models/half_plus_two", timeout=30).json()
    assert status["model_version_status"][0]["state"] == "AVAILABLE"
    # The command became gunicorn's master (same PID), as `gunicorn -c gunicorn_conf.py tfwsgi:app`.
    argv = Path(f"/proc/{cmd.proc.pid}/cmdline").read_bytes().split(b"\0")
    assert b"gunicorn" in argv and b"tfwsgi:app" in argv


@pytest.mark.parametrize("flag,message", [
    ("--no_such_flag=1", "tfwsgi-model-server: unknown flag --no_such_flag (see --help)"),
    ("--ssl_config_file=/x", "tfwsgi-model-server: --ssl_config_file is a tensorflow_model_server "
                             "flag tfwsgi does not support: gRPC with TLS is not implemented "
                             "(terminate it in front of tfwsgi)"),
])
def test_an_unknown_or_unsupported_flag_exits_non_zero_naming_it(models: Path, flag: str,
                                                                   message: str) -> None:
    done = subprocess.run([*command(), f"--model_base_path={models / 'half_plus_two'}",
                           f"--rest_api_port={free_port()}", flag],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr == message + "\n" and done.stdout == ""


def test_docker_images_model_name_and_base_path(run, models: Path) -> None:
    port = free_port()
    cmd = run([f"--rest_api_port={port}", "--workers=1"],
              MODEL_NAME="half_plus_two", MODEL_BASE_PATH=str(models))
    url = cmd.wait_ready(port)
    r = requests.post(f"{url}/v1/models/half_plus_two:predict", json={"instances": [4.0]}, timeout=30)
    assert r.json() == {"predictions": [4.0]}
    assert f"serving model 'half_plus_two' from {models}/half_plus_two" in cmd.log()


def test_a_model_with_tensorflow_text_ops_loads_with_the_module_named(run, models: Path) -> None:
    port = free_port()
    cmd = run([f"--rest_api_port={port}", "--model_name=case_fold",
               f"--model_base_path={models / 'case_fold'}", "--custom_op_modules=tensorflow_text",
               "--workers=1"])
    url = cmd.wait_ready(port)
    r = requests.post(f"{url}/v1/models/case_fold:predict",
                      json={"instances": ["HeLLo WÖRLD"]}, timeout=30)
    assert r.status_code == 200 and r.json() == {"predictions": ["hello wörld"]}
    assert "imported custom-op module tensorflow_text" in cmd.log()


def test_without_the_module_the_same_model_does_not_load(run, models: Path) -> None:
    port = free_port()
    cmd = run([f"--rest_api_port={port}", "--model_name=case_fold",
               f"--model_base_path={models / 'case_fold'}", "--max_num_load_retries=0",
               "--workers=1"])
    url = cmd.wait_ready(port)
    status = requests.get(f"{url}/v1/models/case_fold", timeout=30).json()
    version = status["model_version_status"][0]
    assert version["state"] == "END"
    assert "Op type not registered 'CaseFoldUTF8'" in version["status"]["error_message"]


def test_a_module_that_cannot_be_imported_stops_the_start(run, models: Path) -> None:
    cmd = run([f"--rest_api_port={free_port()}", "--model_name=half_plus_two",
               f"--model_base_path={models / 'half_plus_two'}", "--custom_op_modules=no_such_ops",
               "--workers=1"])
    assert cmd.proc.wait(timeout=120) != 0
    assert ("TFWSGI_CUSTOM_OP_MODULES: importing no_such_ops failed: ModuleNotFoundError: "
            "No module named 'no_such_ops'") in cmd.log()
