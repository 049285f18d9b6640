"""tfwsgi.allocator's decisions (pure logic; the real preload is in test_allocator_e2e.py)."""

from __future__ import annotations

import os

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
