"""TF Serving's test models (and their kin) answer TF Serving's documented requests as TF Serving does.

The models are built by tests/models.py's ``build_zoo`` as upstream builds them: half_plus_two as
TF Serving's own TF1 graph that parses tf.Examples (``x`` declared [-1, 1]), its two-version
variant, half_plus_three, the TF2 variant (tfwsgi.demo), a Keras 3 export, an estimator-style
classifier fed serialized tf.Examples, and a TF1 multi-signature model over int64, bool and string.
The requests and answers are TF Serving's: tensorflow_serving/model_servers/
tensorflow_model_server_test.py (testPredictREST, testPredictColumnarREST, testClassifyREST,
testRegressREST, testGetStatusREST, _TestPredict's 2.0 → 3.0) and http_rest_api_handler_test.cc
(Predict, Regress, Classify, GetStatus), and its REST API documentation (api_rest.md: named
inputs, b64 strings, row and columnar). Declared shapes are not checked, as TF Serving does not
check them: a shape the graph cannot take fails in the op, 400 with the op's message.
"""

from __future__ import annotations

import base64
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import requests

from conftest import ROOT, Server, metric_total

pytestmark = pytest.mark.e2e

DOC = {"instances": [1.0, 2.0, 5.0]}  # TF Serving's README example
HP = "/v1/models/half_plus_two"


def ok(resp: requests.Response) -> object:
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"] == "application/json"
    return resp.json()


