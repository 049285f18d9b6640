"""TF Serving's REST API end to end: real gunicorn (2 workers), real HTTP over loopback."""

from __future__ import annotations

import base64
import json
import math

import numpy as np
import pytest

pytestmark = pytest.mark.e2e


def ok(resp):
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"] == "application/json"
    return resp.json()


# ------------------------------------------------------------------ status

def test_status_lists_every_version_newest_first(server):
    body = ok(server.get("/v1/models/hp"))
    assert body == {"model_version_status": [
        {"version": "2", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}},
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}},
    ]}


def test_status_of_one_version(server):
    body = ok(server.get("/v1/models/hp/versions/1"))
    assert [s["version"] for s in body["model_version_status"]] == ["1"]


def test_status_of_version_outside_policy_is_404(server):
    # hp/3 exists on disk but the specific policy aspires only to 1 and 2.
    r = server.get("/v1/models/hp/versions/3")
    assert r.status_code == 404
    assert r.json() == {"error": "Could not find version 3 of model hp"}


def test_status_with_label_lists_all_versions_as_tf_serving_does(server):
    body = ok(server.get("/v1/models/hp/labels/stable"))
    assert {s["version"] for s in body["model_version_status"]} == {"1", "2"}


def test_status_reports_broken_version(server):
    body = ok(server.get("/v1/models/flaky"))
    states = {s["version"]: s for s in body["model_version_status"]}
    assert states["1"]["state"] == "AVAILABLE"
    assert states["2"]["state"] == "END"
    assert states["2"]["status"]["error_code"] == "DATA_LOSS"
    assert "saved_model.pb" in states["2"]["status"]["error_message"]


def test_broken_newest_version_never_serves_latest_falls_back(server):
    assert ok(server.post("/v1/models/flaky:predict", json={"instances": [2.0]})) == {"predictions": [3.0]}
    r = server.post("/v1/models/flaky/versions/2:predict", json={"instances": [2.0]})
    assert r.status_code == 404
    assert r.json() == {"error": "Servable not found for request: Specific(flaky, 2)"}


def test_status_unknown_model(server):
    r = server.get("/v1/models/nope")
    assert r.status_code == 404
    assert r.json() == {"error": "Could not find any versions of model nope"}


def test_paths_are_case_insensitive_like_tf_serving(server):
    assert ok(server.post("/V1/MODELS/hp/VERSIONS/1:PREDICT", json={"instances": [1.0]})) == {
        "predictions": [2.5]}


def test_url_encoded_model_name_is_decoded(server):
    assert ok(server.post("/v1/models/%68p:predict", json={"instances": [1.0]}))["predictions"] == [3.5]


# ------------------------------------------------------------------ metadata

def test_metadata_renders_signature_defs_as_tf_serving(server):
    body = ok(server.get("/v1/models/hp/versions/1/metadata"))
    assert body["model_spec"] == {"name": "hp", "signature_name": "", "version": "1"}
    defs = body["metadata"]["signature_def"]["signature_def"]
    x = defs["serving_default"]["inputs"]["x"]
    assert x["dtype"] == "DT_FLOAT"
    assert x["tensor_shape"] == {"dim": [{"size": "-1", "name": ""}], "unknown_rank": False}
    assert defs["serving_default"]["method_name"] == "tensorflow/serving/predict"
    assert set(defs["tensorflow/serving/regress"]["outputs"]) == {"outputs"}
    assert defs["classify_x_to_y"]["inputs"]["inputs"]["dtype"] == "DT_STRING"


def test_metadata_of_latest_and_label(server):
    assert ok(server.get("/v1/models/hp/metadata"))["model_spec"]["version"] == "2"
    assert ok(server.get("/v1/models/hp/labels/stable/metadata"))["model_spec"]["version"] == "1"


# ------------------------------------------------------------------ predict

def test_predict_row_format(server):
    assert ok(server.post("/v1/models/hp/versions/1:predict",
                          data='{"instances": [1.0, 2.0, 5.0]}')) == {"predictions": [2.5, 3.0, 4.5]}


