"""Every error the REST layer answers, in process: a JSON ``{"error": …}`` with TF Serving's status
and text (the table of tests/e2e/test_bad_input_e2e.py), request paths and methods, the body limit
(413), a bad Content-Length, HEAD. Classify/regress bodies are in test_rest_examples.py."""

from __future__ import annotations

import io

import pytest
from flask import Response
from flask.testing import FlaskClient
from werkzeug.test import EnvironBuilder

from bad_requests import CASES, P
from fakes import make_app

LIMIT = 4096



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
