"""Classify and regress, in process: the real app over fake servables.

The REST layer serializes the JSON examples into tf.Example protos with TensorFlow's own messages
(``tfwsgi.servable.serialize_examples``), so these requests import TensorFlow into the test
process (once, a few seconds; nothing runs in it). The answers and error texts are those of
tests/e2e/test_api_e2e.py and test_bad_input_e2e.py.
"""

from __future__ import annotations

import json

import pytest

from fakes import FakeModel, half_plus_two, loaded, make_app, ok
from tfwsgi.source import ALL, VersionPolicy

C = "/v1/models/multi:classify"
R = "/v1/models/hp/versions/1:regress"



def test_regress_as_documented(client):
    body = {"signature_name": "tensorflow/serving/regress", "examples": [{"x": 1.0}, {"x": 2.0}]}
    assert ok(client.post(R, json=body)) == {"results": [2.5, 3.0]}


def test_regress_with_context_merges_features(client):
    body = {"signature_name": "regress_x2_to_y3", "context": {"x2": 4.0},
            "examples": [{"x": 1.0}, {"x": 1.0, "x2": 10.0}]}
    assert ok(client.post(R, json=body)) == {"results": [5.0, 8.0]}


def test_regress_by_version_label_and_latest(client):
    body = {"signature_name": "regress_x_to_y", "examples": [{"x": 2.0}]}
    assert ok(client.post("/v1/models/hp:regress", json=body)) == {"results": [4.0]}
    assert ok(client.post("/v1/models/hp/labels/stable:regress", json=body)) == {"results": [3.0]}
    assert ok(client.post("/V1/MODELS/hp/VERSIONS/2:REGRESS", json=body)) == {"results": [4.0]}


def test_classify_scores_only_gives_empty_labels(client):
    body = {"signature_name": "classify_x_to_y", "examples": [{"x": 1.0}, {"x": 2.0}]}
    assert ok(client.post("/v1/models/hp/versions/1:classify", json=body)) == {
        "results": [[["", 2.5]], [["", 3.0]]]}


def test_classify_with_classes_and_scores(client):
    body = {"signature_name": "classify_with_classes", "examples": [{"x": 0.0}]}
    assert ok(client.post(C, json=body)) == {"results": [[["neg", 0.5], ["pos", 0.5]]]}


def test_classify_and_regress_are_cached(app, client):
    sig = loaded(app, "multi", 7).signatures["classify_with_classes"]
    before = sig.runs
    body = {"signature_name": "classify_with_classes", "examples": [{"x": 3.0}]}
    first, second = client.post(C, json=body), client.post(C, json=body)
    assert first.headers["Cache-Status"] == "tfwsgi; fwd=miss; stored"
    assert second.headers["Cache-Status"] == "tfwsgi; hit"
    assert ok(first) == ok(second)
    assert sig.runs == before + 1
    body = {"signature_name": "tensorflow/serving/regress", "examples": [{"x": 9.0}]}
    assert client.post(R, json=body).headers["Cache-Status"] == "tfwsgi; fwd=miss; stored"
    r = client.post(R, json=body, headers={"Cache-Control": "no-store"})
    assert r.headers["Cache-Status"] == "tfwsgi; fwd=bypass" and ok(r) == {"results": [6.5]}


