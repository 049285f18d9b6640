"""In-worker dynamic batching with TF Serving's parameters: merge concurrent requests, run once, split.

Requests on the same signature that arrive within ``batch_timeout_micros`` of each other are
concatenated along the 0th dimension (up to ``max_batch_size`` rows, padded up to the next of
``allowed_batch_sizes``), run once, and each gets its own rows back; if the run fails, every
waiter gets the error. Only requests whose tensors concatenate are merged (same names, dtypes and
dimensions after the 0th; scalars and inputs of different 0th dimensions run on their own): the
shapes a signature declares are not checked, so shapes vary as the graph allows. (TF Serving's
batching session refuses tensors of one name whose shapes differ after the 0th dimension unless
``pad_variable_length_inputs``; here they are batched apart instead.) When
``max_enqueued_batches`` batches are already waiting, a request is refused as TF Serving refuses
it (UNAVAILABLE, 503). Batching helps when a worker has several
requests in flight at once: the default worker class runs ``threads`` requests at once.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import textformat
from .errors import DEADLINE_MESSAGE, ConfigError, DeadlineExceeded, InvalidArgument, Unavailable
from .manager import Listener

Tensors = dict[str, np.ndarray]
Run = Callable[[Mapping[str, np.ndarray]], Tensors]


@dataclass(frozen=True)
class BatchingParameters:
    """TF Serving's ``BatchingParameters`` (session_bundle_config.proto), with its defaults."""

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = 1
    allowed_batch_sizes: tuple[int, ...] = ()
    pad_variable_length_inputs: bool = False

    def validate(self) -> BatchingParameters:
        if self.max_batch_size <= 0:
            raise ConfigError("batching: max_batch_size must be > 0")
        if self.batch_timeout_micros < 0 or self.max_enqueued_batches <= 0 or self.num_batch_threads <= 0:
            raise ConfigError("batching: batch_timeout_micros must be >= 0, max_enqueued_batches and "
                              "num_batch_threads > 0")
        sizes = self.allowed_batch_sizes
        if sizes:
            if list(sizes) != sorted(set(sizes)) or sizes[0] <= 0:
                raise ConfigError("batching: allowed_batch_sizes must be positive and increasing")
            if sizes[-1] != self.max_batch_size:
                raise ConfigError("batching: the last allowed_batch_sizes entry must equal max_batch_size")
        if self.pad_variable_length_inputs:
            raise ConfigError("batching: pad_variable_length_inputs is not supported yet")
        return self


def parse_batching_parameters(text: str, origin: str = "<batching>") -> BatchingParameters:
    """Read TF Serving's batching parameters text format (``max_batch_size { value: 32 }`` …)."""
    msg = textformat.parse(textformat.batching_parameters(), text, origin)
    if msg.HasField("enable_large_batch_splitting") and msg.enable_large_batch_splitting.value:
        raise ConfigError(f"{origin}: enable_large_batch_splitting is not supported yet")
    defaults = BatchingParameters()
    values: dict[str, Any] = {}
    for name in ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads"):
        values[name] = getattr(msg, name).value if msg.HasField(name) else getattr(defaults, name)
    values["allowed_batch_sizes"] = tuple(msg.allowed_batch_sizes)
    values["pad_variable_length_inputs"] = msg.pad_variable_length_inputs
    return BatchingParameters(**values).validate()


def _held_lock() -> threading.Lock:
    lock = threading.Lock()
    lock.acquire()
    return lock


@dataclass(eq=False)  # tasks are removed from a deque by identity: never compare their arrays
class _Task:
    inputs: Mapping[str, np.ndarray]
    run: Run  # the signature: a task, not its queue, holds the servable (and its weights)
    rows: int
    shape_key: tuple
    deadline: float = float("inf")  # time.monotonic(): past it, the task is dropped unrun
    # Released once the result or error is in: a bare lock, where an Event's Python-level
    # condition costs twice as much per hand-over (measured: 15-19 µs against 27-31 µs).
    done: threading.Lock = field(default_factory=_held_lock)
    result: Tensors | None = None
    error: BaseException | None = None


class _Queue:
    """The tasks waiting for one signature."""

    def __init__(self) -> None:
        self.tasks: deque[_Task] = deque()
        self.rows = 0
        self.unloaded = False  # its version was unloaded: forgotten once its tasks are taken


