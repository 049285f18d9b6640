"""The shipped systemd units: `systemd-analyze verify`, and the service run as its unit says under
`systemd-socket-activate` (the socket passed in, READY=1 on a notify socket, reload, stop)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from conftest import ROOT, free_port

pytestmark = pytest.mark.e2e

UNITS = ROOT / "systemd"
VENV = Path(sys.executable).parent.parent


def render(text: str, paths: dict[str, str]) -> str:
    """The text with each install path replaced (longest first, so /opt/tfwsgi/venv before /opt/tfwsgi)."""
    for old in sorted(paths, key=len, reverse=True):
        text = text.replace(old, paths[old])
    return text


def section(text: str, name: str) -> list[tuple[str, str]]:
    """The ``Key=value`` lines of one ``[Section]`` of a unit file, in order."""
    items, current = [], ""
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("["):
            current = line.strip("[]")
        elif current == name and line and not line.startswith("#"):
            key, _, value = line.partition("=")
            items.append((key.strip(), value.strip()))
    return items


def env_file(path: Path) -> dict[str, str]:
    """An ``EnvironmentFile=``: ``KEY=value`` lines and comments."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip().strip("'\"")
    return values


def verify(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", "--man=no", "tfwsgi.socket", "tfwsgi.service"],
                          cwd=directory, capture_output=True, text=True, timeout=60)


@pytest.fixture
def installed(tmp_path: Path, model_root: Path) -> dict[str, str]:
    """Test stand-ins for the install paths: this checkout and its venv, a config directory holding
    the shipped env file, a runtime directory, and a model directory with half_plus_two in it."""
    etc, run, models = tmp_path / "etc", tmp_path / "run", tmp_path / "models"
    for d in (etc, run, models):
        d.mkdir()
    (models / "half_plus_two").symlink_to(model_root / "hp")  # latest version 3: y = 0.5·x + 4
    paths = {"/opt/tfwsgi/venv": str(VENV), "/opt/tfwsgi": str(ROOT), "/etc/tfwsgi": str(etc),
             "/run/tfwsgi": str(run), "/var/lib/tfwsgi": str(tmp_path)}
    (etc / "tfwsgi.env").write_text(render((UNITS / "tfwsgi.env").read_text(), paths))
    return paths


def test_shipped_units_verify_except_for_the_missing_install(tmp_path: Path) -> None:
    for name in ("tfwsgi.service", "tfwsgi.socket"):
        shutil.copy(UNITS / name, tmp_path / name)
    out = verify(tmp_path)
    complaints = [line for line in (out.stdout + out.stderr).splitlines() if line.strip()]
    # This machine has no /opt/tfwsgi: that is the only thing systemd may object to.
    assert complaints == ["tfwsgi.service: Command /opt/tfwsgi/venv/bin/gunicorn is not executable: "
                          "No such file or directory"], complaints


def test_rendered_units_verify_cleanly(tmp_path: Path, installed: dict[str, str]) -> None:
    for name in ("tfwsgi.service", "tfwsgi.socket"):
        (tmp_path / name).write_text(render((UNITS / name).read_text(), installed))
    out = verify(tmp_path)
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), out


def test_service_unit_shape() -> None:
    service = dict(section((UNITS / "tfwsgi.service").read_text(), "Service"))
    assert service["Type"] == "notify" and service["KillMode"] == "mixed"
    assert service["Restart"] == "on-failure" and service["User"] == "tfwsgi"
    assert service["ExecReload"] == "/bin/kill -s HUP $MAINPID"
    assert service["EnvironmentFile"] == "/etc/tfwsgi/tfwsgi.env"
    assert service["ExecStart"] == "/opt/tfwsgi/venv/bin/gunicorn -c gunicorn_conf.py tfwsgi:app"
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    unit = dict(section((UNITS / "tfwsgi.service").read_text(), "Unit"))
    assert "memcached.service" in unit["After"].split() and unit["Requires"] == "tfwsgi.socket"
    socket_unit = dict(section((UNITS / "tfwsgi.socket").read_text(), "Socket"))
    assert socket_unit["ListenStream"] == "8501"


def _notify_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.settimeout(0.2)
    return sock


def _notifications(sock: socket.socket) -> list[tuple[int, str]]:
    """(sender pid, message) of every datagram waiting on the notify socket."""
    got = []
    while True:
        try:
            data, ancdata, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
        except (TimeoutError, BlockingIOError):
            return got
        pid = -1
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", payload[:12])[0]
        got.append((pid, data.decode()))


def _grpc_predict(port: int, x: float) -> list[float]:
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "half_plus_two"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto([x], dtype=tf.float32))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=30)
    return tf.make_ndarray(response.outputs["y"]).tolist()


def _worker_pids(master: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(master)], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


