"""Every /v1 route of TF Serving's REST API, in process: the real app over fake servables.

The answers are the ones tests/e2e/test_api_e2e.py asserts against real SavedModels (the fakes
in fakes.py compute the same functions), so the two tiers agree. Classify and regress are in
test_rest_examples.py (they need TensorFlow's Example protos today).
"""

from __future__ import annotations

import base64
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fakes import loaded, make_app, ok


def error(resp, status: int) -> str:
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.headers["Content-Type"] == "application/json"
    body = resp.get_json()
    assert set(body) == {"error"}
    return body["error"]


# ------------------------------------------------------------------ status

AVAILABLE_OK = {"state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}


def test_status_lists_every_version_newest_first(client):
    assert ok(client.get("/v1/models/hp")) == {"model_version_status": [
        {"version": "2", **AVAILABLE_OK}, {"version": "1", **AVAILABLE_OK}]}


def test_status_of_one_version(client):
    assert ok(client.get("/v1/models/hp/versions/1")) == {"model_version_status": [
        {"version": "1", **AVAILABLE_OK}]}


def test_status_of_version_outside_policy_is_404(client):
    # hp/3 is on disk but the specific policy aspires only to 1 and 2.
    assert error(client.get("/v1/models/hp/versions/3"), 404) == "Could not find version 3 of model hp"


def test_status_with_label_lists_all_versions_as_tf_serving_does(client):
    body = ok(client.get("/v1/models/hp/labels/stable"))
    assert [s["version"] for s in body["model_version_status"]] == ["2", "1"]


def test_status_reports_broken_version(client):
    states = {s["version"]: s for s in ok(client.get("/v1/models/flaky"))["model_version_status"]}
    assert states["1"] == {"version": "1", **AVAILABLE_OK}
    assert states["2"] == {"version": "2", "state": "END", "status": {
        "error_code": "DATA_LOSS", "error_message": "Can't parse saved_model.pb as binary proto"}}


def test_status_unknown_model(client):
    assert error(client.get("/v1/models/nope"), 404) == "Could not find any versions of model nope"


# ------------------------------------------------------------------ metadata

def test_metadata_renders_the_signature_def_map(client):
    body = ok(client.get("/v1/models/hp/versions/1/metadata"))
    assert body["model_spec"] == {"name": "hp", "signature_name": "", "version": "1"}
    defs = body["metadata"]["signature_def"]["signature_def"]
    assert defs["serving_default"]["inputs"]["x"]["dtype"] == "DT_FLOAT"
    assert defs["serving_default"]["inputs"]["x"]["tensor_shape"] == {
        "dim": [{"size": "-1", "name": ""}], "unknown_rank": False}
    assert defs["serving_default"]["method_name"] == "tensorflow/serving/predict"
    assert set(defs["tensorflow/serving/regress"]["outputs"]) == {"outputs"}
    assert defs["classify_x_to_y"]["inputs"]["inputs"]["dtype"] == "DT_STRING"
    assert body["metadata"]["signature_def"] == loaded(client.application, "hp", 1).signature_def_map


def test_metadata_of_latest_version_and_label(client):
    assert ok(client.get("/v1/models/hp/metadata"))["model_spec"]["version"] == "2"
    assert ok(client.get("/v1/models/hp/labels/stable/metadata"))["model_spec"]["version"] == "1"
    assert ok(client.get("/v1/models/hp/labels/canary/metadata"))["model_spec"]["version"] == "2"
    assert ok(client.get("/v1/models/hp/versions/2/metadata"))["model_spec"]["version"] == "2"


@pytest.mark.parametrize(("path", "status", "message"), [
    ("/v1/models/nope/metadata", 404, "Servable not found for request: Latest(nope)"),
    ("/v1/models/hp/versions/9/metadata", 404, "Servable not found for request: Specific(hp, 9)"),
    ("/v1/models/hp/versions/3/metadata", 404, "Servable not found for request: Specific(hp, 3)"),
    ("/v1/models/flaky/versions/2/metadata", 404, "Servable not found for request: Specific(flaky, 2)"),
    ("/v1/models/hp/labels/beta/metadata", 400, "Unrecognized servable version label: beta"),
])
def test_metadata_of_what_is_not_served(client, path, status, message):
    assert error(client.get(path), status) == message


# ------------------------------------------------------------------ predict

def test_predict_row_format(client):
    assert ok(client.post("/v1/models/hp/versions/1:predict", data='{"instances": [1.0, 2.0, 5.0]}')) == {
        "predictions": [2.5, 3.0, 4.5]}


def test_predict_columnar_format(client):
    assert ok(client.post("/v1/models/hp/versions/1:predict", data='{"inputs": [1.0, 2.0, 5.0]}')) == {
        "outputs": [2.5, 3.0, 4.5]}


def test_predict_named_single_input_row_and_columnar(client):
    assert ok(client.post("/v1/models/hp/versions/1:predict", data='{"inputs": {"x": [1.0]}}')) == {
        "outputs": [2.5]}
    assert ok(client.post("/v1/models/hp/versions/1:predict",
                          data='{"instances": [{"x": 1.0}, {"x": 3}]}')) == {"predictions": [2.5, 3.5]}


def test_latest_version_versions_and_labels(client):
    body = '{"instances": [1.0]}'
    assert ok(client.post("/v1/models/hp:predict", data=body)) == {"predictions": [3.5]}
    assert ok(client.post("/v1/models/hp/versions/1:predict", data=body)) == {"predictions": [2.5]}
    assert ok(client.post("/v1/models/hp/versions/2:predict", data=body)) == {"predictions": [3.5]}
    assert ok(client.post("/v1/models/hp/labels/stable:predict", data=body)) == {"predictions": [2.5]}
    assert ok(client.post("/v1/models/hp/labels/canary:predict", data=body)) == {"predictions": [3.5]}


def test_broken_newest_version_never_serves_latest_falls_back(client):
    assert ok(client.post("/v1/models/flaky:predict", json={"instances": [2.0]})) == {"predictions": [3.0]}
    r = client.post("/v1/models/flaky/versions/2:predict", json={"instances": [2.0]})
    assert error(r, 404) == "Servable not found for request: Specific(flaky, 2)"


def test_paths_are_case_insensitive_like_tf_serving(client):
    assert ok(client.post("/V1/MODELS/hp/VERSIONS/1:PREDICT", json={"instances": [1.0]})) == {
        "predictions": [2.5]}
    assert ok(client.post("/v1/Models/hp/Labels/stable:Predict", json={"instances": [1.0]})) == {
        "predictions": [2.5]}
    assert ok(client.get("/V1/models/hp/VERSIONS/1/METADATA"))["model_spec"]["version"] == "1"
    assert [s["version"] for s in ok(client.get("/v1/MODELS/hp"))["model_version_status"]] == ["2", "1"]


def test_model_names_are_case_sensitive(client):
    r = client.post("/v1/models/HP:predict", json={"instances": [1.0]})
    assert error(r, 404) == "Servable not found for request: Latest(HP)"


def test_url_encoded_model_name_and_label_are_decoded(client):
    assert ok(client.post("/v1/models/%68p:predict", json={"instances": [1.0]})) == {"predictions": [3.5]}
    assert ok(client.post("/v1/models/hp/labels/st%61ble:predict", json={"instances": [1.0]})) == {
        "predictions": [2.5]}


def test_query_string_is_ignored(client):
    assert ok(client.post("/v1/models/hp/versions/1:predict?x=1", json={"instances": [1.0]})) == {
        "predictions": [2.5]}


def test_signature_name_selects_signature(client):
    body = {"signature_name": "tensorflow/serving/predict", "instances": [4.0]}
    assert ok(client.post("/v1/models/hp/versions/1:predict", json=body)) == {"predictions": [4.0]}


def test_content_type_is_ignored_as_tf_serving_does(client):
    # curl -d sends application/x-www-form-urlencoded.
    r = client.post("/v1/models/hp/versions/1:predict", data='{"instances": [1.0]}',
                    headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert ok(r) == {"predictions": [2.5]}
    r = client.post("/v1/models/hp/versions/1:predict", data='{"instances": [1.0]}',
                    headers={"Content-Type": "text/plain"})
    assert ok(r) == {"predictions": [2.5]}


def test_nan_and_infinity_in_and_out(client):
    r = client.post("/v1/models/multi:predict",
                    data='{"signature_name": "double", "instances": [3.0, NaN, Infinity, -Infinity]}')
    assert r.status_code == 200
    assert r.get_data(as_text=True) == '{"predictions":[1.0,NaN,Infinity,-Infinity]}'
    values = ok(r)["predictions"]
    assert math.isnan(values[1]) and values[2] == math.inf and values[3] == -math.inf


def test_float32_output_round_trips_to_the_same_float32(client):
    xs = [0.1, 1e-7, 123456.789, 3e20]
    out = ok(client.post("/v1/models/hp/versions/1:predict", json={"instances": xs}))["predictions"]
    expected = np.float32(0.5) * np.array(xs, dtype=np.float32) + np.float32(2.0)
    assert np.array_equal(np.array(out, dtype=np.float32), expected)


def test_whole_floats_keep_a_decimal_point(client):
    r = client.post("/v1/models/hp/versions/1:predict", data='{"instances": [2]}')
    assert r.get_data() == b'{"predictions":[3.0]}'


def test_multi_input_multi_output_row_format(client):
    body = {"instances": [{"a": [1, 2], "b": 3}, {"a": [0.5, 0.5], "b": -1}]}
    assert ok(client.post("/v1/models/multi:predict", json=body)) == {
        "predictions": [{"b_twice": 6, "sum": 6.0}, {"b_twice": -2, "sum": 0.0}]}


def test_multi_input_multi_output_columnar_format(client):
    body = {"inputs": {"a": [[1, 2], [3, 4]], "b": [3, 4], "ignored": 1}}
    assert ok(client.post("/v1/models/multi:predict", json=body)) == {
        "outputs": {"b_twice": [6, 8], "sum": [6.0, 11.0]}}


def test_b64_input_and_bytes_output(client):
    raw = bytes([0, 255, 10, 200])
    body = {"signature_name": "strings", "instances": ["abc", {"b64": base64.b64encode(raw).decode()}]}
    out = ok(client.post("/v1/models/multi:predict", json=body))["predictions"]
    assert out[0] == {"upper": "ABC", "echo_bytes": {"b64": base64.b64encode(b"abc").decode()}, "length": 3}
    assert base64.b64decode(out[1]["echo_bytes"]["b64"]) == raw
    # A string output that is not UTF-8 is written as b64 (TF Serving writes invalid JSON).
    assert base64.b64decode(out[1]["upper"]["b64"]) == raw.upper()
    assert out[1]["length"] == 4


def test_b64_columnar_and_url_safe_alphabet(client):
    body = {"signature_name": "strings", "inputs": [{"b64": base64.b64encode(b"hi").decode()}]}
    assert ok(client.post("/v1/models/multi:predict", json=body))["outputs"]["upper"] == ["HI"]
    body = {"signature_name": "strings", "inputs": [{"b64": "-_8"}]}  # URL-safe, unpadded
    out = ok(client.post("/v1/models/multi:predict", json=body))["outputs"]
    assert base64.b64decode(out["echo_bytes"][0]["b64"]) == b"\xfb\xff"


def test_scalar_input_and_output_columnar(client):
    body = {"signature_name": "scalar", "inputs": 3.5}
    assert ok(client.post("/v1/models/multi:predict", json=body)) == {"outputs": 7.0}


def test_scalar_signature_runs_on_a_batch_in_row_format(client):
    # Row format gives the input a batch dimension, [1] where the signature declares []; TF Serving
    # does not check declared shapes and feeds it into the graph, whose x * 2 takes it. (An output
    # without a batch dimension in row format is test_codec's "has no shape information".)
    body = {"signature_name": "scalar", "instances": [3.5]}
    assert ok(client.post("/v1/models/multi:predict", json=body)) == {"predictions": [7.0]}


def test_bool_tensors(client):
    body = {"signature_name": "boolean", "instances": [True, False]}
    assert ok(client.post("/v1/models/multi:predict", json=body)) == {"predictions": [False, True]}


def test_dense_bodies_decode_as_the_general_path(client):
    rows = [[float(i + j) / 4 for j in range(16)] for i in range(3)]
    sums = [float(np.float32(np.array(r, dtype=np.float32).sum())) for r in rows]
    # A dense body (the simdjson path), and one the general path must take (an object per row).
    assert ok(client.post("/v1/models/wide:predict", json={"instances": rows})) == {"predictions": sums}
    assert ok(client.post("/v1/models/wide:predict", json={"instances": [{"x": r} for r in rows]})) == {
        "predictions": sums}
    assert ok(client.post("/v1/models/wide:predict", json={"inputs": rows})) == {"outputs": sums}


def test_the_model_runs_once_per_distinct_request(app, client):
    sig = loaded(app, "hp", 1).signature("")
    before = sig.runs
    for _ in range(3):
        assert ok(client.post("/v1/models/hp/versions/1:predict", json={"instances": [123.0]})) == {
            "predictions": [63.5]}
    assert sig.runs == before + 1  # the in-process cache answered the other two


def test_batching_gives_the_same_answers(tmp_path):
    client = make_app(tmp_path, enable_batching=True).test_client()
    assert ok(client.post("/v1/models/hp/versions/1:predict", json={"instances": [1.0, 2.0]})) == {
        "predictions": [2.5, 3.0]}
    body = {"inputs": {"a": [[1, 2], [3, 4]], "b": [3, 4]}}
    assert ok(client.post("/v1/models/multi:predict", json=body)) == {
        "outputs": {"b_twice": [6, 8], "sum": [6.0, 11.0]}}


# ------------------------------------------------------------------ errors from the model

def test_model_error_keeps_its_tf_status(client):
    r = client.post("/v1/models/multi:predict", json={"signature_name": "positive_only", "instances": [-1.0]})
    assert error(r, 400) == "assertion failed: [x must be > 0]"
    r = client.post("/v1/models/multi:predict", json={"signature_name": "unavailable", "instances": [1.0]})
    assert error(r, 503) == "the device went away"


def test_a_crashing_model_is_a_json_500_and_the_next_request_is_served(client, caplog):
    r = client.post("/v1/models/multi:predict", json={"signature_name": "crash", "instances": [1.0]})
    assert error(r, 500) == "Internal error: RuntimeError: boom"
    assert "unexpected error" in caplog.text
    assert ok(client.post("/v1/models/hp/versions/1:predict", json={"instances": [1.0]})) == {
        "predictions": [2.5]}


def test_a_request_past_its_deadline_is_504(client):
    # The connection layer (tfwsgi.worker) puts the request's deadline in the environ.
    r = client.post("/v1/models/hp/versions/1:predict", json={"instances": [77.0]},
                    environ_base={"tfwsgi.deadline": 0.0})
    assert error(r, 504) == ("Deadline exceeded: the request was not answered within "
                             "rest_api_timeout_in_ms")


def test_a_deadline_further_than_a_wait_can_reach_is_no_deadline(tmp_path):
    # TFWSGI_REST_API_TIMEOUT_IN_MS = 10**13 (317 years): beyond threading.TIMEOUT_MAX, which
    # the batcher's wait (and the graph's turn) would refuse with OverflowError, a 500.
    client = make_app(tmp_path, enable_batching=True).test_client()
    r = client.post("/v1/models/hp/versions/1:predict", json={"instances": [1.0]},
                    environ_base={"tfwsgi.deadline": time.monotonic() + 10**10})
    assert ok(r) == {"predictions": [2.5]}


# ------------------------------------------------------------------ other paths are Flask's

def test_other_paths_get_html_404(client):
    r = client.get("/healthz-does-not-exist")
    assert r.status_code == 404 and "html" in r.headers["Content-Type"]
    r = client.get("/v1")  # not /v1/: not TF Serving's
    assert r.status_code == 404 and "html" in r.headers["Content-Type"]


def test_the_fake_tier_needs_no_tensorflow(tmp_path):
    """Predict, status, metadata, errors, health and metrics run without importing TensorFlow
    (in a fresh interpreter: this session may have imported it for classify/regress)."""
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from pathlib import Path
from fakes import make_app
client = make_app(Path({str(tmp_path)!r})).test_client()
r = client.post("/v1/models/hp:predict", json={{"instances": [1.0]}})
assert r.get_json() == {{"predictions": [3.5]}}
assert client.post("/v1/models/wide:predict", json={{"inputs": [[1.0] * 16]}}).status_code == 200
assert client.get("/v1/models/hp").status_code == client.get("/v1/models/hp/metadata").status_code == 200
assert client.post("/v1/models/hp:predict", data=b"{{").status_code == 400
assert client.get("/v2/health/ready").status_code == client.get("/metrics").status_code == 200
sys.exit("tensorflow" in sys.modules)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=120).returncode == 0


def test_the_signature_method_name_check_is_tf_servings(tmp_path):
    """--enable_signature_method_name_check (TFWSGI_ENABLE_SIGNATURE_METHOD_NAME_CHECK): off, a
    predict may run any signature (TF Serving's default); on, only predict/classify/regress ones."""
    from fakes import FakeModel, FakeServable, FakeSignature

    def odd(name, version, path):
        return FakeServable(name, version, path, [FakeSignature(
            "serving_default", {"x": np.dtype(np.float32)}, {"y": np.dtype(np.float32)},
            lambda x: {"y": x}, {"x": (None,)}, "my/own/method")])

    body = {"instances": [1.0]}
    off = make_app(tmp_path / "off", [FakeModel("odd", {1: odd})]).test_client()
    assert ok(off.post("/v1/models/odd:predict", json=body)) == {"predictions": [1.0]}
    on = make_app(tmp_path / "on", [FakeModel("odd", {1: odd})],
                  enable_signature_method_name_check=True).test_client()
    r = on.post("/v1/models/odd:predict", json=body)
    assert r.status_code == 500 and r.get_json() == {"error": (
        "Expected prediction signature method_name to be one of {tensorflow/serving/predict, "
        "tensorflow/serving/classify, tensorflow/serving/regress}. Was: my/own/method")}
    hp = make_app(tmp_path / "hp", enable_signature_method_name_check=True).test_client()
    assert ok(hp.post("/v1/models/hp:predict", json=body)) == {"predictions": [3.5]}  # version 2
