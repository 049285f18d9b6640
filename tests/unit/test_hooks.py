"""gunicorn hook helpers that are pure logic."""

from __future__ import annotations

import os

import pytest

from tfwsgi import hooks
from tfwsgi.settings import from_env


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
