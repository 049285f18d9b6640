"""No CUDA lines in the log of a machine without an NVIDIA driver.

The TensorFlow wheel is built with CUDA and probes for it twice, writing to file descriptor 2
whatever TF_CPP_MIN_LOG_LEVEL says:
- at ``import tensorflow``: ``I… cudart_stub.cc:31] Could not find cuda drivers on your machine,
  GPU will not be used.`` — logged through absl before ``absl::InitializeLog()``, which writes every
  message to stderr (TF_CPP_MIN_LOG_LEVEL=3 does not hide it);
- when the runtime starts (device discovery): ``E… cuda_platform.cc:52] failed call to cuInit: …``
  — an ERROR, which only TF_CPP_MIN_LOG_LEVEL=3 would hide, with every other error of TensorFlow.
CUDA_VISIBLE_DEVICES="" or "-1" does not help either: cuInit is still called, and still fails.

So, only on a machine without an NVIDIA driver (no ``/proc/driver/nvidia``), the two probes run
with descriptor 2 sent to a temporary file, and every line of it is written back except the CUDA
ones. Where a driver is loaded nothing is touched: TensorFlow finds and uses the GPUs, and says so.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

NVIDIA_DRIVER = "/proc/driver/nvidia"
CUDA_LINE = re.compile(rb"cuda|cuinit|cudart", re.IGNORECASE)


def has_nvidia_driver() -> bool:
    """Whether the NVIDIA kernel driver is loaded (then TensorFlow may use a GPU)."""
    return os.path.exists(NVIDIA_DRIVER)


def without_cuda_lines(text: bytes) -> bytes:
    return b"".join(line for line in text.splitlines(keepends=True) if not CUDA_LINE.search(line))


@contextmanager
def quiet_cuda_probe(driver: bool | None = None) -> Iterator[None]:
    """Run the block with TensorFlow's CUDA lines left out of stderr, unless a driver is present.
    Other threads' stderr output during the block is written out (in order) when it ends."""
    if has_nvidia_driver() if driver is None else driver:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = without_cuda_lines(captured.read())
            if kept:
                os.write(2, kept)
