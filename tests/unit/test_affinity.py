"""The master's choice of cores for each worker (TFWSGI_CPU_AFFINITY): pure functions."""

from __future__ import annotations

from tfwsgi import hooks


def test_cpu_groups_split_the_cores_over_the_workers() -> None:
    assert hooks.cpu_groups([0, 1, 2, 3], 2) == [(0, 1), (2, 3)]
    assert hooks.cpu_groups([3, 1, 2, 0], 4) == [(0,), (1,), (2,), (3,)]
    assert hooks.cpu_groups([0, 1], 3) == [(0,), (1,)]  # more workers than cores: one core each
    assert hooks.cpu_groups([0, 1, 2, 3, 4], 2) == [(0, 1), (2, 3)]


def test_pick_cpus_takes_the_least_held_group() -> None:
    groups = [(0,), (1,)]
    assert hooks.pick_cpus(groups, []) == (0,)
    assert hooks.pick_cpus(groups, [(0,)]) == (1,)
    assert hooks.pick_cpus(groups, [(0,), (1,), (1,)]) == (0,)
    assert hooks.pick_cpus(groups, [None, (1,)]) == (0,)  # a worker forked before pinning holds none