def test_predict_columnar_format(server):
    assert ok(server.post("/v1/models/hp/versions/1:predict",
                          data='{"inputs": [1.0, 2.0, 5.0]}')) == {"outputs": [2.5, 3.0, 4.5]}


def test_predict_columnar_named_single_input(server):
    assert ok(server.post("/v1/models/hp/versions/1:predict",
                          data='{"inputs": {"x": [1.0]}}')) == {"outputs": [2.5]}


def test_predict_row_named_single_input(server):
    assert ok(server.post("/v1/models/hp/versions/1:predict",
                          data='{"instances": [{"x": 1.0}, {"x": 3}]}')) == {"predictions": [2.5, 3.5]}


def test_latest_version_and_labels(server):
    body = '{"instances": [1.0]}'
    assert ok(server.post("/v1/models/hp:predict", data=body)) == {"predictions": [3.5]}
    assert ok(server.post("/v1/models/hp/labels/stable:predict", data=body)) == {"predictions": [2.5]}
    assert ok(server.post("/v1/models/hp/labels/canary:predict", data=body)) == {"predictions": [3.5]}
    assert ok(server.post("/v1/models/hp/versions/2:predict", data=body)) == {"predictions": [3.5]}


def test_signature_name_selects_signature(server):
    body = {"signature_name": "tensorflow/serving/predict", "instances": [4.0]}
    assert ok(server.post("/v1/models/hp/versions/1:predict", json=body)) == {"predictions": [4.0]}


