"""tfwsgi.reloads: HandleReloadConfigRequest's checks (TF Serving's messages), the directory
through which workers share a reload, and the call itself in process over the fakes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_status_pb2,
    model_management_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from tensorflow_serving.config import model_server_config_pb2

from fakes import FakeModel, half_plus_two, make_app
from tfwsgi import grpc_api, reloads
from tfwsgi.errors import Code, DeadlineExceeded, InvalidArgument, NotFound, TFWSGIError
from tfwsgi.reloads import Applied


def _text(*models: tuple[str, str]) -> str:
    body = "".join(f'  config {{ name: "{n}" base_path: "{p}" model_platform: "tensorflow" }}\n'
                   for n, p in models)
    return f"model_config_list {{\n{body}}}\n"


# ---------------------------------------------------------------------- checks


def test_only_a_model_config_list_is_supported() -> None:
    for text in ("", 'custom_model_config { type_url: "x" }'):
        with pytest.raises(InvalidArgument) as info:
            reloads.parse(text)
        assert info.value.message == ("ServerModelConfig type not supported by HandleReloadConfigRequest."
                                      " Only ModelConfigList is currently supported")


def test_an_empty_model_config_list_is_a_config_with_no_models() -> None:
    assert reloads.parse("model_config_list {}") == []


@pytest.mark.parametrize("text, message", [
    (_text(("a", "/m/a"), ("a", "/m/b")), "Illegal to list model a multiple times in config list"),
    (_text(("a", "m/a")), "Expected model a to have an absolute path or URI; got base_path()=m/a"),
])
def test_a_bad_list_gets_tf_servings_message(text: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        reloads.parse(text)
    assert info.value.message == message


def test_a_base_path_without_versions_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    missing = reloads.parse(_text(("m", str(tmp_path / "nope"))))
    with pytest.raises(InvalidArgument) as info:
        reloads.check_versions(missing)
    assert info.value.message.startswith(f"Could not find base path {tmp_path / 'nope'} for servable m")
    with pytest.raises(NotFound) as found:
        reloads.check_versions(reloads.parse(_text(("m", str(tmp_path / "empty")))))
    assert found.value.message == ("Unable to find a numerical version path for servable m at: "
                                   f"{tmp_path / 'empty'}")
    (tmp_path / "empty" / "3").mkdir()
    reloads.check_versions(reloads.parse(_text(("m", str(tmp_path / "empty")))))


# ---------------------------------------------------------------------- the directory


@pytest.fixture
def directory(tmp_path: Path) -> str:
    env: dict[str, str] = {}
    path = reloads.prepare_dir(env)
    assert env[reloads.RELOAD_DIR_ENV] == path and os.path.isdir(os.path.join(path, "workers"))
    yield path
    reloads.remove_dir(env)
    assert not os.path.exists(path)


def test_generations_count_up_and_old_configs_are_pruned(directory: str) -> None:
    assert reloads.latest(directory) is None
    for i in range(1, reloads.KEEP + 4):
        assert reloads.publish(directory, f"# {i}") == i
    assert reloads.latest(directory) == (reloads.KEEP + 3, f"# {reloads.KEEP + 3}")
    assert reloads.generations(directory) == list(range(4, reloads.KEEP + 4))
    assert not [n for n in os.listdir(directory) if n.endswith(".tmp")]


def test_concurrent_publishers_each_get_their_own_generation(directory: str) -> None:
    got: list[int] = []
    threads = [threading.Thread(target=lambda: got.append(reloads.publish(directory, "x")))
               for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 17))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_wait_returns_when_every_live_worker_applied(directory: str) -> None:
    me = os.getpid()
    reloads.record(directory, me, Applied(reloads.STARTING))
    reloads.record(directory, _dead_pid(), Applied(0))  # gone without child_exit: not waited for
    with pytest.raises(DeadlineExceeded) as info:
        reloads.wait(directory, 1, time.monotonic() + 0.1)
    assert f"waiting for pids {me}" in info.value.message
    threading.Timer(0.1, reloads.record, (directory, me, Applied(1))).start()
    reloads.wait(directory, 1, time.monotonic() + 10)
    reloads.record(directory, me, Applied(2))  # a later reload superseded it: applied too
    reloads.wait(directory, 1, time.monotonic() + 1)
    reloads.forget(directory, me)
    assert reloads.statuses(directory).keys() == set() or me not in reloads.statuses(directory)


def test_wait_raises_the_error_a_worker_met(directory: str) -> None:
    reloads.record(directory, os.getpid(), Applied(3, Code.UNKNOWN, "1 model(s) did not become available"))
    with pytest.raises(TFWSGIError) as info:
        reloads.wait(directory, 3, time.monotonic() + 1)
    assert (info.value.code, info.value.message) == (Code.UNKNOWN, "1 model(s) did not become available")


# ---------------------------------------------------------------------- the call, in process


@pytest.fixture
def stubs(tmp_path: Path) -> Iterator[tuple[model_service_pb2_grpc.ModelServiceStub,
                                            prediction_service_pb2_grpc.PredictionServiceStub, Path]]:
    def hp(name: str, version: int, path: str):  # type: ignore[no-untyped-def]
        return half_plus_two(name, version, path, 2.0)

    models = [FakeModel("hp", {1: hp}), FakeModel("other", {1: hp}),
              FakeModel("broken", {1: TFWSGIError("Can't parse saved_model.pb as binary proto", 15)})]
    app = make_app(tmp_path, models)
    state = app.extensions["tfwsgi"]
    server = grpc_api.build(state.dataplane, reloads=state.reloads)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield (model_service_pb2_grpc.ModelServiceStub(channel),
               prediction_service_pb2_grpc.PredictionServiceStub(channel), tmp_path / "models")
    grpc_api.stop(server, grace=1.0)


def _reload(stub: model_service_pb2_grpc.ModelServiceStub,
            text: str) -> model_management_pb2.ReloadConfigResponse:
    from google.protobuf import text_format

    request = model_management_pb2.ReloadConfigRequest(metric_names=["some_metric"])
    text_format.Parse(text, request.config)
    return stub.HandleReloadConfigRequest(request, timeout=10)


def _predict(stub: prediction_service_pb2_grpc.PredictionServiceStub, name: str) -> list[float]:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.inputs["x"].CopyFrom(tf.make_tensor_proto(np.array([1.0], np.float32)))
    return list(stub.Predict(request, timeout=10).outputs["y"].float_val)


def _code(call) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_a_reload_replaces_the_config(stubs) -> None:  # type: ignore[no-untyped-def]
    model, predict, root = stubs
    response = _reload(model, _text(("hp", str(root / "hp"))))  # other and broken leave
    assert response.status.error_code == 0 and response.status.error_message == ""
    assert [(m.name, m.int64_value_increase) for m in response.metric] == [("some_metric", 0)]
    assert _predict(predict, "hp") == [2.5]
    assert _code(lambda: _predict(predict, "other")) == (
        grpc.StatusCode.NOT_FOUND, "Servable not found for request: Latest(other)")
    _reload(model, _text(("hp", str(root / "hp")), ("other", str(root / "other"))))  # other is back
    assert _predict(predict, "other") == [2.5]


def test_an_unsupported_config_is_invalid_argument(stubs) -> None:  # type: ignore[no-untyped-def]
    model, _, _ = stubs
    request = model_management_pb2.ReloadConfigRequest(
        config=model_server_config_pb2.ModelServerConfig())
    assert _code(lambda: model.HandleReloadConfigRequest(request, timeout=10)) == (
        grpc.StatusCode.INVALID_ARGUMENT, reloads.UNSUPPORTED)


def test_a_bad_base_path_changes_nothing(stubs) -> None:  # type: ignore[no-untyped-def]
    model, predict, root = stubs
    code, details = _code(lambda: _reload(model, _text(("hp", str(root / "hp")), ("new", "/no/such/dir"))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("Could not find base path /no/such/dir for servable new")
    assert _predict(predict, "hp") == _predict(predict, "other") == [2.5]  # still configured, serving


def test_a_model_that_fails_to_load_is_tf_servings_unknown_error(stubs) -> None:  # type: ignore[no-untyped-def]
    model, predict, root = stubs
    _reload(model, _text(("hp", str(root / "hp"))))
    code, details = _code(lambda: _reload(model, _text(("hp", str(root / "hp")),
                                                       ("broken", str(root / "broken")))))
    assert (code, details) == (grpc.StatusCode.UNKNOWN,
                               "1 model(s) did not become available: {{{name: broken version: 1} due to "
                               "error: DATA_LOSS: Can't parse saved_model.pb as binary proto}, }")
    assert _predict(predict, "hp") == [2.5]
    status = model.GetModelStatus(get_model_status_pb2.GetModelStatusRequest(
        model_spec={"name": "broken"}), timeout=10)
    assert [s.status.error_code for s in status.model_version_status] == [15]  # configured, END


def test_a_scan_never_undoes_a_new_config(tmp_path: Path) -> None:
    """The source's poll and a reload propose from two threads: each proposal is made from the
    configs in force, so a scan that started before a reload cannot land after it."""
    from tfwsgi.source import ModelConfig, Source

    (tmp_path / "a" / "1").mkdir(parents=True)
    (tmp_path / "b" / "1").mkdir(parents=True)
    applied: list[list[str]] = []
    calls: list[int] = []
    entered = threading.Event()

    def target(proposal) -> None:  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 1:
            entered.set()
            time.sleep(0.3)  # the first (the poll's) proposal is slow to apply
        applied.append(sorted(proposal))

    source = Source([ModelConfig("a", str(tmp_path / "a"))], target)
    poll = threading.Thread(target=source.propose)
    poll.start()
    entered.wait(5)
    source.set_configs([ModelConfig("b", str(tmp_path / "b"))])
    poll.join()
    assert applied == [["a"], ["b"]]
