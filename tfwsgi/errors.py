"""Errors that carry their HTTP status, and TensorFlow's status codes mapped as TF Serving maps them."""

from __future__ import annotations

# TensorFlow / absl canonical codes, by number (tensorflow/core/protobuf/error_codes.proto).
CODE_NAMES: dict[int, str] = {
    0: "OK",
    1: "CANCELLED",
    2: "UNKNOWN",
    3: "INVALID_ARGUMENT",
    4: "DEADLINE_EXCEEDED",
    5: "NOT_FOUND",
    6: "ALREADY_EXISTS",
    7: "PERMISSION_DENIED",
    8: "RESOURCE_EXHAUSTED",
    9: "FAILED_PRECONDITION",
    10: "ABORTED",
    11: "OUT_OF_RANGE",
    12: "UNIMPLEMENTED",
    13: "INTERNAL",
    14: "UNAVAILABLE",
    15: "DATA_LOSS",
    16: "UNAUTHENTICATED",
}

# tensorflow_serving/util/net_http/server/internal/... ToHTTPStatusCode (http_server.cc).
_HTTP_STATUS: dict[int, int] = {
    0: 200,
    1: 499,
    2: 500,
    3: 400,
    4: 504,
    5: 404,
    6: 409,
    7: 403,
    8: 429,
    9: 400,
    10: 409,
    11: 400,
    12: 501,
    13: 500,
    14: 503,
    15: 500,
    16: 401,
}


def http_status_for_code(code: int) -> int:
    """The HTTP status TF Serving answers for a canonical error code."""
    return _HTTP_STATUS.get(code, 500)


class TFWSGIError(Exception):
    """An error with a message for the client and the canonical code it maps from."""

    code = 2  # UNKNOWN

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    @property
    def status(self) -> int:
        return http_status_for_code(self.code)


class InvalidArgument(TFWSGIError):
    code = 3


class DeadlineExceeded(TFWSGIError):
    code = 4


class NotFound(TFWSGIError):
    code = 5


class FailedPrecondition(TFWSGIError):
    code = 9


class ResourceExhausted(TFWSGIError):
    code = 8


class Unimplemented(TFWSGIError):
    code = 12


class Internal(TFWSGIError):
    code = 13


class Unavailable(TFWSGIError):
    code = 14


class ConfigError(ValueError):
    """A setting or model config that cannot be used; raised at startup, never per request."""
