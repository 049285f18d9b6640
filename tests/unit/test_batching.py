"""Unit tests of the dynamic batcher's merge, pad, split, fan-out and admission (fake model)."""

from __future__ import annotations

import gc
import threading
import time
import weakref

import numpy as np
import pytest

from tfwsgi.batching import Batcher, BatchingParameters, parse_batching_parameters
from tfwsgi.errors import ConfigError, DeadlineExceeded, InvalidArgument, Unavailable
from tfwsgi.manager import ModelManager
from tfwsgi.source import ModelConfig


class Model:
    """Doubles x; records every batch it is given."""

    def __init__(self, delay: float = 0.0, fail: bool = False, scalar_out: bool = False) -> None:
        self.batches: list[int] = []
        self.delay, self.fail, self.scalar_out = delay, fail, scalar_out

    def __call__(self, inputs):
        self.batches.append(inputs["x"].shape[0])
        time.sleep(self.delay)
        if self.fail:
            raise InvalidArgument("model says no")
        if self.scalar_out:
            return {"y": np.float32(1.0) * np.ones(())}
        return {"y": inputs["x"] * 2}


def concurrently(batcher, model, inputs_list, key="k"):
    results: list = [None] * len(inputs_list)
    errors: list = [None] * len(inputs_list)
    barrier = threading.Barrier(len(inputs_list))

    def call(i):
        barrier.wait()
        try:
            results[i] = batcher.run(key, inputs_list[i], model)
        except Exception as exc:
            errors[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs_list))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results, errors


def rows(n, start=0):
    return {"x": np.arange(start, start + n, dtype=np.float32).reshape(n, 1)}


def test_concurrent_requests_run_as_one_batch_and_get_their_own_rows():
    b = Batcher(BatchingParameters(max_batch_size=64, batch_timeout_micros=200_000))
    model = Model()
    inputs = [rows(i + 1, start=10 * i) for i in range(6)]
    results, errors = concurrently(b, model, inputs)
    assert errors == [None] * 6
    for inp, res in zip(inputs, results, strict=True):
        assert np.array_equal(res["y"], inp["x"] * 2)
    assert sum(model.batches) == 21 and len(model.batches) < 6


def test_batches_never_exceed_max_batch_size():
    b = Batcher(BatchingParameters(max_batch_size=4, batch_timeout_micros=100_000))
    model = Model()
    _results, errors = concurrently(b, model, [rows(1, i) for i in range(10)])
    assert errors == [None] * 10 and max(model.batches) <= 4 and sum(model.batches) == 10


def test_padding_to_allowed_sizes_is_invisible_to_callers():
    b = Batcher(BatchingParameters(max_batch_size=8, batch_timeout_micros=0, allowed_batch_sizes=(4, 8)))
    model = Model()
    out = b.run("k", rows(3), model)
    assert model.batches == [4] and out["y"].shape == (3, 1)
    assert np.array_equal(out["y"], rows(3)["x"] * 2)


def test_a_failed_batch_fails_every_waiter():
    b = Batcher(BatchingParameters(max_batch_size=64, batch_timeout_micros=200_000))
    _, errors = concurrently(b, Model(fail=True), [rows(1, i) for i in range(4)])
    assert [str(e) for e in errors] == ["model says no"] * 4


def test_outputs_without_a_batch_dimension_run_each_request_alone():
    # Nothing to split: each request gets what it gets without batching, not an error.
    b = Batcher(BatchingParameters(max_batch_size=64, batch_timeout_micros=200_000))
    model = Model(scalar_out=True)
    results, errors = concurrently(b, model, [rows(1, i) for i in range(3)])
    assert errors == [None] * 3 and [r["y"] for r in results] == [1.0] * 3
    assert sorted(model.batches)[-1] > 1 and model.batches.count(1) >= 3


def test_shapes_that_vary_are_batched_by_what_concatenates():
    """Declared shapes are not checked: a signature gets ranks and widths as the graph allows.
    Requests whose tensors concatenate share a batch; the others run in batches of their own."""
    b = Batcher(BatchingParameters(max_batch_size=64, batch_timeout_micros=200_000))
    model = Model()
    inputs = [{"x": np.arange(3, dtype=np.float32)}, {"x": np.arange(2, dtype=np.float32)},
              {"x": np.ones((2, 1), np.float32)}, {"x": np.ones((2, 2), np.float32)},
              {"x": np.ones((1, 2), np.float32)}, {"x": np.ones((1, 2, 3), np.float32)}]
    results, errors = concurrently(b, model, inputs)
    assert errors == [None] * 6
    for inp, res in zip(inputs, results, strict=True):
        assert np.array_equal(res["y"], inp["x"] * 2)
    assert sum(model.batches) == 11 and len(model.batches) < 6


def test_oversize_task_and_full_queue():
    b = Batcher(BatchingParameters(max_batch_size=2, batch_timeout_micros=0, max_enqueued_batches=1))
    with pytest.raises(InvalidArgument, match="Task size 3 is larger than maximum input batch size 2"):
        b.run("k", rows(3), Model())
    slow = Model(delay=0.5)
    _, errors = concurrently(b, slow, [rows(1, i) for i in range(8)])
    full = [e for e in errors if isinstance(e, Unavailable)]
    assert full and all("queue" in str(e) for e in full)
    assert all(e is None or isinstance(e, Unavailable) for e in errors)


