"""Dynamic batching in a real threaded gunicorn worker."""

from __future__ import annotations

import threading

import pytest
import requests

from conftest import metric_total

pytestmark = pytest.mark.e2e


def test_concurrent_requests_are_batched_in_a_threaded_worker(start_server, model_root, tmp_path):
    params = tmp_path / "batching.config"
    params.write_text("max_batch_size { value: 32 }\nbatch_timeout_micros { value: 100000 }\n"
                      "num_batch_threads { value: 1 }\n")
    srv = start_server({"TFWSGI_MODEL_NAME": "hp", "TFWSGI_MODEL_BASE_PATH": str(model_root / "hp"),
                        "TFWSGI_ENABLE_BATCHING": "true",
                        "TFWSGI_BATCHING_PARAMETERS_FILE": str(params)},
                       workers=1, extra_args=("-k", "gthread", "--threads", "8"))
    srv.wait_ready()
    barrier = threading.Barrier(8)
    answers: dict[int, object] = {}

    def call(i: int) -> None:
        barrier.wait()
        r = requests.post(srv.url + "/v1/models/hp:predict", json={"instances": [float(i), 1.0]},
                          headers={"Cache-Control": "no-store"}, timeout=30)
        answers[i] = r.json()

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert answers == {i: {"predictions": [0.5 * i + 4.0, 4.5]} for i in range(8)}
    text = srv.get("/metrics").text
    batches = metric_total(text, "tfwsgi_batch_size_count")
    assert metric_total(text, "tfwsgi_batch_size_sum") == 16  # every row, once
    assert 1 <= batches < 8, batches


def test_bad_batching_parameters_stop_the_worker_with_a_clear_message(start_server, model_root, tmp_path):
    params = tmp_path / "batching.config"
    params.write_text("max_batch_size: 32\n")
    srv = start_server({"TFWSGI_MODEL_NAME": "hp", "TFWSGI_MODEL_BASE_PATH": str(model_root / "hp"),
                        "TFWSGI_ENABLE_BATCHING": "true",
                        "TFWSGI_BATCHING_PARAMETERS_FILE": str(params)}, workers=1)
    assert srv.proc.wait(timeout=60) != 0
    assert "max_batch_size" in srv.log()
