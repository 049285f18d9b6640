"""Bad input gets a clear 4xx JSON error from the real server, and no worker dies of it."""

from __future__ import annotations

import socket

import pytest
import requests

from bad_requests import CASES as SHARED
from bad_requests import P, W

pytestmark = pytest.mark.e2e

K = "/v1/models/keras:predict"
C = "/v1/models/multi:classify"
R = "/v1/models/hp/versions/1:regress"

# The shared table (tests/bad_requests.py), but for the model only the fakes have, then what only
# the real models answer: classify and regress bodies through TensorFlow's parsers.
CASES = [c for c in SHARED if c[2] != W] + [
    ("nested-1000-deep-feature", "POST", C,
     b'{"examples": [{"x": ' + b"[" * 1000 + b"]" * 1000 + b"}]}", 400, "unexpected JSON type: Array"),
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