CASES = [
    # (id, path, body, status, part of the message)
    ("malformed-json", C, b'{"examples": [', 400, "JSON Parse error"),
    ("not-an-object", C, b"[1]", 400, "Is not object"),
    ("classify-no-examples", C, b'{"signature_name": "classify_with_classes"}', 400,
     "When method is classify, key 'examples' is expected and was not found"),
    ("classify-examples-not-list", C, b'{"examples": {"x": 1}}', 400,
     "Expecting 'examples' value to be an list/array"),
    ("classify-examples-empty", C, b'{"examples": []}', 400, "'examples' value is an empty array"),
    ("classify-example-not-object", C, b'{"examples": [1]}', 400,
     "Example must be JSON object but got JSON Number"),
    ("classify-null-feature", C, b'{"examples": [{"x": null}]}', 400,
     "Feature: x has element with unexpected JSON type: Null"),
    ("classify-nested-feature", C, b'{"examples": [{"x": [[1.0]]}]}', 400, "unexpected JSON type: Array"),
    ("nested-1000-deep-feature", C, b'{"examples": [{"x": ' + b"[" * 1000 + b"]" * 1000 + b"}]}", 400,
     "unexpected JSON type: Array"),
    ("classify-mixed-feature", C, b'{"examples": [{"x": [1.0, "a"]}]}', 400,
     "Unexpected element type in feature: x expecting type: float"),
    ("classify-context-not-object", C, b'{"context": [1], "examples": [{"x": 1.0}]}', 400,
     "Example must be JSON object but got JSON Array"),
    ("classify-unknown-signature", C, b'{"signature_name": "zz", "examples": [{"x": 1.0}]}', 400,
     "No signature was found with the name: zz"),
    ("classify-bad-b64-feature", C, b'{"examples": [{"x": {"b64": "!!"}}]}', 400, "Unable to base64 decode"),
    ("signature-not-string", C, b'{"signature_name": [], "examples": [{"x": 1.0}]}', 400,
     "'signature_name' key must be a string value"),
    ("regress-on-predict-signature", R, b'{"examples": [{"x": 1.0}]}', 400,
     "No classification inputs found in SignatureDef: serving_default"),
    ("regress-on-classify-signature", R, b'{"signature_name": "classify_x_to_y", "examples": [{"x": 1.0}]}',
     400, "No regression outputs found in SignatureDef: classify_x_to_y"),
    ("uint64-feature", R,
     b'{"signature_name": "regress_x_to_y", "examples": [{"x": 18446744073709551615}]}', 400,
     "Feature: x has uint64_t element. Only int64_t is supported."),
    ("unknown-model", "/v1/models/nope:regress", b'{"examples": [{"x": 1.0}]}', 404,
     "Servable not found for request: Latest(nope)"),
    ("unknown-version", "/v1/models/hp/versions/9:classify", b'{"examples": [{"x": 1.0}]}', 404,
     "Servable not found for request: Specific(hp, 9)"),
    ("unknown-label", "/v1/models/hp/labels/beta:classify", b'{"examples": [{"x": 1.0}]}', 400,
     "Unrecognized servable version label: beta"),
]


@pytest.mark.parametrize(("path", "body", "status", "message"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_examples_get_json_4xx(client, path, body, status, message):
    r = client.post(path, data=body)
    assert r.status_code == status, r.get_data(as_text=True)
    assert r.headers["Content-Type"] == "application/json"
    payload = r.get_json()
    assert set(payload) == {"error"} and message in payload["error"]


def test_oversize_examples_get_413(tmp_path):
    client = make_app(tmp_path, max_request_bytes=256).test_client()
    body = {"examples": [{"x": float(i)} for i in range(100)]}
    r = client.post(C, json=body)
    assert r.status_code == 413
    assert r.get_json() == {"error": "Request body is larger than the limit of 256 bytes"}


def test_the_documented_classify_and_regress_examples(tmp_path):
    """The spec's examples (tfwsgi/openapi.json) on its example model, in every path form."""
    from importlib import resources

    spec = json.loads(resources.files("tfwsgi").joinpath("openapi.json").read_bytes())
    params = {name: p["example"] for name, p in spec["components"]["parameters"].items() if p["in"] == "path"}

    def hp(b: float):
        return lambda name, version, path: half_plus_two(name, version, path, b)

    model = FakeModel("half_plus_two", {1: hp(2.0), 2: hp(3.0)}, VersionPolicy(ALL),
                      {"stable": 1, "canary": 2})
    client = make_app(tmp_path, [model]).test_client()
    seen = 0
    for template, item in spec["paths"].items():
        if template.endswith((":classify", ":regress")):
            example = item["post"]["requestBody"]["content"]["application/json"]["example"]
            r = client.post(template.format(**params), json=example)
            assert ok(r)["results"], template
            seen += 1
    assert seen == 6
    body = {"signature_name": "tensorflow/serving/regress", "examples": [{"x": 1.0}, {"x": 2.0}]}
    r = client.post("/v1/models/half_plus_two/versions/1:regress", json=body)
    assert ok(r) == {"results": [2.5, 3.0]}