def error(resp: requests.Response, status: int = 400) -> str:
    assert resp.status_code == status, resp.text
    assert resp.headers["Content-Type"] == "application/json"
    body = resp.json()
    assert set(body) == {"error"}
    return str(body["error"])


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The zoo's model config (the models are built in a child: no TensorFlow in this process)."""
    root = tmp_path_factory.mktemp("zoo")
    subprocess.run([sys.executable, str(ROOT / "tests" / "models.py"), "--zoo", str(root)], check=True,
                   env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": str(ROOT)},
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return root


@pytest.fixture(scope="module")
def server(zoo: Path, tmp_path_factory: pytest.TempPathFactory):
    srv = Server({"TFWSGI_MODEL_CONFIG_FILE": str(zoo / "zoo.config")}, workers=1,
                 log_path=tmp_path_factory.mktemp("logs") / "zoo.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def post(server: Server, path: str, body: object) -> requests.Response:
    # no-store: every request runs the model (a cached answer would prove nothing about shapes)
    return server.post(path, json=body, headers={"Cache-Control": "no-store"})


# ------------------------------------------------------------------ half_plus_two, TF1 graph

def test_half_plus_two_tf1_answers_the_documented_predict_row_and_columnar(server):
    assert ok(post(server, HP + ":predict", DOC)) == {"predictions": [2.5, 3.0, 4.5]}
    assert ok(post(server, HP + ":predict", {"inputs": [1.0, 2.0, 5.0]})) == {"outputs": [2.5, 3.0, 4.5]}
    # tensorflow_model_server_test.py: testPredictREST, testPredictColumnarREST
    assert ok(post(server, HP + ":predict", {"instances": [2.0, 3.0, 4.0]})) == {
        "predictions": [3.0, 3.5, 4.0]}
    assert ok(post(server, HP + ":predict", {"inputs": [2.0, 3.0, 4.0]})) == {"outputs": [3.0, 3.5, 4.0]}


def test_half_plus_two_tf1_takes_every_shape_its_graph_takes(server):
    # http_rest_api_handler_test.cc Predict: [2, 2] where [-1, 1] is declared
    assert ok(post(server, HP + ":predict", {"instances": [[1.0, 2.0], [3.0, 4.0]]})) == {
        "predictions": [[2.5, 3.0], [3.5, 4.0]]}
    v123 = HP + "/versions/123:predict"
    body = {"signature_name": "serving_default", "instances": [3.0, 4.0]}
    assert ok(post(server, v123, body)) == {"predictions": [3.5, 4.0]}
    body = {"signature_name": "serving_default", "inputs": [3.0, 4.0]}
    assert ok(post(server, v123, body)) == {"outputs": [3.5, 4.0]}
    assert ok(post(server, HP + ":predict", {"instances": [[1.0], [2.0]]})) == {"predictions": [[2.5], [3.0]]}
    assert ok(post(server, HP + ":predict", {"inputs": 2.0})) == {"outputs": 3.0}


def test_half_plus_two_tf1_shape_its_graph_cannot_take_is_the_ops_400(server):
    # The regression signature's input is the tf.Example placeholder: ParseExample wants a vector.
    r = post(server, HP + ":predict", {"signature_name": "regress_x_to_y", "inputs": [["a"]]})
    assert error(r) == ("Expected serialized to be a scalar or vector, got shape: [1,1]\n"
                        "\t [[{{node ParseExample/ParseExampleV2}}]]")


def test_half_plus_two_tf1_classify_and_regress(server):
    # tensorflow_model_server_test.py testClassifyREST, testRegressREST
    def call(verb: str, signature: str, x: float, path: str = HP) -> object:
        return ok(post(server, f"{path}:{verb}", {"signature_name": signature, "examples": [{"x": x}]}))

    assert call("classify", "classify_x_to_y", 2.0) == {"results": [[["", 3.0]]]}
    assert call("regress", "regress_x_to_y", 2.0) == {"results": [3.0]}
    # http_rest_api_handler_test.cc Regress, Classify
    assert call("regress", "regress_x_to_y", 80.0) == {"results": [42.0]}
    assert call("classify", "classify_x_to_y", 10.0, HP + "/versions/123") == {"results": [[["", 7.0]]]}
    assert call("regress", "regress_x_to_y2", 2.0) == {"results": [4.0]}


def test_half_plus_two_tf1_status_and_metadata(server):
    # tensorflow_model_server_test.py testGetStatusREST
    assert ok(server.get(HP)) == {"model_version_status": [
        {"version": "123", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    meta = ok(server.get(HP + "/metadata"))
    assert meta["model_spec"] == {"name": "half_plus_two", "signature_name": "", "version": "123"}
    defs = meta["metadata"]["signature_def"]["signature_def"]
    assert set(defs) == {"serving_default", "regress_x_to_y", "regress_x_to_y2", "regress_x2_to_y3",
                         "classify_x_to_y"}
    shape = {"dim": [{"size": "-1", "name": ""}, {"size": "1", "name": ""}], "unknown_rank": False}
    assert defs["serving_default"] == {
        "inputs": {"x": {"dtype": "DT_FLOAT", "tensor_shape": shape, "name": "x:0"}},
        "outputs": {"y": {"dtype": "DT_FLOAT", "tensor_shape": shape, "name": "y:0"}},
        "method_name": "tensorflow/serving/predict", "defaults": {}}
    assert defs["classify_x_to_y"]["inputs"]["inputs"]["name"] == "tf_example:0"


def test_two_versions_and_half_plus_three(server):
    status = ok(server.get("/v1/models/half_plus_two_2_versions"))["model_version_status"]
    assert [(s["version"], s["state"]) for s in status] == [("124", "AVAILABLE"), ("123", "AVAILABLE")]
    for version in ("123", "124"):
        path = f"/v1/models/half_plus_two_2_versions/versions/{version}:predict"
        assert ok(post(server, path, {"instances": [1.0, 2.0]})) == {"predictions": [2.5, 3.0]}
    # _TestPredict / testGoodModelConfig: half_plus_three of 2.0 is 4.0
    three = "/v1/models/half_plus_three"
    assert ok(post(server, three + ":predict", {"instances": [2.0]})) == {"predictions": [4.0]}
    assert ok(post(server, three + ":regress",
                   {"signature_name": "regress_x_to_y", "examples": [{"x": 2.0}]})) == {"results": [4.0]}


# ------------------------------------------------------------------ TF2 and Keras 3

def test_half_plus_two_tf2_takes_shapes_other_than_declared(server):
    path = "/v1/models/half_plus_two_tf2:predict"
    assert ok(post(server, path, DOC)) == {"predictions": [2.5, 3.0, 4.5]}
    assert ok(post(server, path, {"inputs": [1.0, 2.0, 5.0]})) == {"outputs": [2.5, 3.0, 4.5]}
    # x is declared [-1]: a tf.function's own call would refuse [2, 2]; TF Serving feeds it
    assert ok(post(server, path, {"instances": [[1.0, 2.0], [3.0, 4.0]]})) == {
        "predictions": [[2.5, 3.0], [3.5, 4.0]]}
    assert ok(post(server, "/v1/models/half_plus_two_tf2:classify",
                   {"signature_name": "tensorflow/serving/classify", "examples": [{"x": 1.0}]})) == {
        "results": [[["", 2.5]]]}


def _keras_model(x: np.ndarray) -> np.ndarray:
    """tests/models.py's build_keras3 in numpy: the same seeded weights, relu then softmax."""
    rng = np.random.default_rng(0)
    k1, b1, k2, b2 = (rng.normal(size=s).astype("float32") for s in ((4, 3), (3,), (3, 2), (2,)))
    logits = np.maximum(x @ k1 + b1, 0) @ k2 + b2
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_keras3_export_row_columnar_and_the_ops_error(server):
    x = np.array([[1, 2, 3, 4], [0, -1, 0.5, 2]], dtype=np.float32)
    out = ok(post(server, "/v1/models/keras:predict", {"instances": x.tolist()}))
    assert np.allclose(np.array(out["predictions"]), _keras_model(x), rtol=1e-5)
    out = ok(post(server, "/v1/models/keras:predict", {"inputs": {"features": x.tolist()}}))
    assert np.allclose(np.array(out["outputs"]), _keras_model(x), rtol=1e-5)
    # 3 features where the Dense kernel is [4, 3]: MatMul says so, as TF Serving answers
    r = post(server, "/v1/models/keras:predict", {"instances": [[1.0, 2.0, 3.0]]})
    message = error(r)
    assert message.startswith("Matrix size-incompatible: In[0]: [1,3], In[1]: [4,3]\n\t [[{{node "), message
    assert "Graph execution error" not in message and "[Op:" not in message
    r = post(server, "/v1/models/keras:predict", {"inputs": [1.0, 2.0, 3.0, 4.0]})
    assert error(r).startswith("In[0] is not a matrix")


# ------------------------------------------------------------------ estimator-style, string inputs

def _example(color: str, size: float) -> bytes:
    """A serialized tf.Example {color: bytes_list, size: float_list}, without TensorFlow."""
    def field(number: int, payload: bytes) -> bytes:
        return bytes([number << 3 | 2, len(payload)]) + payload

    color_feature = field(1, field(1, color.encode()))  # Feature.bytes_list.value
    size_feature = field(2, field(1, np.float32(size).tobytes()))  # Feature.float_list.value (packed)
    features = field(1, field(1, b"color") + field(2, color_feature)) + field(1, field(1, b"size") +
                                                                          field(2, size_feature))
    return field(1, features)  # Example.features


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def test_estimator_style_classify_regress_and_predict_on_serialized_examples(server):
    path = "/v1/models/estimator"
    red, other = _sigmoid(2.0 + 0.5 * 2.0 - 1.0), _sigmoid(-1.0 - 1.0)
    body = {"examples": [{"color": "red", "size": 2.0}, {"color": "purple"}]}
    out = ok(post(server, path + ":classify", body))["results"]
    assert [[label for label, _ in row] for row in out] == [["0", "1"], ["0", "1"]]
    assert np.allclose([[s for _, s in row] for row in out], [[1 - red, red], [1 - other, other]], rtol=1e-6)
    out = ok(post(server, path + ":regress", {"signature_name": "regression", **body}))["results"]
    assert np.allclose(out, [red, other], rtol=1e-6)
    # api_rest.md: binary strings as {"b64": …}; the predict signature takes the serialized examples
    b64 = base64.b64encode(_example("red", 2.0)).decode()
    out = ok(post(server, path + ":predict", {"signature_name": "predict", "instances": [{"b64": b64}]}))
    (row,) = out["predictions"]
    assert row["classes"] == ["1"] and row["class_ids"] == [1] and row["logits"] == [2.0]
    assert np.allclose(row["probabilities"], [1 - red, red], rtol=1e-6)
    body = {"signature_name": "predict", "inputs": {"examples": [{"b64": b64}]}}
    out = ok(post(server, path + ":predict", body))
    assert out["outputs"]["classes"] == [["1"]]
    r = post(server, path + ":predict", {"signature_name": "predict", "instances": ["not an example"]})
    assert error(r).startswith("Could not parse example input, value: 'not an example'")


# ------------------------------------------------------------------ int64, bool, string

def test_typed_named_inputs_row_and_columnar(server):
    path = "/v1/models/typed:predict"
    body = {"instances": [{"ids": 1, "flags": True, "words": "a"},
                          {"ids": 9007199254740993, "flags": False, "words": "héllo"}]}
    assert ok(post(server, path, body)) == {"predictions": [
        {"ids_plus_one": 2, "flags_negated": False, "words_upper": "A", "words_bytes": {"b64": "YQ=="}},
        {"ids_plus_one": 9007199254740994, "flags_negated": True, "words_upper": "HéLLO",
         "words_bytes": {"b64": base64.b64encode("héllo".encode()).decode()}}]}
    body = {"inputs": {"ids": [5], "flags": [False], "words": [{"b64": "eHk="}]}}
    want = {"ids_plus_one": [6], "flags_negated": [True], "words_upper": ["XY"],
            "words_bytes": [{"b64": "eHk="}]}
    assert ok(post(server, path, body)) == {"outputs": want}


def test_typed_signatures_take_shapes_other_than_declared(server):
    path = "/v1/models/typed:predict"
    # ids declared [-1]: a [2, 2] int64 tensor goes into the graph as TF Serving feeds it
    assert ok(post(server, path, {"signature_name": "int64", "inputs": [[1, 2], [3, 4]]})) == {
        "outputs": [[2, 4], [6, 8]]}
    assert ok(post(server, path, {"signature_name": "int64", "inputs": 21})) == {"outputs": 42}
    assert ok(post(server, path, {"signature_name": "string", "inputs": ["ab", "cde"]})) == {
        "outputs": {"joined": "ab cde", "length": [2, 3]}}
    assert ok(post(server, path, {"signature_name": "bool", "inputs": [False, True]})) == {"outputs": True}
    # A scalar output has no batch to give rows: MakeRowFormatJsonFromTensors refuses it
    r = post(server, path, {"signature_name": "bool", "instances": [False, True]})
    assert error(r) == "Tensor name: any has no shape information "
    r = post(server, path, {"signature_name": "int64", "instances": [1.5]})
    assert "is not of expected type: int64" in error(r)


def test_no_worker_died(server):
    assert "Traceback" not in server.log()


# ------------------------------------------------------------------ with batching

def test_half_plus_two_tf1_with_batching_answers_every_shape(zoo, tmp_path):
    params = tmp_path / "batching.config"
    params.write_text("max_batch_size { value: 32 }\nbatch_timeout_micros { value: 100000 }\n"
                      "num_batch_threads { value: 1 }\n")
    srv = Server({"TFWSGI_MODEL_NAME": "half_plus_two", "TFWSGI_MODEL_BASE_PATH": str(zoo / "half_plus_two"),
                  "TFWSGI_ENABLE_BATCHING": "true", "TFWSGI_BATCHING_PARAMETERS_FILE": str(params)},
                 workers=1, log_path=tmp_path / "batching.log")
    try:
        srv.wait_ready()
        cases = [
            (DOC, {"predictions": [2.5, 3.0, 4.5]}),
            (DOC, {"predictions": [2.5, 3.0, 4.5]}),
            ({"inputs": [1.0, 2.0, 5.0]}, {"outputs": [2.5, 3.0, 4.5]}),
            ({"instances": [4.0]}, {"predictions": [4.0]}),
            ({"instances": [[1.0], [2.0]]}, {"predictions": [[2.5], [3.0]]}),
            ({"instances": [[3.0], [4.0]]}, {"predictions": [[3.5], [4.0]]}),
            ({"instances": [[1.0, 2.0], [3.0, 4.0]]}, {"predictions": [[2.5, 3.0], [3.5, 4.0]]}),
            ({"inputs": 2.0}, {"outputs": 3.0}),
        ]
        barrier = threading.Barrier(len(cases))
        answers: dict[int, object] = {}

        def call(i: int) -> None:
            barrier.wait()
            r = post(srv, HP + ":predict", cases[i][0])
            answers[i] = (r.status_code, r.json())

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(cases))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert answers == {i: (200, want) for i, (_, want) in enumerate(cases)}
        text = srv.get("/metrics").text
        # 7 requests with a batch dimension (the scalar runs alone), fewer batches: some merged
        assert metric_total(text, "tfwsgi_batch_size_sum") == 3 + 3 + 3 + 1 + 2 + 2 + 2
        assert 3 <= metric_total(text, "tfwsgi_batch_size_count") < 7
        # one after another too, and the shape the graph cannot take is still the op's 400
        assert ok(post(srv, HP + ":predict", DOC)) == {"predictions": [2.5, 3.0, 4.5]}
        r = post(srv, HP + ":predict", {"signature_name": "regress_x_to_y", "inputs": [["a"]]})
        assert error(r).startswith("Expected serialized to be a scalar or vector, got shape: [1,1]")
        assert "Traceback" not in srv.log()
    finally:
        srv.stop()
