"""The manager's resolution and status logic, with a stand-in loader (no TensorFlow)."""

from __future__ import annotations

import pytest

from tfwsgi.errors import InvalidArgument, NotFound, TFWSGIError
from tfwsgi.hooks import fitted_threads
from tfwsgi.manager import AVAILABLE, END, ModelManager
from tfwsgi.settings import from_env
from tfwsgi.source import ALL, ModelConfig, VersionPolicy


class Fake:
    def __init__(self, name: str, version: int, path: str) -> None:
        self.name, self.version, self.path = name, version, path


def loader(calls: list):
    def load(name: str, version: int, path: str) -> Fake:
        calls.append((name, version))
        if version == 3:
            raise TFWSGIError("broken version", 15)
        if version == 4:
            raise RuntimeError("boom")
        return Fake(name, version, path)

    return load


@pytest.fixture
def manager(tmp_path):
    for v in ("1", "2", "3", "4"):
        (tmp_path / "m" / v).mkdir(parents=True)
    calls: list = []
    mgr = ModelManager([ModelConfig("m", str(tmp_path / "m"), VersionPolicy(ALL),
                                    labels={"stable": 1, "bad": 3})], loader=loader(calls))
    mgr.load_all()
    mgr.calls = calls  # type: ignore[attr-defined]
    return mgr


def test_each_version_loaded_once(manager):
    assert sorted(manager.calls) == [("m", 1), ("m", 2), ("m", 3), ("m", 4)]


def test_status_newest_first_with_errors(manager):
    states = manager.status("m")
    assert [(s.version, s.state) for s in states] == [(4, END), (3, END), (2, AVAILABLE), (1, AVAILABLE)]
    assert (states[1].error_code, states[1].error_message) == (15, "broken version")
    assert states[0].error_code == 2 and "RuntimeError: boom" in states[0].error_message
    assert [s.version for s in manager.status("m", 2)] == [2]
    with pytest.raises(NotFound, match="Could not find version 9 of model m"):
        manager.status("m", 9)
    with pytest.raises(NotFound, match="Could not find any versions of model x"):
        manager.status("x")


def test_latest_skips_failed_versions(manager):
    assert manager.servable("m").version == 2


def test_specific_and_label(manager):
    assert manager.servable("m", version=1).version == 1
    assert manager.servable("m", label="stable").version == 1
    with pytest.raises(NotFound, match=r"Specific\(m, 3\)"):
        manager.servable("m", label="bad")
    with pytest.raises(NotFound, match=r"Specific\(m, 8\)"):
        manager.servable("m", version=8)
    with pytest.raises(InvalidArgument, match="Unrecognized servable version label: x"):
        manager.servable("m", label="x")
    with pytest.raises(InvalidArgument, match="cannot be supplied"):
        manager.servable("m", version=1, label="stable")
    with pytest.raises(NotFound, match=r"Latest\(zz\)"):
        manager.servable("zz")


def test_model_without_versions(tmp_path):
    mgr = ModelManager([ModelConfig("e", str(tmp_path / "none"))], loader=loader([]))
    mgr.load_all()
    with pytest.raises(NotFound, match=r"Latest\(e\)"):
        mgr.servable("e")


@pytest.mark.parametrize(("env", "workers", "cores", "expected"), [
    ({}, 2, 2, (1, 1)),
    ({}, 1, 8, (8, 1)),
    ({}, 3, 8, (2, 1)),
    ({}, 16, 2, (1, 1)),
    ({"TFWSGI_TENSORFLOW_INTRA_OP_PARALLELISM": "4",
      "TFWSGI_TENSORFLOW_INTER_OP_PARALLELISM": "2"}, 2, 2, (4, 2)),
])
def test_fitted_threads(env, workers, cores, expected):
    assert fitted_threads(from_env(env), workers, cores) == expected
