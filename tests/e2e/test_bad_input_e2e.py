"""Bad input gets a clear 4xx JSON error from the real server, and no worker dies of it."""

from __future__ import annotations

import socket

import pytest
import requests

pytestmark = pytest.mark.e2e

P = "/v1/models/hp/versions/1:predict"
M = "/v1/models/multi:predict"
K = "/v1/models/keras:predict"
C = "/v1/models/multi:classify"
R = "/v1/models/hp/versions/1:regress"

CASES = [
    # (id, method, path, body, status, part of the message)
    ("malformed-json", "POST", P, b'{"instances": [1.0,', 400, "JSON Parse error"),
    ("empty-body", "POST", P, b"", 400, "The document is empty"),
    ("whitespace-body", "POST", P, b"   ", 400, "The document is empty"),
    ("top-level-list", "POST", P, b"[1, 2]", 400, "Is not object"),
    ("top-level-string", "POST", P, b'"abc"', 400, "Is not object"),
    ("invalid-utf8", "POST", P, b'{"instances": ["\xff\xfe"]}', 400, "JSON Parse error"),
    ("both-keys", "POST", P, b'{"instances": [1], "inputs": [1]}', 400, "expecting only one of"),
    ("neither-key", "POST", P, b'{"values": [1]}', 400, "Missing 'inputs' or 'instances' key"),
    ("instances-not-list", "POST", P, b'{"instances": 1.0}', 400, "to be an list/array"),
    ("instances-empty", "POST", P, b'{"instances": []}', 400, "No values in 'instances' array"),
    ("string-for-float", "POST", P, b'{"instances": ["a"]}', 400, "is not of expected type: float"),
    ("null-for-float", "POST", P, b'{"instances": [null]}', 400, "Type: Null is not of expected type"),
    ("bool-for-float", "POST", P, b'{"instances": [true]}', 400, "is not of expected type: float"),
    ("object-for-float", "POST", P, b'{"instances": [{"b64": "AAAA"}]}', 400, "is not of expected type"),
    ("ragged", "POST", K, b'{"instances": [[1, 2, 3, 4], [1, 2]]}', 400, "Expecting tensor size"),
    ("ragged-columnar", "POST", K, b'{"inputs": [[1, 2, 3, 4], [1, 2]]}', 400, "unexpected size"),
    ("wrong-inner-shape", "POST", K, b'{"instances": [[1, 2, 3]]}', 400, "does not match the signature"),
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
     b'{"instances": [1]}', 400, "Failed to convert version"),
    ("unknown-signature", "POST", P, b'{"signature_name": "nope", "instances": [1]}', 400,
     'Serving signature name: "nope" not found in signature def'),
    ("signature-not-string", "POST", P, b'{"signature_name": 3, "instances": [1]}', 400,
     "'signature_name' key must be a string value"),
    ("unknown-verb", "POST", "/v1/models/hp:explode", b"{}", 400, "Malformed request: POST"),
    ("get-on-predict", "GET", "/v1/models/hp:predict", None, 400, "Malformed request: GET"),
    ("put-status", "PUT", "/v1/models/hp", b"{}", 400, "Malformed request: PUT"),
    ("trailing-slash", "GET", "/v1/models/hp/", None, 400, "Malformed request"),
    ("no-model-name", "GET", "/v1/models", None, 400, "Missing model name in request."),
    ("multi-input-plain-list", "POST", M, b'{"instances": [[1, 2]]}', 400, "instances is a plain list"),
    ("multi-input-plain-inputs", "POST", M, b'{"inputs": [[1, 2]]}', 400,
     "inputs is a plain value/list"),
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
    ("nested-1000-deep-feature", "POST", C,
     b'{"examples": [{"x": ' + b"[" * 1000 + b"]" * 1000 + b"}]}", 400, "unexpected JSON type: Array"),
    ("number-too-large", "POST", P, b'{"instances": [1e400]}', 400, "JSON Parse error"),
    ("classify-no-examples", "POST", C, b'{"signature_name": "classify_with_classes"}', 400,
     "key 'examples' is expected and was not found"),
    ("classify-examples-not-list", "POST", C, b'{"examples": {"x": 1}}', 400,
     "Expecting 'examples' value to be an list/array"),
    ("classify-examples-empty", "POST", C, b'{"examples": []}', 400, "'examples' value is an empty array"),
    ("classify-example-not-object", "POST", C, b'{"examples": [1]}', 400,
     "Example must be JSON object but got JSON Number"),
    ("classify-null-feature", "POST", C, b'{"examples": [{"x": null}]}', 400,
     "Feature: x has element with unexpected JSON type: Null"),
    ("classify-nested-feature", "POST", C, b'{"examples": [{"x": [[1.0]]}]}', 400,
     "unexpected JSON type: Array"),
    ("classify-mixed-feature", "POST", C, b'{"examples": [{"x": [1.0, "a"]}]}', 400,
     "Unexpected element type in feature: x expecting type: float"),
    ("classify-context-not-object", "POST", C, b'{"context": [1], "examples": [{"x": 1.0}]}', 400,
     "Example must be JSON object but got JSON Array"),
    ("classify-unknown-signature", "POST", C, b'{"signature_name": "zz", "examples": [{"x": 1.0}]}', 400,
     "No signature was found with the name: zz"),
    ("classify-wrong-feature-type", "POST", C,
     b'{"signature_name": "classify_with_classes", "examples": [{"x": "a"}]}', 400, "Data types"),
    ("regress-on-predict-signature", "POST", R, b'{"examples": [{"x": 1.0}]}', 400, "inputs"),
    ("uint64-feature", "POST", R,
     b'{"signature_name": "regress_x_to_y", "examples": [{"x": 18446744073709551615}]}', 400,
     "Only int64_t is supported"),
]


