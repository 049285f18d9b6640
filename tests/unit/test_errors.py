"""errors.py: TF Serving's canonical codes, their names and HTTP statuses, and the error classes."""

from __future__ import annotations

import pytest

from tfwsgi import errors
from tfwsgi.errors import CODE_NAMES, Code, TFWSGIError, http_status_for_code

# tensorflow/core/protobuf/error_codes.proto, and ToHTTPStatusCode in TF Serving's http_server.cc.
TF_SERVING = [
    ("OK", 0, 200), ("CANCELLED", 1, 499), ("UNKNOWN", 2, 500), ("INVALID_ARGUMENT", 3, 400),
    ("DEADLINE_EXCEEDED", 4, 504), ("NOT_FOUND", 5, 404), ("ALREADY_EXISTS", 6, 409),
    ("PERMISSION_DENIED", 7, 403), ("RESOURCE_EXHAUSTED", 8, 429), ("FAILED_PRECONDITION", 9, 400),
    ("ABORTED", 10, 409), ("OUT_OF_RANGE", 11, 400), ("UNIMPLEMENTED", 12, 501), ("INTERNAL", 13, 500),
    ("UNAVAILABLE", 14, 503), ("DATA_LOSS", 15, 500), ("UNAUTHENTICATED", 16, 401),
]


def test_codes_names_and_http_statuses_are_tf_servings() -> None:
    assert [(c.name, c.value, c.http_status) for c in Code] == TF_SERVING
    assert {number: name for name, number, _ in TF_SERVING} == CODE_NAMES
    assert [http_status_for_code(number) for _, number, _ in TF_SERVING] == [s for _, _, s in TF_SERVING]


@pytest.mark.parametrize("number", [-1, 17, 99])
def test_an_unknown_number_is_unknown(number: int) -> None:
    assert Code.of(number) is Code.UNKNOWN
    assert http_status_for_code(number) == 500
    assert TFWSGIError("odd", number).code is Code.UNKNOWN


def test_errors_carry_a_code_and_its_status() -> None:
    err = TFWSGIError("gone", 5)  # a TensorFlow OpError's error_code, as servable.py passes it
    assert (err.code, err.code.name, err.status, err.message) == (Code.NOT_FOUND, "NOT_FOUND", 404, "gone")
    assert TFWSGIError("?").code is Code.UNKNOWN
    named = {errors.InvalidArgument: 400, errors.DeadlineExceeded: 504, errors.NotFound: 404,
             errors.FailedPrecondition: 400, errors.ResourceExhausted: 429, errors.Unimplemented: 501,
             errors.Internal: 500, errors.Unavailable: 503, errors.DataLoss: 500}
    for cls, status in named.items():
        err = cls("x")
        assert isinstance(err.code, Code) and err.status == status
        assert err.code.name.replace("_", "") == cls.__name__.upper()
