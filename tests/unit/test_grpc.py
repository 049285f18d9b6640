"""tfwsgi.grpc_api in process: its services over the fake servables (tests/unit/fakes.py) on a
loopback port, called with tensorflow-serving-api's stubs."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tensorflow.core.example import example_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from fakes import half_plus_two, make_app, make_settings, multi
from tfwsgi import grpc_api
from tfwsgi.application import create_app
from tfwsgi.manager import ModelManager
from tfwsgi.source import ModelConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[grpc.Channel]:
    app = make_app(tmp_path_factory.mktemp("grpc"))
    server = grpc_api.build(app.extensions["tfwsgi"].dataplane, make_settings())
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield ch
    grpc_api.stop(server, grace=1.0)


def _predict(channel: grpc.Channel, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
    return prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=10)


def _request(name: str, **inputs: np.ndarray) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    return request


def test_predict_answers_with_typed_fields_and_model_spec(channel: grpc.Channel) -> None:
    response = _predict(channel, _request("hp", x=np.array([1.0, 2.0], np.float32)))
    assert list(response.outputs["y"].float_val) == [3.5, 4.0]  # latest: version 2, b = 3
    assert response.outputs["y"].tensor_content == b""  # TF Serving's default (AsProtoField)
    assert (response.model_spec.name, response.model_spec.version.value,
            response.model_spec.signature_name) == ("hp", 2, "serving_default")


@pytest.mark.parametrize("request_, code, message", [
    (_request("nope", x=np.ones(1, np.float32)), grpc.StatusCode.NOT_FOUND,
     "Servable not found for request: Latest(nope)"),
    (_request("hp", x=np.ones(1, np.int32)), grpc.StatusCode.INVALID_ARGUMENT,
     "Expected input x to be float but get int32."),
    (predict_pb2.PredictRequest(), grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec"),
], ids=["model", "dtype", "no-spec"])
def test_errors_carry_the_core_s_code(channel: grpc.Channel, request_: predict_pb2.PredictRequest,
                                     code: grpc.StatusCode, message: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _predict(channel, request_)
    assert (info.value.code(), info.value.details()) == (code, message)


def test_metadata_and_status(channel: grpc.Channel) -> None:
    request = get_model_metadata_pb2.GetModelMetadataRequest()
    request.model_spec.name = "hp"
    request.model_spec.version_label = "stable"
    request.metadata_field.append("signature_def")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    response = stub.GetModelMetadata(request, timeout=10)
    assert response.model_spec.version.value == 1
    sig_map = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(sig_map)
    assert sig_map.signature_def["serving_default"].outputs["y"].dtype == tf.float32.as_datatype_enum
    request.ClearField("metadata_field")
    with pytest.raises(grpc.RpcError) as info:
        stub.GetModelMetadata(request, timeout=10)
    assert info.value.details() == "GetModelMetadataRequest must specify at least one metadata_field"

    status = get_model_status_pb2.GetModelStatusRequest()
    status.model_spec.name = "flaky"
    got = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(status, timeout=10)
    State = get_model_status_pb2.ModelVersionStatus.State
    assert {(s.version, s.state, s.status.error_code) for s in got.model_version_status} == {
        (1, State.AVAILABLE, 0), (2, State.END, grpc.StatusCode.DATA_LOSS.value[0])}


def _example(**features: float) -> example_pb2.Example:
    example = example_pb2.Example()
    for key, value in features.items():
        example.features.feature[key].float_list.value.append(value)
    return example


def test_classify_and_regress_take_examples_and_context(channel: grpc.Channel) -> None:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = regression_pb2.RegressionRequest()
    request.model_spec.name = "hp"
    request.model_spec.version.value = 1
    request.model_spec.signature_name = "regress_x2_to_y3"
    request.input.example_list_with_context.context.CopyFrom(_example(x2=4.0))
    request.input.example_list_with_context.examples.extend([_example(), _example(x2=10.0)])
    response = stub.Regress(request, timeout=10)
    assert [r.value for r in response.result.regressions] == [5.0, 8.0]  # 0.5·x2 + 3
    assert response.model_spec.signature_name == "regress_x2_to_y3"

    classify = classification_pb2.ClassificationRequest()
    classify.model_spec.name = "hp"
    classify.model_spec.version.value = 1
    classify.model_spec.signature_name = "classify_x_to_y"
    classify.input.example_list.examples.extend([_example(x=1.0), _example(x=4.0)])
    got = stub.Classify(classify, timeout=10).result.classifications
    assert [[(c.label, c.score) for c in row.classes] for row in got] == [[("", 2.5)], [("", 4.0)]]

    classify.input.Clear()
    with pytest.raises(grpc.RpcError) as info:
        stub.Classify(classify, timeout=10)
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "Input is empty.")


def _task(name: str, signature: str, method: str) -> inference_pb2.InferenceTask:
    task = inference_pb2.InferenceTask(method_name=method)
    task.model_spec.name = name
    task.model_spec.signature_name = signature
    return task


REGRESS, CLASSIFY = "tensorflow/serving/regress", "tensorflow/serving/classify"


def test_multi_inference_runs_every_task_on_one_version(channel: grpc.Channel) -> None:
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = inference_pb2.MultiInferenceRequest()
    request.tasks.extend([_task("hp", "regress_x_to_y", REGRESS), _task("hp", "classify_x_to_y", CLASSIFY)])
    request.input.example_list.examples.extend([_example(x=1.0), _example(x=2.0)])
    results = stub.MultiInference(request, timeout=10).results
    assert [r.model_spec.version.value for r in results] == [2, 2]  # hp's latest: b = 3
    assert [r.value for r in results[0].regression_result.regressions] == [3.5, 4.0]
    assert [[c.score for c in row.classes] for row in results[1].classification_result.classifications] == [
        [3.5], [4.0]]


@pytest.mark.parametrize("tasks, code, message", [
    ([("hp", "regress_x_to_y", REGRESS), ("multi", "regress_x_to_y", REGRESS)],
     grpc.StatusCode.INVALID_ARGUMENT,
     "All ModelSpecs in a MultiInferenceRequest must access the same model name."),
    ([("hp", "regress_x_to_y", REGRESS)] * 2, grpc.StatusCode.INVALID_ARGUMENT,
     "Duplicate evaluation of signature: regress_x_to_y"),
    ([("hp", "nope", REGRESS)], grpc.StatusCode.INVALID_ARGUMENT,
     "Requested signature not found in model graph: nope"),
    ([("hp", "serving_default", "tensorflow/serving/predict")], grpc.StatusCode.UNIMPLEMENTED,
     "Unsupported signature method_name: tensorflow/serving/predict"),
], ids=["two-models", "duplicate", "no-signature", "predict"])
def test_multi_inference_errors_are_tf_servings(channel: grpc.Channel, tasks: list[tuple[str, str, str]],
                                                code: grpc.StatusCode, message: str) -> None:
    request = inference_pb2.MultiInferenceRequest()
    request.tasks.extend([_task(*t) for t in tasks])
    request.input.example_list.examples.append(_example(x=1.0))
    with pytest.raises(grpc.RpcError) as info:
        prediction_service_pb2_grpc.PredictionServiceStub(channel).MultiInference(request, timeout=10)
    assert (info.value.code(), info.value.details()) == (code, message)


def test_a_reload_without_a_reloader_is_unimplemented(channel: grpc.Channel) -> None:
    """A server built over a bare DataPlane (no tfwsgi.reloads) cannot apply a reload."""
    from tensorflow_serving.apis import model_management_pb2

    request = model_management_pb2.ReloadConfigRequest()
    request.config.model_config_list.SetInParent()
    with pytest.raises(grpc.RpcError) as info:
        model_service_pb2_grpc.ModelServiceStub(channel).HandleReloadConfigRequest(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_the_master_s_modules_never_import_grpc() -> None:
    """What gunicorn's master imports (gunicorn_conf.py, the hooks, the app's modules) leaves
    grpcio out: only a worker's post_fork imports tfwsgi.grpc_api."""
    code = ("import sys, tfwsgi, tfwsgi.hooks, tfwsgi.application, tfwsgi.api, tfwsgi.dataplane\n"
            "assert not [m for m in sys.modules if m == 'grpc' or m.startswith('grpc.')], 'imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


def _serve(core: grpc_api.Core | object, **settings: object) -> tuple[grpc.Server, grpc.Channel]:
    server = grpc_api.build(core, make_settings(**settings))  # type: ignore[arg-type]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, grpc.insecure_channel(f"127.0.0.1:{port}")


def test_answers_in_tensor_content_with_the_flag(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    server, ch = _serve(app.extensions["tfwsgi"].dataplane, enable_serialization_as_tensor_content=True)
    try:
        response = _predict(ch, _request("hp", x=np.array([[1.0], [2.0]], np.float32)))
    finally:
        ch.close()
        grpc_api.stop(server, grace=1.0)
    y = response.outputs["y"]
    assert not y.float_val and y.tensor_content  # Tensor::AsProtoTensorContent
    np.testing.assert_array_equal(tf.make_ndarray(y), [[3.5], [4.0]])


@pytest.mark.parametrize("text, expected", [
    ("", {}),
    ("grpc.max_receive_message_length=4096", {"grpc.max_receive_message_length": 4096}),
    ("grpc.max_connection_age_ms= +2000 ,grpc.primary_user_agent=tfs,x=2147483648,y=1.5,z=",
     {"grpc.max_connection_age_ms": 2000, "grpc.primary_user_agent": "tfs", "x": "2147483648",
      "y": "1.5", "z": ""}),
], ids=["empty", "int", "mixed"])
def test_channel_arguments_are_read_as_tf_serving_reads_them(text: str, expected: dict[str, object]) -> None:
    options = dict(grpc_api.server_options(make_settings(grpc_channel_arguments=text)))
    defaults = {"grpc.so_reuseport": 1, "grpc.max_receive_message_length": 2**31 - 1,
                "grpc.max_send_message_length": 2**31 - 1,
                "grpc.max_connection_age_ms": 10_000}  # TFWSGI_GRPC_MAX_CONNECTION_AGE_MS
    assert options == {**defaults, **expected}


@pytest.mark.parametrize("text, message", [
    ("grpc.max_connection_age_ms", "expected comma-separated key=value, got 'grpc.max_connection_age_ms'"),
    ("a=1,", "expected comma-separated key=value, got ''"),
    ("a=1=2", "expected comma-separated key=value, got 'a=1=2'"),
    ("grpc.so_reuseport=0", "grpc.so_reuseport cannot be changed"),
])
def test_bad_channel_arguments_stop_the_start(text: str, message: str) -> None:
    from tfwsgi.errors import ConfigError
    from tfwsgi.settings import from_env

    with pytest.raises(ConfigError, match=message):
        from_env({"TFWSGI_GRPC_CHANNEL_ARGUMENTS": text})


def test_a_channel_argument_lowers_the_message_limit(tmp_path: Path) -> None:
    app = make_app(tmp_path)
    server, ch = _serve(app.extensions["tfwsgi"].dataplane,
                        grpc_channel_arguments="grpc.max_receive_message_length=1024")
    try:
        small = _predict(ch, _request("hp", x=np.ones(16, np.float32)))
        assert len(small.outputs["y"].float_val) == 16
        with pytest.raises(grpc.RpcError) as info:
            _predict(ch, _request("hp", x=np.ones(1024, np.float32)))  # 4 KiB of tensor_content
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        ch.close()
        grpc_api.stop(server, grace=1.0)


def test_grpc_max_threads_sizes_the_pool() -> None:
    assert grpc_api.threads(make_settings(grpc_max_threads=3)) == 3
    assert grpc_api.threads(make_settings()) == 4 * len(os.sched_getaffinity(0))


def _status(ch: grpc.Channel, service: str) -> str:
    stub = health_pb2_grpc.HealthStub(ch)
    try:
        status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
    except grpc.RpcError as exc:
        return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def test_health_follows_the_models(tmp_path: Path) -> None:
    bases = {}
    for name, version in (("hp", 1), ("multi", 7)):
        (tmp_path / name / str(version)).mkdir(parents=True)
        bases[name] = str(tmp_path / name)
    settings = dict(enable_grpc_healthcheck_service=True, model_name="hp", model_base_path=bases["hp"])
    core = grpc_api.Core()
    server, ch = _serve(core, **settings)
    loading: list[tuple[str, str, str]] = []

    def load(name: str, version: int, path: str) -> object:
        if name == "multi":
            loading.append((_status(ch, "multi"), _status(ch, "hp"), _status(ch, "")))
            return multi(name, version, path)
        return half_plus_two(name, version, path, 2.0)

    try:
        # The worker's app is not built yet: its configured models are loading.
        assert [_status(ch, s) for s in ("", "ModelService", "PredictionService", "hp", "multi")] == [
            "NOT_SERVING", "NOT_SERVING", "NOT_SERVING", "NOT_SERVING", "NOT_FOUND"]
        configs = [ModelConfig("hp", bases["hp"]), ModelConfig("multi", bases["multi"])]
        manager = ModelManager(configs, load)
        core.set(create_app(manager, make_settings(**settings)).extensions["tfwsgi"].dataplane)
        assert (_status(ch, ""), _status(ch, "multi")) == ("NOT_SERVING", "NOT_SERVING")
        manager.load_all()
        assert loading == [("NOT_SERVING", "SERVING", "NOT_SERVING")]  # hp loaded, multi loading
        assert [_status(ch, s) for s in ("", "PredictionService", "hp", "multi")] == ["SERVING"] * 4

        manager.source.set_configs(configs[:1])  # multi removed from the config: unloaded
        assert [_status(ch, s) for s in ("", "ModelService", "hp", "multi")] == [
            "SERVING", "SERVING", "SERVING", "NOT_SERVING"]
        assert _status(ch, "nope") == "NOT_FOUND"

        core.shutdown()  # the worker starts to stop: nothing serves any more, whatever loads
        manager.source.set_configs(configs)
        assert [_status(ch, s) for s in ("", "hp", "multi")] == ["NOT_SERVING"] * 3
    finally:
        ch.close()
        grpc_api.stop(server, grace=1.0)


def test_no_health_service_unless_asked(channel: grpc.Channel) -> None:
    assert _status(channel, "") == "UNIMPLEMENTED"  # TF Serving's default: the flag is off