@pytest.fixture(scope="module")
def workers_before(server):
    return server.worker_pids()


@pytest.mark.parametrize(("method", "path", "body", "status", "message"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_json_4xx(server, workers_before, method, path, body, status, message):
    r = requests.request(method, server.url + path, data=body, timeout=30)
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"] == "application/json"
    payload = r.json()
    assert set(payload) == {"error"}
    assert message in payload["error"]


def test_at_least_thirty_cases():
    assert len(CASES) >= 30


def test_oversize_body_gets_413_json(server, workers_before):
    body = b'{"instances": [' + b"1.0, " * (1024 * 1024) + b"1.0]}"  # ~5 MiB > the 4 MiB limit
    r = requests.post(server.url + P, data=body, timeout=30)
    assert r.status_code == 413
    assert r.headers["Content-Type"] == "application/json"
    assert "limit" in r.json()["error"]


def test_oversize_chunked_body_gets_413_json(server, workers_before):
    def chunks():
        yield b'{"instances": ['
        for _ in range(1024):
            yield b"1.0, " * 1024
        yield b"1.0]}"

    r = requests.post(server.url + P, data=chunks(), timeout=30)
    assert r.status_code == 413
    assert "limit" in r.json()["error"]


def test_truncated_body_does_not_hang_or_kill(server, workers_before):
    # Content-Length promises more than is sent, then the client goes away.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST " + P.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"inst")
    r = requests.post(server.url + P, json={"instances": [1.0]}, timeout=30)
    assert r.json() == {"predictions": [2.5]}


def test_workers_survived_every_bad_request(server, workers_before):
    assert server.worker_pids() == workers_before
    for _ in range(4):
        r = requests.post(server.url + P, json={"instances": [1.0]}, timeout=30)
        assert r.json() == {"predictions": [2.5]}
    assert "Traceback" not in server.log()


def test_body_of_exactly_the_limit_is_accepted(server):
    head = b'{"instances": [1.0]'
    limit = 4 * 1024 * 1024
    body = head + b" " * (limit - len(head) - 1) + b"}"
    assert len(body) == limit
    r = requests.post(server.url + P, data=body, timeout=30)
    assert r.status_code == 200, r.text[:200]
