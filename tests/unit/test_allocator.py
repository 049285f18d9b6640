"""tfwsgi.allocator's decisions (pure logic; the real preload is in test_allocator_e2e.py)."""

from __future__ import annotations

import gc
import os
import time
import weakref

import pytest

from tfwsgi import allocator

MAPS_JEMALLOC = ("7f00-7f10 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n"
                 "7f20-7f30 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
MAPS_GLIBC = "7f20-7f30 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libc.so.6\n"


def test_loaded_reads_the_maps():
    assert allocator.loaded(MAPS_JEMALLOC)
    assert not allocator.loaded(MAPS_GLIBC)
    assert not allocator.loaded("")


def test_exec_environment_adds_the_preload_and_keeps_the_rest():
    env = allocator.exec_environment({"PATH": "/bin", "LISTEN_FDS": "1"}, "libjemalloc.so.2")
    assert env == {"PATH": "/bin", "LISTEN_FDS": "1", "LD_PRELOAD": "libjemalloc.so.2",
                   allocator.TRIED_ENV: "1"}


def test_exec_environment_keeps_an_existing_preload_after_jemalloc():
    env = allocator.exec_environment({"LD_PRELOAD": "libfoo.so"}, "libjemalloc.so.2")
    assert env is not None and env["LD_PRELOAD"] == "libjemalloc.so.2 libfoo.so"


@pytest.mark.parametrize("environ, library", [
    ({}, None),                                           # not installed
    ({allocator.TRIED_ENV: "1"}, "libjemalloc.so.2"),      # tried: never loop
])
def test_no_exec(environ, library):
    assert allocator.exec_environment(environ, library) is None


def test_already_on_jemalloc_does_not_start_again(monkeypatch, no_exec):
    monkeypatch.setattr(allocator, "_maps", lambda: MAPS_JEMALLOC)
    monkeypatch.setattr(allocator.ctypes.util, "find_library", lambda name: "libjemalloc.so.2")
    allocator.use_jemalloc("jemalloc", {})
    assert no_exec == []


@pytest.fixture
def no_exec(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execve", lambda *a: calls.append(a))
    monkeypatch.delenv(allocator.TF_ENV, raising=False)
    return calls


def test_use_jemalloc_starts_again_with_the_preload(monkeypatch, no_exec):
    monkeypatch.setattr(allocator, "_maps", lambda: MAPS_GLIBC)
    monkeypatch.setattr(allocator.ctypes.util, "find_library", lambda name: "libjemalloc.so.2")
    allocator.use_jemalloc("jemalloc", {"A": "b"})
    assert len(no_exec) == 1
    assert no_exec[0][2] == {"A": "b", "LD_PRELOAD": "libjemalloc.so.2", allocator.TRIED_ENV: "1"}


def test_use_jemalloc_without_the_library_warns_and_goes_on(monkeypatch, no_exec, caplog):
    monkeypatch.setattr(allocator, "_maps", lambda: MAPS_GLIBC)
    monkeypatch.setattr(allocator.ctypes.util, "find_library", lambda name: None)
    allocator.use_jemalloc("jemalloc", {})
    assert no_exec == []
    assert "libjemalloc.so.2 was not found" in caplog.text
    assert allocator.TF_ENV not in os.environ  # TF keeps its own pool on glibc


def test_once_loaded_tensorflow_allocates_through_it(monkeypatch, no_exec):
    monkeypatch.setattr(allocator, "_maps", lambda: MAPS_JEMALLOC)
    allocator.use_jemalloc("jemalloc", {})
    assert no_exec == []
    assert os.environ[allocator.TF_ENV] == "true"


def test_the_operators_tensorflow_setting_wins(monkeypatch, no_exec):
    monkeypatch.setattr(allocator, "_maps", lambda: MAPS_JEMALLOC)
    monkeypatch.setenv(allocator.TF_ENV, "false")
    allocator.use_jemalloc("jemalloc", {})
    assert os.environ[allocator.TF_ENV] == "false"


def test_system_choice_leaves_everything_alone(monkeypatch, no_exec):
    monkeypatch.setattr(allocator, "_maps", lambda: MAPS_GLIBC)
    allocator.use_jemalloc("system", {})
    assert no_exec == [] and allocator.TF_ENV not in os.environ


# ------------------------------------------------------------------ memory release (a manager listener)

class Servable:
    """Lives in a reference cycle, as a loaded SavedModel does: only a full collection frees it."""

    def __init__(self) -> None:
        self.me = self


def until(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.fixture
def collections(monkeypatch):
    counted: list[int] = []
    real = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: counted.append(1) or real(*a))
    return counted


def test_an_unload_collects_at_once(collections):
    release = allocator.MemoryRelease()
    servable = Servable()
    held = weakref.ref(servable)
    release.loaded("m", 1, servable)
    del servable
    release.unloaded("m", 1)
    assert held() is None and collections == [1]
    assert release._retrier is None  # nothing left alive: no retries


def test_a_version_held_by_a_request_is_collected_again_until_freed(collections):
    release = allocator.MemoryRelease(first_retry=0.05, last_retry=3.2)
    in_flight = Servable()
    held = weakref.ref(in_flight)
    release.loaded("m", 1, in_flight)
    release.unloaded("m", 1)
    assert collections == [1] and held() is not None
    assert until(lambda: len(collections) >= 2)  # a retry while the request holds it
    assert held() is not None
    del in_flight  # the request ends: the version is garbage in a cycle
    assert until(lambda: held() is None)
    assert until(lambda: release._retrier is None)  # nothing left: the retries end
    settled = len(collections)
    time.sleep(0.3)
    assert len(collections) == settled


def test_collections_for_a_version_never_let_go_stop(collections):
    release = allocator.MemoryRelease(first_retry=0.01, last_retry=0.64)
    leaked = Servable()
    release.loaded("m", 1, leaked)
    release.unloaded("m", 1)
    assert until(lambda: release._retrier is None)
    assert len(collections) == 8  # at the unload, then 1, 2, 4 … 64 retry intervals later


def test_a_new_unload_starts_the_retries_over(collections):
    release = allocator.MemoryRelease(first_retry=0.01, last_retry=0.64)
    first, second = Servable(), Servable()
    release.loaded("m", 1, first)
    release.loaded("m", 2, second)
    release.unloaded("m", 1)
    assert until(lambda: len(collections) >= 5)
    before = len(collections)
    release.unloaded("m", 2)
    assert until(lambda: release._retrier is None)
    assert len(collections) >= before + 8  # the second unload has a whole schedule of its own