def test_service_runs_socket_activated_and_notifies(tmp_path: Path, installed: dict[str, str]) -> None:
    text = render((UNITS / "tfwsgi.service").read_text(), installed)
    service = section(text, "Service")
    values = dict(service)
    env: dict[str, str] = {"TF_CPP_MIN_LOG_LEVEL": "2", "TFWSGI_WORKERS": "2"}
    # The shipped env file serves gRPC on TF Serving's port; here on a free one (tfwsgi reads the
    # file itself too, TFWSGI_ENV_FILE, so the installed copy says it).
    installed_env = Path(values["EnvironmentFile"])
    assert env_file(installed_env)["TFWSGI_PORT"] == "8500"
    grpc_port = free_port()
    text = installed_env.read_text().replace("TFWSGI_PORT=8500", f"TFWSGI_PORT={grpc_port}")
    installed_env.write_text(text)
    env.update(env_file(installed_env))
    for key, value in service:
        if key == "Environment":
            name, _, val = value.partition("=")
            env[name] = val
    notify_path = tmp_path / "notify.sock"
    notify = _notify_socket(notify_path)
    env["NOTIFY_SOCKET"] = str(notify_path)
    port = free_port()
    cmd = ["systemd-socket-activate", "-l", f"127.0.0.1:{port}",
           *(f"--setenv={k}={v}" for k, v in env.items()), "--", *shlex.split(values["ExecStart"])]
    log_path = tmp_path / "service.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=values["WorkingDirectory"], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        # systemd-socket-activate holds the socket and starts the service on the first connection.
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(url + "/v2/health/ready", timeout=30).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.3)
        messages = _notifications(notify)
        assert (proc.pid, "READY=1\nSTATUS=Gunicorn arbiter booted") in messages, messages
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert any(part.endswith(b"/gunicorn") for part in cmdline)  # it exec'd the unit's command
        logged = log_path.read_text()
        assert f"Listening at: http://127.0.0.1:{port} ({proc.pid})" in logged
        assert "0.0.0.0:8501" not in logged  # the passed socket, not the configured port

        r = requests.post(url + "/v1/models/half_plus_two:predict", data='{"instances": [1.0]}', timeout=30)
        assert r.status_code == 200 and json.loads(r.content) == {"predictions": [4.5]}
        assert any(n.endswith(".db") for n in os.listdir(Path(installed["/run/tfwsgi"]) / "metrics"))
        assert _grpc_predict(grpc_port, 1.0) == [4.5]  # gRPC too, from every worker

        # systemctl reload: the unit's ExecReload, with $MAINPID as systemd substitutes it.
        old = _worker_pids(proc.pid)
        reload_cmd = shlex.split(values["ExecReload"].replace("$MAINPID", str(proc.pid)))
        subprocess.run(reload_cmd, check=True, timeout=10)
        deadline = time.monotonic() + 120
        while not (len(_worker_pids(proc.pid) - old) >= 2 and not (_worker_pids(proc.pid) & old)):
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        deadline = time.monotonic() + 120
        while requests.get(url + "/v2/health/ready", timeout=30).status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        r = requests.post(url + "/v1/models/half_plus_two:predict", data='{"instances": [3.0]}', timeout=30)
        assert json.loads(r.content) == {"predictions": [5.5]}
        assert f"Listening at: http://127.0.0.1:{port}" in log_path.read_text()

        # systemctl stop with KillMode=mixed: SIGTERM to the main process, which stops its workers.
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=int(values["TimeoutStopSec"])) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        notify.close()


def test_make_install_stages_the_service_tree(tmp_path: Path) -> None:
    """`make install` with DESTDIR (no user, no systemctl; without TensorFlow to stay quick)."""
    dest = tmp_path / "root"
    stage = ["make", "install", f"DESTDIR={dest}", "PIP_INSTALL_ARGS=--no-deps", "DEMO_MODEL=no"]
    out = subprocess.run(stage, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for name in ("tfwsgi.service", "tfwsgi.socket"):
        assert (dest / "etc/systemd/system" / name).read_text() == (UNITS / name).read_text()
    assert (dest / "opt/tfwsgi/gunicorn_conf.py").read_text() == (ROOT / "gunicorn_conf.py").read_text()
    assert (dest / "etc/tfwsgi/tfwsgi.env").read_text() == (UNITS / "tfwsgi.env").read_text()
    assert (dest / "var/lib/tfwsgi/models").is_dir()
    version = subprocess.run([str(dest / "opt/tfwsgi/venv/bin/python"), "-c",
                              "import importlib.metadata as m; print(m.version('tfwsgi'))"],
                             capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.strip(), version.stderr
    # An edited env file survives a second install.
    (dest / "etc/tfwsgi/tfwsgi.env").write_text("TFWSGI_WORKERS=3\n")
    subprocess.run(stage, cwd=ROOT, capture_output=True, check=True, timeout=300)
    assert (dest / "etc/tfwsgi/tfwsgi.env").read_text() == "TFWSGI_WORKERS=3\n"