def test_form_urlencoded_content_type_is_read_as_json(server):
    # curl -d sends application/x-www-form-urlencoded; TF Serving ignores Content-Type.
    r = server.post("/v1/models/hp/versions/1:predict", data='{"instances": [1.0]}',
                    headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert ok(r) == {"predictions": [2.5]}


def test_nan_and_infinity_in_and_out(server):
    r = server.post("/v1/models/multi:predict",
                    data='{"signature_name": "double", "instances": [3.0, NaN, Infinity, -Infinity]}')
    assert r.status_code == 200, r.text
    assert r.text == '{"predictions":[1.0,NaN,Infinity,-Infinity]}'
    values = json.loads(r.text)["predictions"]  # Python's json reads them as TF Serving writes them
    assert math.isnan(values[1]) and values[2] == math.inf and values[3] == -math.inf


def test_float32_output_round_trips_to_the_same_float32(server):
    xs = [0.1, 1e-7, 123456.789, 3e20]
    out = ok(server.post("/v1/models/hp/versions/1:predict", json={"instances": xs}))["predictions"]
    expected = np.float32(0.5) * np.array(xs, dtype=np.float32) + np.float32(2.0)
    assert np.array_equal(np.array(out, dtype=np.float32), expected)


def test_whole_floats_keep_a_decimal_point(server):
    r = server.post("/v1/models/hp/versions/1:predict", data='{"instances": [2]}')
    assert r.text == '{"predictions":[3.0]}'


def test_multi_input_multi_output_row_format(server):
    body = {"instances": [{"a": [1, 2], "b": 3}, {"a": [0.5, 0.5], "b": -1}]}
    assert ok(server.post("/v1/models/multi:predict", json=body)) == {
        "predictions": [{"b_twice": 6, "sum": 6.0}, {"b_twice": -2, "sum": 0.0}]}


def test_multi_input_multi_output_columnar_format(server):
    body = {"inputs": {"a": [[1, 2], [3, 4]], "b": [3, 4], "ignored": 1}}
    assert ok(server.post("/v1/models/multi:predict", json=body)) == {
        "outputs": {"b_twice": [6, 8], "sum": [6.0, 11.0]}}


def test_b64_input_and_bytes_output(server):
    raw = bytes([0, 255, 10, 200])
    body = {"signature_name": "strings",
            "instances": ["abc", {"b64": base64.b64encode(raw).decode()}]}
    out = ok(server.post("/v1/models/multi:predict", json=body))["predictions"]
    assert out[0] == {"upper": "ABC", "echo_bytes": {"b64": base64.b64encode(b"abc").decode()},
                      "length": 3}
    assert base64.b64decode(out[1]["echo_bytes"]["b64"]) == raw
    assert out[1]["length"] == 4


def test_b64_columnar_single_value(server):
    body = {"signature_name": "strings", "inputs": [{"b64": base64.b64encode(b"hi").decode()}]}
    out = ok(server.post("/v1/models/multi:predict", json=body))["outputs"]
    assert out["upper"] == ["HI"]


def test_scalar_input_and_output_columnar(server):
    body = {"signature_name": "scalar", "inputs": 3.5}
    assert ok(server.post("/v1/models/multi:predict", json=body)) == {"outputs": 7.0}


def test_scalar_signature_runs_on_a_batch_in_row_format(server):
    # Row format gives the input a batch dimension, [1] where the signature declares []; TF Serving
    # does not check declared shapes and feeds it into the graph, whose x * 2 takes it. (An output
    # without a batch dimension in row format is test_codec's "has no shape information".)
    body = {"signature_name": "scalar", "instances": [3.5]}
    assert ok(server.post("/v1/models/multi:predict", json=body)) == {"predictions": [7.0]}


def test_bool_tensors(server):
    body = {"signature_name": "boolean", "instances": [True, False]}
    assert ok(server.post("/v1/models/multi:predict", json=body)) == {"predictions": [False, True]}


def test_model_error_is_mapped_from_tf_status(server):
    body = {"signature_name": "positive_only", "instances": [-1.0]}
    r = server.post("/v1/models/multi:predict", json=body)
    assert r.status_code == 400
    assert "x must be > 0" in r.json()["error"]


# ------------------------------------------------------------------ classify / regress

def test_regress_as_documented(server):
    body = {"signature_name": "tensorflow/serving/regress", "examples": [{"x": 1.0}, {"x": 2.0}]}
    assert ok(server.post("/v1/models/hp/versions/1:regress", json=body)) == {"results": [2.5, 3.0]}


def test_regress_with_context_merges_features(server):
    body = {"signature_name": "regress_x2_to_y3", "context": {"x2": 4.0},
            "examples": [{"x": 1.0}, {"x": 1.0, "x2": 10.0}]}
    assert ok(server.post("/v1/models/hp/versions/1:regress", json=body)) == {"results": [5.0, 8.0]}


def test_classify_scores_only_gives_empty_labels(server):
    body = {"signature_name": "classify_x_to_y", "examples": [{"x": 1.0}, {"x": 2.0}]}
    assert ok(server.post("/v1/models/hp/versions/1:classify", json=body)) == {
        "results": [[["", 2.5]], [["", 3.0]]]}


def test_classify_with_classes_and_scores(server):
    body = {"signature_name": "classify_with_classes", "examples": [{"x": 0.0}]}
    out = ok(server.post("/v1/models/multi:classify", json=body))["results"]
    assert out == [[["neg", 0.5], ["pos", 0.5]]]


def test_classify_needs_example_signature(server):
    r = server.post("/v1/models/hp:classify", json={"examples": [{"x": 1.0}]})
    assert r.status_code == 400
    assert "inputs" in r.json()["error"]


# ------------------------------------------------------------------ models from other exporters

def test_keras3_export_serves_the_models_own_answers(server, model_root):
    import tensorflow as tf

    x = np.array([[1, 2, 3, 4], [0, -1, 0.5, 2]], dtype=np.float32)
    loaded = tf.saved_model.load(str(model_root / "keras" / "1"))
    expected = loaded.serve(x).numpy()
    out = ok(server.post("/v1/models/keras:predict", json={"instances": x.tolist()}))["predictions"]
    assert np.allclose(np.array(out), expected, rtol=1e-6)
    out = ok(server.post("/v1/models/keras:predict",
                         json={"signature_name": "serve", "inputs": {"features": x.tolist()}}))
    assert np.allclose(np.array(out["outputs"]), expected, rtol=1e-6)


def test_other_paths_get_html_404(server):
    r = server.get("/healthz-does-not-exist")
    assert r.status_code == 404
    assert "html" in r.headers["Content-Type"]
