"""Errors that carry their HTTP status, and TensorFlow's status codes mapped as TF Serving maps them."""

from __future__ import annotations

from enum import IntEnum


class Code(IntEnum):
    """TensorFlow's canonical error codes (tensorflow/core/protobuf/error_codes.proto; absl's and
    gRPC's use the same numbers and names), each with the HTTP status TF Serving answers for it
    (``ToHTTPStatusCode`` in tensorflow_serving/util/net_http/server/internal/http_server.cc).
    A gRPC transport maps a code by its number (``grpc.StatusCode`` holds the same list)."""

    http_status: int

    def __new__(cls, value: int, http_status: int) -> Code:
        member = int.__new__(cls, value)
        member._value_ = value
        member.http_status = http_status
        return member

    OK = 0, 200
    CANCELLED = 1, 499
    UNKNOWN = 2, 500
    INVALID_ARGUMENT = 3, 400
    DEADLINE_EXCEEDED = 4, 504
    NOT_FOUND = 5, 404
    ALREADY_EXISTS = 6, 409
    PERMISSION_DENIED = 7, 403
    RESOURCE_EXHAUSTED = 8, 429
    FAILED_PRECONDITION = 9, 400
    ABORTED = 10, 409
    OUT_OF_RANGE = 11, 400
    UNIMPLEMENTED = 12, 501
    INTERNAL = 13, 500
    UNAVAILABLE = 14, 503
    DATA_LOSS = 15, 500
    UNAUTHENTICATED = 16, 401

    @classmethod
    def of(cls, value: int) -> Code:
        """The code numbered ``value`` (a TensorFlow error's ``error_code``); UNKNOWN if none is."""
        return _BY_NUMBER.get(value, cls.UNKNOWN)


_BY_NUMBER: dict[int, Code] = {code.value: code for code in Code}


# The codes' names by number, as TF Serving writes them in JSON (``"error_code": "NOT_FOUND"``).
CODE_NAMES: dict[int, str] = {code.value: code.name for code in Code}


def http_status_for_code(code: int) -> int:
    """The HTTP status TF Serving answers for a canonical error code (500 for an unknown one)."""
    return Code.of(code).http_status


class TFWSGIError(Exception):
    """An error with a message for the client and the canonical code it maps from."""

    code: Code = Code.UNKNOWN

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = Code.of(code)

    @property
    def status(self) -> int:
        return self.code.http_status


class InvalidArgument(TFWSGIError):
    code = Code.INVALID_ARGUMENT


class DeadlineExceeded(TFWSGIError):
    code = Code.DEADLINE_EXCEEDED


# What a request past its deadline is told, wherever in the data plane it is caught.
DEADLINE_MESSAGE = "Deadline exceeded: the request was not answered within rest_api_timeout_in_ms"


class NotFound(TFWSGIError):
    code = Code.NOT_FOUND


class FailedPrecondition(TFWSGIError):
    code = Code.FAILED_PRECONDITION


class ResourceExhausted(TFWSGIError):
    code = Code.RESOURCE_EXHAUSTED


class Unimplemented(TFWSGIError):
    code = Code.UNIMPLEMENTED


class Internal(TFWSGIError):
    code = Code.INTERNAL


class Unavailable(TFWSGIError):
    code = Code.UNAVAILABLE


class DataLoss(TFWSGIError):
    code = Code.DATA_LOSS


class ConfigError(ValueError):
    """A setting or model config that cannot be used; raised at startup, never per request."""
