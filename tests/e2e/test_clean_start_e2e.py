"""A CPU-only machine starts clean: no CUDA line in the log of the real server (master and
workers), from start to a served predict. See tfwsgi/cudalog.py for where the lines come from."""

from __future__ import annotations

import re

import pytest

from tfwsgi.cudalog import has_nvidia_driver

pytestmark = pytest.mark.e2e

CUDA = re.compile(r"cuda|cuinit|cudart", re.IGNORECASE)


@pytest.mark.skipif(has_nvidia_driver(), reason="an NVIDIA driver is loaded: TensorFlow may use the GPU")
def test_no_cuda_lines_in_the_log(start_server, model_config):
    # Everything TensorFlow logs (TF_CPP_MIN_LOG_LEVEL=0), and TensorFlow imported in the master
    # (the default) as well as started in the worker.
    srv = start_server({"TFWSGI_MODEL_CONFIG_FILE": str(model_config), "TF_CPP_MIN_LOG_LEVEL": "0"},
                       workers=1)
    srv.wait_ready()
    r = srv.post("/v1/models/hp/versions/1:predict", json={"instances": [1.0]})
    assert r.json() == {"predictions": [2.5]}
    log = srv.log()
    assert "TensorFlow imported in the master" in log
    assert re.search(r"worker \d+ ready", log)
    assert "oneDNN" in log or "cpu_feature_guard" in log  # TensorFlow's own lines are still there
    assert not [line for line in log.splitlines() if CUDA.search(line)], log[-3000:]
