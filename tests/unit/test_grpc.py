"""tfwsgi.grpc_api in process: its services over the fake servables (tests/unit/fakes.py) on a
loopback port, called with tensorflow-serving-api's stubs."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tensorflow as tf
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

from fakes import make_app
from tfwsgi import grpc_api

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[grpc.Channel]:
    app = make_app(tmp_path_factory.mktemp("grpc"))
    server = grpc_api.build(app.extensions["tfwsgi"].dataplane)
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
