"""Every error the REST layer answers, in process: a JSON ``{"error": …}`` with TF Serving's status
and text (the table of tests/e2e/test_bad_input_e2e.py), request paths and methods, the body limit
(413), a bad Content-Length, HEAD. Classify/regress bodies are in test_rest_examples.py."""

from __future__ import annotations

import io

import pytest
from fakes import make_app
from flask import Response
from flask.testing import FlaskClient
from werkzeug.test import EnvironBuilder

P = "/v1/models/hp/versions/1:predict"
M = "/v1/models/multi:predict"
W = "/v1/models/wide:predict"
LIMIT = 4096

CASES = [
    # (id, method, path, body, status, part of the message)
    ("malformed-json", "POST", P, b'{"instances": [1.0,', 400, "JSON Parse error"),
    ("empty-body", "POST", P, b"", 400, "JSON Parse error: The document is empty"),
    ("whitespace-body", "POST", P, b"   ", 400, "The document is empty"),
    ("top-level-list", "POST", P, b"[1, 2]", 400, "JSON Value: [1,2] Is not object"),
    ("top-level-string", "POST", P, b'"abc"', 400, "Is not object"),
    ("invalid-utf8", "POST", P, b'{"instances": ["\xff\xfe"]}', 400, "JSON Parse error"),
    ("both-keys", "POST", P, b'{"instances": [1], "inputs": [1]}', 400,
     "Not formatted correctly expecting only one of 'inputs' or 'instances' keys to exist"),
    ("neither-key", "POST", P, b'{"values": [1]}', 400, "Missing 'inputs' or 'instances' key"),
    ("instances-not-list", "POST", P, b'{"instances": 1.0}', 400,
     "Expecting 'instances' to be an list/array"),
    ("instances-empty", "POST", P, b'{"instances": []}', 400, "No values in 'instances' array"),
    ("string-for-float", "POST", P, b'{"instances": ["a"]}', 400,
     'JSON Value: "a" Type: String is not of expected type: float'),
    ("null-for-float", "POST", P, b'{"instances": [null]}', 400, "Type: Null is not of expected type: float"),
    ("bool-for-float", "POST", P, b'{"instances": [true]}', 400, "Type: True is not of expected type: float"),
    ("object-for-float", "POST", P, b'{"instances": [{"b64": "AAAA"}]}', 400, "is not of expected type"),
    ("ragged", "POST", W, b'{"instances": [[1, 2, 3, 4], [1, 2]]}', 400,
     "Failed to process element: 1 of 'instances' list. Error: INVALID_ARGUMENT: Expecting tensor size: 4"),
    ("ragged-columnar", "POST", W, b'{"inputs": [[1, 2, 3, 4], [1, 2]]}', 400,
     "Encountered list at unexpected size: 2 at level: 1 expected size: 4"),
    ("ragged-dense-width", "POST", W,
     b'{"instances": [' + b"[" + b"1.5," * 15 + b"1.5], [" + b"1.5," * 14 + b"1.5]]}", 400,
     "Expecting tensor size: 16 but got: 15"),
    ("wrong-inner-shape", "POST", W, b'{"instances": [[1, 2, 3]]}', 400,
     "Input 'x' has shape [1,3], which does not match the signature's shape [-1,16]"),
    ("wrong-rank", "POST", P, b'{"instances": [[1.0], [2.0]]}', 400, "does not match the signature"),
    ("int32-overflow", "POST", M, b'{"instances": [{"a": [1, 2], "b": 1099511627776}]}', 400,
     "is not of expected type: int32"),
    ("float-for-int", "POST", M, b'{"instances": [{"a": [1, 2], "b": 1.5}]}', 400,
     "is not of expected type: int32"),
    ("nan-for-int", "POST", M, b'{"inputs": {"a": [[1, 2]], "b": [NaN]}}', 400, "int32"),
    ("unknown-model", "POST", "/v1/models/nope:predict", b'{"instances": [1]}', 404,
     "Servable not found for request: Latest(nope)"),
    ("unknown-version", "POST", "/v1/models/hp/versions/9:predict", b'{"instances": [1]}', 404,
     "Servable not found for request: Specific(hp, 9)"),
    ("unknown-label", "POST", "/v1/models/hp/labels/beta:predict", b'{"instances": [1]}', 400,
     "Unrecognized servable version label: beta"),
    ("version-overflow", "POST", "/v1/models/hp/versions/99999999999999999999:predict",
     b'{"instances": [1]}', 400, "Failed to convert version: 99999999999999999999 to numeric."),
    ("version-not-a-number", "POST", "/v1/models/hp/versions/one:predict", b'{"instances": [1]}', 400,
     "Malformed request: POST /v1/models/hp/versions/one:predict"),
    ("unknown-signature", "POST", P, b'{"signature_name": "nope", "instances": [1]}', 400,
     'Serving signature name: "nope" not found in signature def'),
    ("signature-not-string", "POST", P, b'{"signature_name": 3, "instances": [1]}', 400,
     "'signature_name' key must be a string value"),
    ("unknown-verb", "POST", "/v1/models/hp:explode", b"{}", 400,
     "Malformed request: POST /v1/models/hp:explode"),
    ("get-on-predict", "GET", "/v1/models/hp:predict", None, 400,
     "Malformed request: GET /v1/models/hp:predict"),
    ("post-on-status", "POST", "/v1/models/hp", b"{}", 400, "Malformed request: POST /v1/models/hp"),
    ("put-status", "PUT", "/v1/models/hp", b"{}", 400, "Malformed request: PUT /v1/models/hp"),
    ("delete-status", "DELETE", "/v1/models/hp", None, 400, "Malformed request: DELETE /v1/models/hp"),
    ("options-without-cors", "OPTIONS", P, None, 400, f"Malformed request: OPTIONS {P}"),
    ("trailing-slash", "GET", "/v1/models/hp/", None, 400, "Malformed request: GET /v1/models/hp/"),
    ("double-slash", "GET", "/v1/models//hp", None, 400, "Malformed request"),
    ("not-models", "GET", "/v1/whatever", None, 400, "Malformed request: GET /v1/whatever"),
    ("no-model-name", "GET", "/v1/models", None, 400, "Missing model name in request."),
    ("multi-input-plain-list", "POST", M, b'{"instances": [[1, 2]]}', 400,
     "instances is a plain list, but expecting list of objects as multiple input tensors required"),
    ("multi-input-plain-inputs", "POST", M, b'{"inputs": [[1, 2]]}', 400,
     "inputs is a plain value/list, but expecting an object as multiple input tensors required"),
    ("named-missing-key", "POST", M, b'{"instances": [{"a": [1, 2]}]}', 400, "keys must be equal to: a,b"),
    ("named-unknown-key", "POST", M, b'{"instances": [{"a": [1, 2], "b": 1, "c": 2}]}', 400,
     "does not have named input: c"),
    ("mixed-objects-and-lists", "POST", M, b'{"instances": [{"a": [1, 2], "b": 1}, [1]]}', 400,
     "Expecting object but got list at item 1"),
    ("columnar-missing-input", "POST", M, b'{"inputs": {"a": [[1, 2]]}}', 400,
     "Missing named input: b in 'inputs' object."),
    ("bad-base64", "POST", M, b'{"signature_name": "strings", "instances": [{"b64": "!!!"}]}', 400,
     "Unable to base64 decode"),
    ("non-b64-object-for-string", "POST", M, b'{"signature_name": "strings", "inputs": [{"c": 1}]}',
     400, "not formatted correctly for base64 data"),
    ("number-for-string", "POST", M, b'{"signature_name": "strings", "instances": [1]}', 400,
     "is not of expected type: string"),
    ("deeply-nested", "POST", P, b'{"instances": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400,
     "JSON Parse error"),
    ("nested-beyond-max-rank", "POST", P, b'{"instances": ' + b"[" * 500 + b"1" + b"]" * 500 + b"}",
     400, "rank"),
    ("deeply-nested-objects", "POST", P,
     b'{"instances": ' + b'{"a": ' * 100000 + b"1" + b"}" * 100000 + b"}", 400, "JSON Parse error"),
    ("deeply-nested-with-nan", "POST", P,  # NaN sends it to the fallback parser
     b'{"instances": ' + b"[" * 100000 + b"NaN" + b"]" * 100000 + b"}", 400, "JSON Parse error"),
    ("nested-1000-deep-quoted-in-the-error", "POST", P,  # was a RecursionError and a 500
     b'{"signature_name": 1, "x": ' + b"[" * 1000 + b"]" * 1000 + b"}", 400,
     "'signature_name' key must be a string value"),
    ("number-too-large", "POST", P, b'{"instances": [1e400]}', 400, "JSON Parse error"),
]


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> FlaskClient:
    return make_app(tmp_path_factory.mktemp("errors")).test_client()


