"""The manager's resolution and status logic, with a stand-in loader (no TensorFlow)."""

from __future__ import annotations

import gc
import weakref

import pytest

from tfwsgi.allocator import MemoryRelease
from tfwsgi.errors import InvalidArgument, NotFound, TFWSGIError
from tfwsgi.hooks import fitted_threads
from tfwsgi.manager import AVAILABLE, END, LOADING, UNLOADING, Listener, ModelManager, RetryPolicy
from tfwsgi.settings import from_env
from tfwsgi.source import ALL, LATEST, ModelConfig, VersionPolicy


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
    # A label points only at an available version (TF Serving refuses the others).
    with pytest.raises(InvalidArgument, match="Unrecognized servable version label: bad"):
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


# ------------------------------------------------------------------ lifecycle: proposals applied

class Disk:
    """Version directories under a base path, and a loader that reads a marker file in each."""

    def __init__(self, root) -> None:
        self.root = root
        self.loads: list[int] = []
        self.gate = None

    def add(self, version: int, good: bool = True) -> None:
        d = self.root / str(version)
        d.mkdir(parents=True)
        (d / "ok").write_text("1" if good else "0")

    def remove(self, version: int) -> None:
        import shutil

        shutil.rmtree(self.root / str(version))

    def load(self, name: str, version: int, path: str) -> Fake:
        self.loads.append(version)
        if self.gate is not None:
            self.gate(version)
        with open(f"{path}/ok") as f:
            if f.read() != "1":
                raise TFWSGIError("corrupt version", 15)
        return Fake(name, version, path)


def disk_manager(tmp_path, policy=VersionPolicy(), labels=None, retry=RetryPolicy(0, 0.0)):  # noqa: B008
    disk = Disk(tmp_path / "m")
    disk.add(1)
    mgr = ModelManager([ModelConfig("m", str(disk.root), policy, labels or {})], disk.load, retry)
    mgr.load_all()
    return mgr, disk


def test_new_version_is_loaded_before_the_old_one_leaves(tmp_path):
    mgr, disk = disk_manager(tmp_path)
    seen_while_loading = []
    disk.gate = lambda v: seen_while_loading.append(mgr.servable("m").version)
    disk.add(2)
    mgr.source.propose()
    assert seen_while_loading == [1]  # version 1 answered while 2 was loading
    assert mgr.servable("m").version == 2
    states = {s.version: s.state for s in mgr.status("m")}
    assert states == {2: AVAILABLE, 1: END}


def test_broken_new_version_never_serves_and_the_old_keeps_serving(tmp_path):
    mgr, disk = disk_manager(tmp_path, retry=RetryPolicy(max_retries=2, interval_seconds=0.0))
    disk.add(2, good=False)
    for _ in range(5):
        mgr.source.propose()
    assert mgr.servable("m").version == 1
    state = mgr.status("m", 2)[0]
    assert (state.state, state.error_code, state.error_message) == (END, 15, "corrupt version")
    assert disk.loads.count(2) == 3  # the first try and two retries, then no more


def test_retry_waits_for_the_interval(tmp_path):
    mgr, disk = disk_manager(tmp_path, retry=RetryPolicy(max_retries=5, interval_seconds=3600))
    disk.add(2, good=False)
    mgr.source.propose()
    mgr.source.propose()
    assert disk.loads.count(2) == 1


def test_fixed_version_loads_on_retry(tmp_path):
    mgr, disk = disk_manager(tmp_path, retry=RetryPolicy(max_retries=3, interval_seconds=0.0))
    disk.add(2, good=False)
    mgr.source.propose()
    (disk.root / "2" / "ok").write_text("1")
    mgr.source.propose()
    assert mgr.servable("m").version == 2


def test_removed_version_unloads_but_never_the_last(tmp_path):
    mgr, disk = disk_manager(tmp_path, policy=VersionPolicy(ALL))
    disk.add(2)
    mgr.source.propose()
    disk.remove(2)
    mgr.source.propose()
    assert mgr.servable("m").version == 1 and mgr.status("m", 2)[0].state == END
    disk.remove(1)
    mgr.source.propose()
    assert mgr.servable("m").version == 1  # nothing else to serve: it stays (availability first)


def test_version_back_on_disk_is_loaded_again(tmp_path):
    mgr, disk = disk_manager(tmp_path, policy=VersionPolicy(ALL))
    disk.add(2)
    mgr.source.propose()
    disk.remove(2)
    mgr.source.propose()
    disk.add(2)
    mgr.source.propose()
    assert mgr.servable("m").version == 2 and disk.loads.count(2) == 2


def test_label_moves_only_once_its_target_is_available(tmp_path):
    disk = Disk(tmp_path / "m")
    disk.add(1)
    cfg = ModelConfig("m", str(disk.root), VersionPolicy(ALL), {"stable": 1})
    mgr = ModelManager([cfg], disk.load, RetryPolicy(0, 0.0))
    mgr.load_all()
    assert mgr.servable("m", label="stable").version == 1
    # The config moves the label to version 2 before version 2 exists: it stays on 1.
    mgr.source.set_configs([ModelConfig("m", str(disk.root), VersionPolicy(ALL), {"stable": 2})])
    mgr.source.propose()
    assert mgr.servable("m", label="stable").version == 1
    disk.add(2)
    mgr.source.propose()
    assert mgr.servable("m", label="stable").version == 2


