"""ModelService.HandleReloadConfigRequest end to end: real ``gunicorn -c gunicorn_conf.py
tfwsgi:app`` (2 workers) on TFWSGI_PORT, called with tensorflow-serving-api's ModelServiceStub.
The call lands in one worker; the new config must be in force in both when it returns."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import (
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2
from test_grpc_e2e import _connection_owners

from conftest import Server, free_port

pytestmark = pytest.mark.e2e

OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]  # a channel with a connection of its own


def _config(root: Path, *names: str, base_paths: dict[str, str] | None = None) -> str:
    paths = {name: str(root / name) for name in names} | (base_paths or {})
    body = "".join(f'  config {{ name: "{n}" base_path: "{p}" model_platform: "tensorflow" }}\n'
                   for n, p in paths.items())
    return f"model_config_list {{\n{body}}}\n"


def _request(name: str) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    if name == "keras":
        request.inputs["features"].CopyFrom(tf.make_tensor_proto(np.ones((1, 4), np.float32)))
    elif name == "multi":
        request.model_spec.signature_name = "scalar"
        request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.float32(2.0)))
    else:  # hp (half_plus_two)
        request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([1.0, 2.0, 5.0], np.float32)))
    return request


class Reloadable:
    def __init__(self, server: Server, port: int, root: Path) -> None:
        self.server, self.port, self.root = server, port, root

    def reload(self, text: str, timeout: float = 60) -> model_management_pb2.ReloadConfigResponse:
        request = model_management_pb2.ReloadConfigRequest()
        text_format.Parse(text, request.config)
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            return model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(
                request, timeout=timeout)

    def on_every_connection(self, name: str, count: int = 24) -> list[str]:
        """Predict on ``name`` over at least ``count`` fresh connections (SO_REUSEPORT spreads them
        over the workers by a hash of the client's port), opening more, up to 64, until both workers
        hold one: with 4 connections all land on one worker one time in eight. Each answer's status."""
        channels: list[grpc.Channel] = []
        results = []
        pids = self.server.worker_pids()
        before = _connection_owners(self.port, pids)  # the load's connections, if any
        try:
            while True:
                channel = grpc.insecure_channel(f"127.0.0.1:{self.port}", options=OWN_CONNECTION)
                channels.append(channel)
                stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
                try:
                    response = stub.Predict(_request(name), timeout=30)
                    results.append(f"OK {response.model_spec.name}")
                except grpc.RpcError as exc:
                    results.append(f"{exc.code().name}: {exc.details()}")
                if len(channels) < count:
                    continue
                now = _connection_owners(self.port, pids)
                owners = {pid: now[pid] - before[pid] for pid in pids}
                if len(owners) == 2 and all(n > 0 for n in owners.values()):
                    break  # both workers answered one of these connections
                assert len(channels) < 64, owners
        finally:
            for channel in channels:
                channel.close()
        return results


@pytest.fixture(scope="module")
def served(model_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reloadable]:
    config = tmp_path_factory.mktemp("reload") / "models.config"
    config.write_text(_config(model_root, "keras", "multi"))
    port = free_port()
    srv = Server({"TFWSGI_MODEL_CONFIG_FILE": str(config), "TFWSGI_PORT": str(port)},
                 log_path=tmp_path_factory.mktemp("logs") / "grpc-reload.log")
    try:
        srv.wait_ready()
        yield Reloadable(srv, port, model_root)
    finally:
        srv.stop()


def _under_load(port: int, clients: int, body: Callable[[], None]) -> tuple[int, list[str]]:
    """Run ``body`` while ``clients`` threads, each on a connection of its own, call Predict on
    keras without pause; the calls answered and the failures."""
    done = threading.Event()
    answered = [0] * clients
    failures: list[str] = []

    def load(i: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=OWN_CONNECTION) as channel:
            stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            while not done.is_set():
                try:
                    stub.Predict(_request("keras"), timeout=30)
                    answered[i] += 1
                except grpc.RpcError as exc:
                    failures.append(f"{exc.code().name}: {exc.details()}")

    threads = [threading.Thread(target=load, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 30
        while min(answered) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)  # every client is connected and answered before the reload
        body()
        served = sum(answered)
        deadline = time.monotonic() + 30
        while sum(answered) < served + 20 and time.monotonic() < deadline:
            time.sleep(0.05)  # and goes on being answered after it
    finally:
        done.set()
        for t in threads:
            t.join(timeout=60)
    return sum(answered), failures


def test_a_reload_adds_and_removes_models_in_both_workers_under_load(served: Reloadable) -> None:
    assert set(served.on_every_connection("multi", 4)) == {"OK multi"}  # hp is not configured yet
    returned: list[float] = []

    def reload() -> None:
        started = time.monotonic()
        response = served.reload(_config(served.root, "keras", "hp"))  # multi leaves, hp comes
        returned.append(time.monotonic() - started)
        assert response.status.error_code == 0, response.status.error_message
        # Right after the call returns: hp answers on every connection, in both workers, and multi
        # is TF Serving's NOT_FOUND everywhere.
        assert set(served.on_every_connection("hp")) == {"OK hp"}
        assert set(served.on_every_connection("multi")) == {
            "NOT_FOUND: Servable not found for request: Latest(multi)"}

    answered, failures = _under_load(served.port, clients=4, body=reload)
    assert not failures, failures[:5]
    assert answered > 40 and returned
    pids = served.server.worker_pids()
    log = served.server.log()
    assert all(f"pid {pid} applied model config 1" in log for pid in pids), log[-3000:]


def test_an_unsupported_config_is_invalid_argument(served: Reloadable) -> None:
    request = model_management_pb2.ReloadConfigRequest(config=model_server_config_pb2.ModelServerConfig())
    with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel, pytest.raises(grpc.RpcError) as info:
        model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == ("ServerModelConfig type not supported by HandleReloadConfigRequest. "
                                    "Only ModelConfigList is currently supported")


def test_a_bad_base_path_is_an_error_and_serving_models_keep_serving(served: Reloadable) -> None:
    bad = _config(served.root, "keras", base_paths={"new": "/no/such/models/new"})
    with pytest.raises(grpc.RpcError) as info:
        served.reload(bad)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("Could not find base path /no/such/models/new for servable new")
    assert set(served.on_every_connection("hp")) == {"OK hp"}  # the config in force is unchanged
    assert set(served.on_every_connection("keras")) == {"OK keras"}


def test_a_worker_started_later_starts_from_the_reloaded_config(served: Reloadable) -> None:
    """A SIGKILLed worker's replacement loads the config last reloaded (keras, hp), not the file's
    (keras, multi)."""
    before = served.server.worker_pids()
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while True:
        pids = served.server.worker_pids()
        fresh = pids - before
        if len(pids) == 2 and fresh and set(served.server.ready_pids()) & fresh:
            break
        assert time.monotonic() < deadline, served.server.log()[-3000:]
        time.sleep(0.2)
    assert set(served.on_every_connection("hp")) == {"OK hp"}
    assert set(served.on_every_connection("multi")) == {
        "NOT_FOUND: Servable not found for request: Latest(multi)"}