@pytest.fixture(scope="module")
def limited(tmp_path_factory) -> FlaskClient:
    """TFWSGI_MAX_REQUEST_BYTES=4096."""
    return make_app(tmp_path_factory.mktemp("limited"), max_request_bytes=LIMIT).test_client()


def json_error(resp, status: int) -> str:
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.headers["Content-Type"] == "application/json"
    assert "Cache-Status" not in resp.headers
    body = resp.get_json()
    assert set(body) == {"error"}
    return body["error"]


@pytest.mark.parametrize(("method", "path", "body", "status", "message"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_json_4xx(client, method, path, body, status, message):
    assert message in json_error(client.open(path, method=method, data=body), status)


def test_every_case_differs():
    assert len({c[0] for c in CASES}) == len(CASES) >= 50


# ------------------------------------------------------------------ the body: length and limit

OVER = b'{"instances": [' + b"1.0, " * (LIMIT // 5) + b"1.0]}"
TOO_LARGE = f"Request body is larger than the limit of {LIMIT} bytes"


def without_length(client: FlaskClient, path: str, body: bytes):
    """POST a body with no Content-Length, as the server hands the app a chunked one (straight to
    the WSGI app: the test client would measure the stream and set a Content-Length again)."""
    environ = EnvironBuilder(path, method="POST", input_stream=io.BytesIO(body)).get_environ()
    del environ["CONTENT_LENGTH"]
    return Response.from_app(client.application, environ)


def test_oversize_body_gets_413_json(limited):
    assert len(OVER) > LIMIT
    assert json_error(limited.post(P, data=OVER), 413) == TOO_LARGE


def test_oversize_body_without_content_length_gets_413_json(limited):
    # Chunked: the server decodes it and gives no CONTENT_LENGTH; the limit counts what is read.
    r = without_length(limited, P, OVER)
    assert json_error(r, 413) == TOO_LARGE


def test_oversize_body_on_an_unknown_model_is_still_413(limited):
    assert json_error(limited.post("/v1/models/nope:predict", data=OVER), 413) == TOO_LARGE


def test_body_of_exactly_the_limit_is_accepted(limited):
    head = b'{"instances": [1.0]'
    body = head + b" " * (LIMIT - len(head) - 1) + b"}"
    assert len(body) == LIMIT
    r = limited.post(P, data=body)
    assert r.status_code == 200 and r.get_json() == {"predictions": [2.5]}
    r = without_length(limited, P, body)
    assert r.status_code == 200 and r.get_json() == {"predictions": [2.5]}


def test_one_byte_over_the_limit_is_413(limited):
    head = b'{"instances": [1.0]'
    body = head + b" " * (LIMIT - len(head)) + b"}"
    assert len(body) == LIMIT + 1
    assert json_error(limited.post(P, data=body), 413) == TOO_LARGE
    assert json_error(without_length(limited, P, body), 413) == TOO_LARGE


def test_a_413_reads_the_refused_body_so_the_client_sees_the_answer(limited):
    stream = io.BytesIO(OVER)
    r = limited.post(P, input_stream=stream, content_length=len(OVER))
    assert r.status_code == 413
    assert stream.tell() == len(OVER)


@pytest.mark.parametrize("length", ["12x", "-1", "1.5", " 4"])
def test_a_bad_content_length_is_400(client, length):
    r = client.post(P, data=b'{"instances": [1.0]}', environ_overrides={"CONTENT_LENGTH": length})
    assert json_error(r, 400) == f"Invalid Content-Length: {length}"


def test_a_content_length_shorter_than_the_body_reads_only_that_much(client):
    r = client.post(P, data=b'{"instances": [1.0]} trailing', environ_overrides={"CONTENT_LENGTH": "20"})
    assert r.status_code == 200 and r.get_json() == {"predictions": [2.5]}


# ------------------------------------------------------------------ HEAD

def test_head_of_status_and_metadata_has_the_get_headers_and_no_body(client):
    for path in ("/v1/models/hp", "/v1/models/hp/versions/1/metadata"):
        get, head = client.get(path), client.head(path)
        assert head.status_code == get.status_code == 200
        assert head.get_data() == b""
        assert head.headers["Content-Type"] == "application/json"
        assert head.headers["Content-Length"] == str(len(get.get_data()))


def test_head_of_an_error_has_no_body(client):
    r = client.head("/v1/models/nope")
    assert r.status_code == 404 and r.get_data() == b""
    assert r.headers["Content-Type"] == "application/json"
    r = client.head(P)  # predict takes only POST
    assert r.status_code == 400 and r.get_data() == b""
