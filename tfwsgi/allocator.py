"""jemalloc for every gunicorn process, so a swapped-out model version's memory goes back.

With glibc's malloc, and TensorFlow pooling its large tensors in oneDNN's allocator (a BFC that
never gives a region back), each worker keeps the extra memory a version swap needs (the new
version loads while the old one serves) for good: a step of about one model's weights per worker
(measured: bench/swap_memory.py). With jemalloc preloaded and TensorFlow told to allocate through
it (``TF_ONEDNN_USE_SYSTEM_ALLOCATOR``), the old version's pages are purged once it is unloaded.

A library replaces malloc only if it is loaded before the program starts (``LD_PRELOAD``), so
gunicorn's master, reading ``gunicorn_conf.py``, starts itself again with it: same PID, same
arguments, the environment it was given plus the preload. Nothing has been bound, forked or
imported (TensorFlow included) at that point.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
import sys
import threading
import weakref
from collections.abc import Mapping
from typing import Any

from .manager import Listener

log = logging.getLogger("tfwsgi")

LIBRARY = "jemalloc"
TRIED_ENV = "TFWSGI_JEMALLOC_TRIED"  # set on the re-exec: never try twice
TF_ENV = "TF_ONEDNN_USE_SYSTEM_ALLOCATOR"


def loaded(maps: str) -> bool:
    """Whether /proc/self/maps (its text) shows jemalloc in this process."""
    return any("libjemalloc" in line for line in maps.splitlines())


def exec_environment(environ: Mapping[str, str], library: str | None) -> dict[str, str] | None:
    """The environment to start the master (not yet on jemalloc) again with, or None when it
    cannot: no library, or this is already the second start."""
    if library is None or environ.get(TRIED_ENV):
        return None
    preload = " ".join(p for p in (library, environ.get("LD_PRELOAD", "")) if p)
    return {**environ, "LD_PRELOAD": preload, TRIED_ENV: "1"}


def _maps() -> str:
    try:
        with open("/proc/self/maps") as f:
            return f.read()
    except OSError:
        return ""


def use_jemalloc(choice: str, environ: Mapping[str, str]) -> None:
    """gunicorn's master, reading its config: start again with jemalloc preloaded if it should
    and can (``environ`` is the environment it was started with); once jemalloc is in, have
    TensorFlow allocate through it."""
    is_loaded = loaded(_maps())
    if choice == "jemalloc" and not is_loaded:
        library = ctypes.util.find_library(LIBRARY)
        env = exec_environment(environ, library)
        if env is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            os.execve(sys.executable, sys.orig_argv, env)
        log.warning("tfwsgi: TFWSGI_MEMORY_ALLOCATOR=jemalloc but %s; using the system malloc "
                    "(install libjemalloc2)",
                    "libjemalloc.so.2 was not found" if library is None else "preloading it failed")
    if is_loaded:
        os.environ.setdefault(TF_ENV, "true")


_ARENAS_ALL = 4096  # jemalloc's MALLCTL_ARENAS_ALL


def release_free_memory() -> None:
    """Hand freed memory back to the system now, so an unloaded version's pages leave the
    worker's resident size: jemalloc purges its arenas (it would, after ``dirty_decay_ms``, only
    as allocations go on); glibc trims its heap (it would keep the pages otherwise)."""
    try:
        process = ctypes.CDLL(None)
    except OSError:  # pragma: no cover - no dynamic loader
        return
    mallctl = getattr(process, "mallctl", None)
    if mallctl is not None:  # jemalloc is preloaded
        mallctl(f"arena.{_ARENAS_ALL}.purge".encode(), None, None, None, ctypes.c_size_t(0))
        return
    trim = getattr(process, "malloc_trim", None)
    if trim is not None:  # glibc
        trim(0)


class MemoryRelease(Listener):
    """Frees an unloaded version's memory as the manager announces the unload: a full collection
    (a loaded SavedModel is a web of reference cycles — graphs, functions, variables — that only
    it frees), then ``release_free_memory``. A version still held by a request in flight is
    collected again ``first_retry`` seconds later, then 2, 4 … times that up to ``last_retry``
    (1 … 64 s), in a thread of its own that ends when nothing unloaded is left alive, and after
    that left to Python's own collections."""

    def __init__(self, first_retry: float = 1.0, last_retry: float = 64.0) -> None:
        self._first, self._last = first_retry, last_retry
        self._serving: dict[tuple[str, int], weakref.ref[Any]] = {}
        self._unloaded: list[weakref.ref[Any]] = []  # unloaded, not yet freed
        self._lock = threading.Lock()
        self._again = threading.Event()  # a new unload: the retries start over
        self._retrier: threading.Thread | None = None

    def loaded(self, name: str, version: int, servable: Any) -> None:
        with contextlib.suppress(TypeError):  # no weak reference: collected at its unload only
            self._serving[(name, version)] = weakref.ref(servable)

    def unloaded(self, name: str, version: int) -> None:
        ref = self._serving.pop((name, version), None)
        with self._lock:
            if ref is not None:
                self._unloaded.append(ref)
        if self._collect():
            with self._lock:
                if self._retrier is None:
                    self._retrier = threading.Thread(target=self._retry, name="tfwsgi-memory-release",
                                                     daemon=True)
                    self._retrier.start()
                else:
                    self._again.set()

    def _collect(self) -> bool:
        """Collect and hand memory back; whether an unloaded version is still alive."""
        gc.collect()
        release_free_memory()
        with self._lock:
            self._unloaded = [ref for ref in self._unloaded if ref() is not None]
            return bool(self._unloaded)

    def _retry(self) -> None:
        wait = self._first
        while True:
            if self._again.wait(wait):
                self._again.clear()
                wait = self._first
                continue
            alive = self._collect()
            wait *= 2
            with self._lock:
                if self._again.is_set():
                    continue
                if not alive or wait > self._last:
                    self._unloaded.clear()
                    self._retrier = None
                    return


def active() -> str:
    """The malloc this process runs on: ``jemalloc`` or ``system``."""
    return "jemalloc" if loaded(_maps()) else "system"