def test_different_shapes_and_signatures_are_not_merged():
    b = Batcher(BatchingParameters(max_batch_size=64, batch_timeout_micros=100_000))
    model = Model()
    wide = {"x": np.ones((1, 3), np.float32)}
    results, errors = concurrently(b, model, [rows(1), wide])
    assert errors == [None, None] and sorted(model.batches) == [1, 1]
    assert results[1]["y"].shape == (1, 3)


def test_scalars_run_directly():
    b = Batcher(BatchingParameters())
    model = Model()
    out = b.run("k", {"x": np.float32(2.0) * np.ones(())}, lambda i: {"y": i["x"] + 1})
    assert out["y"] == 3.0 and model.batches == []


def test_parse_batching_parameters():
    p = parse_batching_parameters("""
        max_batch_size { value: 32 }
        batch_timeout_micros { value: 2000 }
        max_enqueued_batches { value: 100 }
        num_batch_threads { value: 2 }
        allowed_batch_sizes: 8
        allowed_batch_sizes: 32
    """)
    assert p == BatchingParameters(32, 2000, 100, 2, (8, 32), False)
    assert parse_batching_parameters("") == BatchingParameters()
    for bad, match in [("max_batch_size: 3", "Expected"),
                       ("max_batch_size { value: 32 } allowed_batch_sizes: 16", "must equal max_batch_size"),
                       ("max_batch_size { value: 0 }", "> 0"),
                       ("pad_variable_length_inputs: true", "not supported"),
                       ("enable_large_batch_splitting { value: true }", "not supported")]:
        with pytest.raises(ConfigError, match=match):
            parse_batching_parameters(bad)


def test_a_task_past_its_deadline_is_dropped_unrun_and_its_caller_answered_at_the_deadline():
    """One batch thread busy for 0.5 s: a task queued behind it with a 0.1 s deadline gets
    DeadlineExceeded at its deadline, and is not run when the thread frees up."""
    b = Batcher(BatchingParameters(max_batch_size=8, batch_timeout_micros=0))
    model = Model(delay=0.5)
    busy = threading.Thread(target=b.run, args=("k", rows(1), model))
    busy.start()
    time.sleep(0.1)  # the first batch is running
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        b.run("k", rows(2, start=5), model, deadline=time.monotonic() + 0.1)
    assert 0.09 < time.monotonic() - started < 0.3
    busy.join(5)
    time.sleep(0.1)
    assert model.batches == [1]  # the expired task never ran
    assert np.array_equal(b.run("k", rows(1), Model(), deadline=time.monotonic() + 5)["y"], [[0.0]])


# ------------------------------------------------------------------ the batcher forgets unloaded versions

class Servable:
    """A version with one signature; like a loaded SavedModel it lives in a reference cycle."""

    def __init__(self, name: str, version: int, path: str) -> None:
        self.name, self.version, self.me = name, version, self

    def run(self, inputs):
        return {"y": inputs["x"] * self.version}


def test_an_unloaded_version_is_freed_with_batching_on(tmp_path):
    """Regression: the batcher's per-signature queue kept the signature, and so the whole
    version with its weights, alive for as long as the worker lived."""
    (tmp_path / "m" / "1").mkdir(parents=True)
    manager = ModelManager([ModelConfig("m", str(tmp_path / "m"))], Servable)
    batcher = Batcher(BatchingParameters(max_batch_size=8))
    manager.add_listener(batcher)
    manager.load_all()
    servable = manager.servable("m")
    out = batcher.run(("m", 1, "serving_default"), rows(2), servable.run)
    assert np.array_equal(out["y"], [[0.0], [1.0]])
    held = weakref.ref(servable)
    del servable, out
    (tmp_path / "m" / "2").mkdir()
    manager.source.propose()
    assert manager.servable("m").version == 2
    gc.collect()
    assert held() is None
    assert ("m", 1, "serving_default") not in batcher._queues


def test_a_task_queued_for_an_unloaded_version_still_runs_then_its_queue_goes():
    b = Batcher(BatchingParameters(max_batch_size=4, batch_timeout_micros=300_000))
    model = Model()
    key = ("m", 1, "serving_default")
    results, errors = [], []

    def call():
        try:
            results.append(b.run(key, rows(1), model))
        except Exception as exc:
            errors.append(exc)

    t = threading.Thread(target=call)
    t.start()
    deadline = time.monotonic() + 5
    while key not in b._queues or not b._queues[key].tasks:  # queued, waiting for a full batch
        assert time.monotonic() < deadline
        time.sleep(0.001)
    b.unloaded("m", 1)
    b.unloaded("m", 7)  # another version's unload leaves it alone
    t.join(5)
    assert errors == [] and np.array_equal(results[0]["y"], [[0.0]])
    assert key not in b._queues


def test_only_the_unloaded_versions_queues_are_forgotten():
    b = Batcher(BatchingParameters())
    for key in [("m", 1, "a"), ("m", 1, "b"), ("m", 2, "a"), ("n", 1, "a"), "k"]:
        b.run(key, rows(1), Model())
    b.unloaded("m", 1)
    assert sorted(map(str, b._queues)) == sorted(map(str, [("m", 2, "a"), ("n", 1, "a"), "k"]))
