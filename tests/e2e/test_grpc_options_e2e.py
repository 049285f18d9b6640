"""TF Serving's gRPC options end to end, on one real ``gunicorn -c gunicorn_conf.py tfwsgi:app``
(one worker, so every call meets the same server): the health service (grpc_health.v1's own
stubs), --grpc_channel_arguments lowering the message limit, --grpc_max_threads, and
--enable_serialization_as_tensor_content, with tensorflow-serving-api's stubs."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from conftest import Server, free_port

pytestmark = pytest.mark.e2e

BATCH_WAIT_S = 1.5  # a lone predict waits this long in the batcher for company
LIMIT = 64 * 1024  # grpc.max_receive_message_length set by the channel argument


class Rpc:
    def __init__(self, server: Server, port: int, config: Path, root: Path) -> None:
        self.server, self.config, self.root = server, config, root
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.predict = prediction_service_pb2_grpc.PredictionServiceStub(self.channel).Predict
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def status(self, service: str) -> str:
        try:
            got = self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
        except grpc.RpcError as exc:
            return exc.code().name
        return health_pb2.HealthCheckResponse.ServingStatus.Name(got.status)


def write_config(path: Path, root: Path, names: tuple[str, ...]) -> None:
    body = "".join(f'  config {{ name: "{n}" base_path: "{root}/{n}" model_platform: "tensorflow" }}\n'
                   for n in names)
    path.write_text("model_config_list {\n" + body + "}\n")


@pytest.fixture(scope="module")
def rpc(model_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rpc]:
    tmp = tmp_path_factory.mktemp("grpc-options")
    config = tmp / "models.config"
    write_config(config, model_root, ("hp", "multi"))
    params = tmp / "batching.txt"
    params.write_text(f"max_batch_size {{ value: 65536 }}\n"
                      f"batch_timeout_micros {{ value: {int(BATCH_WAIT_S * 1e6)} }}\n")
    port = free_port()
    srv = Server({"TFWSGI_MODEL_CONFIG_FILE": str(config),
                  "TFWSGI_MODEL_CONFIG_FILE_POLL_WAIT_SECONDS": "1",
                  "TFWSGI_PORT": str(port),
                  "TFWSGI_ENABLE_GRPC_HEALTHCHECK_SERVICE": "true",
                  "TFWSGI_ENABLE_SERIALIZATION_AS_TENSOR_CONTENT": "true",
                  "TFWSGI_GRPC_CHANNEL_ARGUMENTS": f"grpc.max_receive_message_length={LIMIT}",
                  "TFWSGI_GRPC_MAX_THREADS": "1",
                  "TFWSGI_ENABLE_BATCHING": "true",
                  "TFWSGI_BATCHING_PARAMETERS_FILE": str(params)},
                 workers=1, log_path=tmp / "gunicorn.log")
    client = None
    try:
        srv.wait_ready()
        client = Rpc(srv, port, config, model_root)
        yield client
    finally:
        if client is not None:
            client.channel.close()
        srv.stop()


def predict_request(x: np.ndarray) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "hp"
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(x))
    return request


def test_health_is_serving_after_start_and_not_found_for_an_unknown_name(rpc: Rpc) -> None:
    assert [rpc.status(s) for s in ("", "ModelService", "PredictionService", "hp", "multi")] == [
        "SERVING"] * 5
    assert rpc.status("no-such-model") == "NOT_FOUND"


def test_answers_carry_tensor_content_with_rest_s_values(rpc: Rpc) -> None:
    x = np.array([1.0, 2.0, 5.0], dtype=np.float32)
    y = rpc.predict(predict_request(x), timeout=30).outputs["y"]
    assert y.tensor_content and not y.float_val
    rest = rpc.server.post("/v1/models/hp:predict", json={"instances": x.tolist()}).json()
    assert tf.make_ndarray(y).tolist() == rest["predictions"] == [4.5, 5.0, 6.5]  # hp 3: b=4


def test_a_channel_argument_lowers_the_message_limit(rpc: Rpc) -> None:
    big = np.ones(LIMIT // 4 + 1024, dtype=np.float32)  # over 64 KiB of tensor_content
    with pytest.raises(grpc.RpcError) as info:
        rpc.predict(predict_request(big), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    small = np.ones(LIMIT // 8, dtype=np.float32)  # 32 KiB: fine, and the worker still answers
    y = tf.make_ndarray(rpc.predict(predict_request(small), timeout=30).outputs["y"])
    assert y.shape == small.shape and float(y[0]) == 4.5


def test_grpc_max_threads_bounds_the_calls_in_progress(rpc: Rpc) -> None:
    """With one gRPC thread, a second call cannot join the first in the batcher: it waits for
    the thread, then for its own batch (with more threads both would share one batch)."""
    def call(i: int) -> float:
        x = np.array([10.0 + i], dtype=np.float32)  # not the same body: no cache hit
        rpc.predict(predict_request(x), timeout=30)
        return time.monotonic()

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        ends = list(pool.map(call, range(2)))
    assert max(ends) - started >= 2 * BATCH_WAIT_S * 0.9, [e - started for e in ends]


def test_a_model_s_health_follows_a_config_reload_that_removes_it(rpc: Rpc) -> None:
    write_config(rpc.config, rpc.root, ("hp",))
    deadline = time.monotonic() + 30
    while rpc.status("multi") != "NOT_SERVING":
        assert time.monotonic() < deadline, "multi still serving 30 s after it left the config"
        time.sleep(0.2)
    assert [rpc.status(s) for s in ("", "hp")] == ["SERVING", "SERVING"]  # every configured model up


def test_health_is_not_serving_as_soon_as_the_worker_is_told_to_stop(rpc: Rpc) -> None:
    """SIGTERM (a stop, a reload retiring the worker): a watcher hears NOT_SERVING at once, while
    the worker still finishes the REST request it holds, not only when the worker exits. Last in
    this module: the worker it stops is replaced by a new one."""
    watch = rpc.health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    (worker,) = rpc.server.worker_pids()
    done: dict[str, float] = {}

    def rest() -> int:
        answer = rpc.server.post("/v1/models/hp:predict", json={"instances": [7.0]})  # waits in the batcher
        done["rest"] = time.monotonic()
        return answer.status_code

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(rest)
        time.sleep(BATCH_WAIT_S / 3)  # the request is in the batcher's window now
        os.kill(worker, signal.SIGTERM)
        status = next(watch).status
        done["health"] = time.monotonic()
        assert in_flight.result() == 200
    watch.cancel()
    assert status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert done["health"] < done["rest"]
