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

import ctypes
import ctypes.util
import logging
import os
import sys
from collections.abc import Mapping

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


def active() -> str:
    """The malloc this process runs on: ``jemalloc`` or ``system``."""
    return "jemalloc" if loaded(_maps()) else "system"
