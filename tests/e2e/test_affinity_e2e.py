"""Workers pinned to their share of the cores (TFWSGI_CPU_AFFINITY), chosen by the master."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import Server

pytestmark = pytest.mark.e2e

CPUS = sorted(os.sched_getaffinity(0))


def allowed(pid: int) -> set[tuple[int, ...]]:
    """The distinct CPU sets of every thread of a process."""
    sets = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # the thread ended
            sets.add(tuple(sorted(os.sched_getaffinity(int(task.name)))))
    return sets


@pytest.mark.skipif(len(CPUS) < 2, reason="needs two cores")
def test_workers_and_all_their_threads_are_pinned_apart_and_a_replacement_takes_the_freed_core(
        model_config: Path) -> None:
    srv = Server({"TFWSGI_MODEL_CONFIG_FILE": str(model_config)}, workers=2)
    try:
        srv.wait_ready()
        pins = {pid: allowed(pid) for pid in srv.worker_pids()}
        assert all(len(s) == 1 and len(next(iter(s))) == 1 for s in pins.values()), pins
        assert len({next(iter(s)) for s in pins.values()}) == 2, pins  # one core each, not the same
        assert allowed(srv.pid) == {tuple(CPUS)}  # the master is not pinned
        victim = min(pins)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        new: set[int] = set()
        while not new and time.monotonic() < deadline:
            new = set(srv.ready_pids()) - set(pins)
            time.sleep(0.2)
        assert len(new) == 1, srv.log()[-2000:]
        assert allowed(new.pop()) == pins[victim]
    finally:
        srv.stop()


def test_affinity_off_leaves_workers_on_every_core(model_config: Path) -> None:
    srv = Server({"TFWSGI_MODEL_CONFIG_FILE": str(model_config), "TFWSGI_CPU_AFFINITY": "false"},
                 workers=2)
    try:
        srv.wait_ready()
        for pid in srv.worker_pids():
            assert allowed(pid) == {tuple(CPUS)}
        assert "cores=" + ",".join(map(str, CPUS)) in srv.log()
    finally:
        srv.stop()