def test_models_added_and_removed_by_config(tmp_path):
    mgr, disk = disk_manager(tmp_path)
    other = Disk(tmp_path / "o")
    other.add(5)
    configs = [ModelConfig("m", str(disk.root)), ModelConfig("o", str(other.root))]
    mgr.source.set_configs(configs)
    mgr.source.propose()
    assert mgr.servable("o").version == 5 and mgr.ready() == {"m": True, "o": True}
    mgr.source.set_configs([ModelConfig("o", str(other.root))])
    mgr.source.propose()
    with pytest.raises(NotFound):
        mgr.servable("m")
    assert mgr.ready() == {"o": True}


def test_readiness_waits_for_every_model(tmp_path):
    disk = Disk(tmp_path / "m")
    mgr = ModelManager([ModelConfig("m", str(disk.root), VersionPolicy(LATEST))], disk.load)
    mgr.load_all()
    assert mgr.ready() == {"m": False}
    disk.add(3)
    mgr.source.propose()
    assert mgr.ready() == {"m": True}


def test_status_shows_loading_while_a_version_loads(tmp_path):
    mgr, disk = disk_manager(tmp_path)
    seen = []
    disk.gate = lambda v: seen.append(mgr.status("m", v)[0].state)
    disk.add(2)
    mgr.source.propose()
    assert seen == [LOADING]


def test_fresh_worker_falls_back_to_an_older_version_when_the_latest_is_broken(tmp_path):
    disk = Disk(tmp_path / "m")
    disk.add(1)
    disk.add(2, good=False)
    mgr = ModelManager([ModelConfig("m", str(disk.root))], disk.load, RetryPolicy(1, 0.0))
    mgr.load_all()
    assert mgr.servable("m").version == 1
    assert mgr.status("m", 2)[0].state == END
    # Once version 2 is fixed, a retry loads it and the fallback leaves.
    (disk.root / "2" / "ok").write_text("1")
    mgr.source.propose()
    assert mgr.servable("m").version == 2 and mgr.status("m", 1)[0].state == END


# ------------------------------------------------------------------ announcements to listeners

class Recorder(Listener):
    """Every announcement, in order."""

    def __init__(self) -> None:
        self.heard: list[tuple] = []

    def state(self, name, version, old, new):
        self.heard.append(("state", name, version, old, new))

    def load_finished(self, name, seconds, ok):
        self.heard.append(("load_finished", name, ok))

    def loaded(self, name, version, servable):
        self.heard.append(("loaded", name, version, servable.version))

    def unloaded(self, name, version):
        self.heard.append(("unloaded", name, version))


def test_loads_and_unloads_are_announced_in_order(tmp_path):
    mgr, disk = disk_manager(tmp_path)
    rec = Recorder()
    mgr.add_listener(rec)
    disk.add(2)
    mgr.source.propose()
    assert rec.heard == [
        ("state", "m", 2, None, LOADING),
        ("state", "m", 2, LOADING, AVAILABLE),
        ("load_finished", "m", True),
        ("loaded", "m", 2, 2),
        ("state", "m", 1, AVAILABLE, UNLOADING),
        ("state", "m", 1, UNLOADING, END),
        ("unloaded", "m", 1),  # once the proposal is applied
    ]


def test_unload_is_announced_after_the_manager_let_go_of_the_version(tmp_path):
    mgr, disk = disk_manager(tmp_path)
    old = weakref.ref(mgr.servable("m"))
    alive_at_announcement = []

    class Check(Listener):
        def unloaded(self, name, version):
            gc.collect()
            alive_at_announcement.append(old() is not None)

    mgr.add_listener(Check())
    disk.add(2)
    mgr.source.propose()
    assert alive_at_announcement == [False]  # Fake has no cycle: gone with the manager's last reference


def test_failed_load_and_removed_model_are_announced(tmp_path):
    mgr, disk = disk_manager(tmp_path)
    rec = Recorder()
    mgr.add_listener(rec)
    disk.add(2, good=False)
    mgr.source.propose()
    assert ("load_finished", "m", False) in rec.heard and not any(h[0] == "loaded" for h in rec.heard)
    rec.heard.clear()
    mgr.source.set_configs([])
    assert rec.heard[-1] == ("unloaded", "m", 1) and mgr.ready() == {}


def test_a_failing_listener_never_stops_the_manager(tmp_path, caplog):
    mgr, disk = disk_manager(tmp_path)

    class Broken(Listener):
        def loaded(self, name, version, servable):
            raise RuntimeError("listener bug")

    rec = Recorder()
    mgr.add_listener(Broken())
    mgr.add_listener(rec)
    disk.add(2)
    mgr.source.propose()
    assert mgr.servable("m").version == 2 and ("unloaded", "m", 1) in rec.heard
    assert "listener bug" in caplog.text


def test_models_are_known_before_the_first_proposal(tmp_path):
    mgr = ModelManager([ModelConfig("m", str(tmp_path)), ModelConfig("o", str(tmp_path))], loader([]))
    assert mgr.model_names == ["m", "o"] and mgr.ready() == {"m": False, "o": False}


# ------------------------------------------------------------------ memory release listens

class Cyclic(Fake):
    """A servable that, like a loaded SavedModel, lives in reference cycles: only the cycle
    collector frees it."""

    def __init__(self, name: str, version: int, path: str) -> None:
        super().__init__(name, version, path)
        self.me = self


def test_unloaded_version_is_freed_by_the_pass_that_unloads_it(tmp_path):
    disk = Disk(tmp_path / "m")
    disk.add(2)
    mgr = ModelManager([ModelConfig("m", str(disk.root))], lambda n, v, p: Cyclic(n, v, p))
    mgr.add_listener(MemoryRelease())
    mgr.load_all()
    held = weakref.ref(mgr.servable("m"))
    disk.add(3)
    mgr.source.propose()
    assert mgr.servable("m").version == 3
    assert held() is None  # not left for a later full collection (the next swap's)
