"""gunicorn hook helpers that are pure logic."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tfwsgi import hooks
from tfwsgi.settings import from_env

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hooks, "_activated_bind", None)


def test_bind_follows_the_port_without_socket_activation() -> None:
    assert hooks.bind_addresses(from_env({}), {}) == ["0.0.0.0:8501"]
    settings = from_env({"TFWSGI_REST_API_PORT": "9000"})
    assert hooks.bind_addresses(settings, {"LISTEN_PID": "1"}) == ["0.0.0.0:9000"]  # not ours


def test_bind_is_frozen_under_socket_activation() -> None:
    """gunicorn re-reads its config on SIGHUP and rebinds when ``bind`` changed: under systemd that
    would drop the passed socket, so the first value stays."""
    ours = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"}
    assert hooks.bind_addresses(from_env({}), ours) == ["0.0.0.0:8501"]
    # gunicorn has removed LISTEN_* by the time a reload reads the config again.
    assert hooks.bind_addresses(from_env({"TFWSGI_REST_API_PORT": "9000"}), {}) == ["0.0.0.0:8501"]


def test_a_stop_signal_before_gunicorns_handlers_is_handed_to_them() -> None:
    """A SIGTERM that reaches a worker while post_fork runs (it still has the master's handlers)
    is held and replayed once gunicorn's worker installs its own (init_signals), so the worker
    stops instead of being killed after graceful_timeout. In a child process: signal handlers."""
    code = """
import os, signal
from tfwsgi import hooks

class Worker:
    alive = True
    def init_signals(self):  # as gunicorn's Worker.init_signals: SIGTERM -> handle_exit
        signal.signal(signal.SIGTERM, lambda signum, frame: setattr(self, "alive", False))

w = Worker()
signal.signal(signal.SIGTERM, lambda signum, frame: None)  # the master's handler, inherited
hooks._hold_stop_signals(w)
os.kill(os.getpid(), signal.SIGTERM)
assert w.alive, "not handled before gunicorn's handlers exist"
w.init_signals()
assert not w.alive, "the held SIGTERM was not handed to gunicorn's handler"
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
