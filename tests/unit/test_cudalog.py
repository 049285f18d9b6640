"""The filter that keeps TensorFlow's CUDA probe out of a CPU-only machine's log."""

from __future__ import annotations

import os

from tfwsgi import cudalog

PROBE = (b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
         b"I0000 00:00:1 8772 port.cc:153] oneDNN custom operations are on.\n"
         b"I0000 00:00:1 8772 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will"
         b" not be used.\n"
         b"E0000 00:00:1 8772 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error\n"
         b"something else\n")


def test_without_cuda_lines_keeps_the_rest():
    assert cudalog.without_cuda_lines(PROBE) == (
        b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
        b"I0000 00:00:1 8772 port.cc:153] oneDNN custom operations are on.\n"
        b"something else\n")


def test_quiet_cuda_probe_filters_descriptor_2_without_a_driver(capfd):
    with cudalog.quiet_cuda_probe(driver=False):
        os.write(2, PROBE)
    err = capfd.readouterr().err
    assert "cuda" not in err.lower() and "oneDNN" in err and "something else" in err


def test_quiet_cuda_probe_leaves_a_gpu_machine_alone(capfd):
    with cudalog.quiet_cuda_probe(driver=True):
        os.write(2, PROBE)
    assert capfd.readouterr().err == PROBE.decode()


def test_the_driver_is_looked_for_where_nvidia_puts_it(monkeypatch, tmp_path):
    monkeypatch.setattr(cudalog, "NVIDIA_DRIVER", str(tmp_path / "nvidia"))
    assert not cudalog.has_nvidia_driver()
    (tmp_path / "nvidia").mkdir()
    assert cudalog.has_nvidia_driver()