class Batcher(Listener):
    """One per worker: a queue per signature, ``num_batch_threads`` threads that run batches.
    It listens to the model manager and forgets the queues of a version once it is unloaded."""

    def __init__(self, params: BatchingParameters,
                 on_batch: Callable[[int, int], None] | None = None,
                 on_queue: Callable[[int], None] | None = None) -> None:
        self.params = params
        self._on_queue = on_queue  # change in the number of waiting requests (+1, -batch)
        self._queues: dict[Hashable, _Queue] = {}
        self._cond = threading.Condition()
        self._on_batch = on_batch  # (rows, padded rows) of each batch run
        self._threads = [threading.Thread(target=self._loop, name=f"tfwsgi-batch-{i}", daemon=True)
                         for i in range(params.num_batch_threads)]
        for t in self._threads:
            t.start()

    def run(self, key: Hashable, inputs: Mapping[str, np.ndarray], run: Run,
            deadline: float | None = None) -> Tensors:
        """Run ``inputs`` as part of a batch of concurrent requests on the same ``key`` (``(model
        name, version, signature name)``: ``unloaded`` forgets a version's keys); past ``deadline``
        (``time.monotonic()``) the caller gets DeadlineExceeded, and a task still queued then is
        dropped before it runs."""
        rows = {a.shape[0] if a.ndim else -1 for a in inputs.values()}
        if len(rows) != 1 or -1 in rows:
            return run(inputs)  # scalars or ragged batch dimensions: nothing to merge on
        n = rows.pop()
        if n > self.params.max_batch_size:
            raise InvalidArgument(
                f"Task size {n} is larger than maximum input batch size {self.params.max_batch_size}")
        task = _Task(inputs, run, n, tuple(sorted((k, a.dtype.str, a.shape[1:]) for k, a in inputs.items())),
                     float("inf") if deadline is None else deadline)
        limit = self.params.max_enqueued_batches * self.params.max_batch_size
        with self._cond:
            queue = self._queues.get(key)
            if queue is None:
                queue = self._queues[key] = _Queue()
            if queue.rows + n > limit:
                raise Unavailable("The batch scheduling queue to which this task was submitted is full")
            queue.tasks.append(task)
            queue.rows += n
            if self._on_queue is not None:
                self._on_queue(1)
            self._cond.notify()
        if deadline is None:
            task.done.acquire()
        elif not task.done.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise DeadlineExceeded(DEADLINE_MESSAGE)  # the batch, if it runs, is not waited for
        if task.error is not None:
            raise task.error
        assert task.result is not None
        return task.result

    def unloaded(self, name: str, version: int) -> None:
        """Forget the queues of an unloaded version (tasks already queued still run)."""
        with self._cond:
            for key, queue in list(self._queues.items()):
                if isinstance(key, tuple) and key[:2] == (name, version):
                    queue.unloaded = True
                    if not queue.tasks:
                        del self._queues[key]

    def _requeue(self, key: Hashable, queue: _Queue) -> None:
        """After taking from ``queue``: to the back of the line (fairness between signatures), or
        forgotten if its version was unloaded and nothing is left in it."""
        if self._queues.get(key) is queue:
            del self._queues[key]
            if queue.tasks or not queue.unloaded:
                self._queues[key] = queue

    def _take(self) -> list[_Task]:
        """Wait for work, then for a full batch or the timeout of its oldest task."""
        timeout = self.params.batch_timeout_micros / 1e6
        with self._cond:
            while True:
                ready = [(k, q) for k, q in self._queues.items() if q.tasks]
                if not ready:
                    self._cond.wait()
                    continue
                key, queue = ready[0]
                deadline = time.monotonic() + timeout
                while queue.tasks and queue.rows < self.params.max_batch_size:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                if not queue.tasks:  # another batch thread took them
                    continue
                now = time.monotonic()
                for task in [t for t in queue.tasks if t.deadline <= now]:
                    queue.tasks.remove(task)  # its deadline passed while it waited: not run
                    queue.rows -= task.rows
                    if self._on_queue is not None:
                        self._on_queue(-1)
                    task.error = DeadlineExceeded(DEADLINE_MESSAGE)
                    task.done.release()
                if not queue.tasks:
                    self._requeue(key, queue)
                    continue
                first = queue.tasks[0]
                batch, rows = [], 0
                for task in list(queue.tasks):
                    if task.shape_key != first.shape_key:
                        continue  # a different shape waits for a batch of its own
                    if rows + task.rows > self.params.max_batch_size:
                        break
                    batch.append(task)
                    rows += task.rows
                for task in batch:
                    queue.tasks.remove(task)
                queue.rows -= rows
                if self._on_queue is not None:
                    self._on_queue(-len(batch))
                self._requeue(key, queue)
                return batch

    def _loop(self) -> None:
        while True:  # no batch is held here between batches: a task holds its servable
            self._serve(self._take())

    def _serve(self, batch: list[_Task]) -> None:
        try:
            self._run_batch(batch)
        except BaseException as exc:  # fan the failure out to every waiter
            for task in batch:
                task.error = exc
        finally:
            for task in batch:
                task.done.release()

    def _run_alone(self, task: _Task) -> None:
        try:
            task.result = task.run(task.inputs)
        except BaseException as exc:
            task.error = exc
        if self._on_batch:
            self._on_batch(task.rows, task.rows)

    def _padded(self, rows: int) -> int:
        for size in self.params.allowed_batch_sizes:
            if size >= rows:
                return size
        return rows

    def _run_batch(self, batch: list[_Task]) -> None:
        if len(batch) == 1 and not self.params.allowed_batch_sizes:
            batch[0].result = batch[0].run(batch[0].inputs)
            if self._on_batch:
                self._on_batch(batch[0].rows, batch[0].rows)
            return
        rows = sum(t.rows for t in batch)
        padded = self._padded(rows)
        merged = {}
        for name in batch[0].inputs:
            parts = [t.inputs[name] for t in batch]
            if padded > rows:  # repeat the last row, as TF Serving pads
                last = parts[-1][-1:]
                parts.append(np.repeat(last, padded - rows, axis=0))
            merged[name] = np.concatenate(parts, axis=0)
        outputs = batch[0].run(merged)
        if any(out.ndim == 0 or out.shape[0] != padded for out in outputs.values()):
            # No rows to split (the signature reduces over its batch, or its outputs do not follow
            # its inputs' 0th dimension: declared shapes are not checked, so any graph gets here).
            # Each request then runs on its own and gets what it would get without batching,
            # whatever else was in flight.
            for task in batch:
                self._run_alone(task)
            return
        if self._on_batch:
            self._on_batch(rows, padded)
        start = 0
        for task in batch:
            task.result = {name: out[start:start + task.rows] for name, out in outputs.items()}
            start += task.rows
