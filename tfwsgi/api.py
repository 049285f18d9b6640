"""TensorFlow Serving's REST API (``/v1/models/…``): parse, call the core, render.

It runs as WSGI middleware in front of the Flask app (Flask's own ``app.wsgi_app`` wrapping):
``/v1/`` requests are answered here and never build Flask's request and app contexts, which
cost more than the rest of a cache hit (about 50 µs a request, measured); every other path
(health, metrics, the HTML 404) goes on to Flask.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from werkzeug.http import HTTP_STATUS_CODES

from . import codec, dense, metrics
from .cache import Outcome, Policy
from .cachecontrol import cache_status, request_policy
from .dataplane import DataPlane
from .errors import CODE_NAMES, InvalidArgument, TFWSGIError

log = logging.getLogger("tfwsgi")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

# tensorflow_serving/model_servers/http_rest_api_util.cc, matched against the raw path.
_PREDICT = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)",
    re.IGNORECASE)
_STATUS = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?",
    re.IGNORECASE)
_INT64_MAX = 2**63 - 1

# How much of an oversize body is read and dropped before answering 413, so that the client
# reads the answer instead of a connection reset.
_DRAIN_LIMIT = 256 * 1024 * 1024
_CHUNK = 1 << 20

CORS_HEADERS = [("Access-Control-Allow-Origin", "*"), ("Access-Control-Allow-Methods", "POST, GET"),
         ("Access-Control-Allow-Headers", "Content-Type")]


def status_line(status: int) -> str:
    """``"200 OK"``, worded as werkzeug words it."""
    return f"{status} {HTTP_STATUS_CODES.get(status, 'Unknown').upper()}"


_STATUS_LINES = {code: status_line(code) for code in (200, 204, 400, 401, 403, 404, 409, 413, 429,
                                                       499, 500, 501, 503, 504)}


class TooLarge(Exception):
    """The body is over ``max_request_bytes``: drained, then answered with 413."""


@dataclass
class Call:
    """One /v1 request: the worker's state, the WSGI environ, and the model spec from the path."""

    state: Any  # app.WorkerState
    environ: dict[str, Any]
    name: str
    version: int | None
    label: str | None

    @property
    def dataplane(self) -> DataPlane:
        return self.state.dataplane

    def servable(self) -> Any:
        return self.state.dataplane.servable(self.name, self.version, self.label)

    def policy(self) -> Policy:
        return request_policy(self.environ.get("HTTP_CACHE_CONTROL"))

    def deadline(self) -> float | None:
        """When the connection layer answers DEADLINE_EXCEEDED (``time.monotonic()``), if set."""
        deadline = self.environ.get("tfwsgi.deadline")
        return None if deadline is None or deadline == float("inf") else float(deadline)

    def raw_body(self) -> bytes:
        return read_body(self.environ, self.state.settings.max_request_bytes)

    def body(self) -> dict[str, Any]:
        """The JSON object, read straight from the server's input."""
        return codec.parse_json(self.raw_body())


def read_body(environ: dict[str, Any], limit: int) -> bytes:
    """The request body, or TooLarge past ``limit`` bytes (chunked bodies are counted as read)."""
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH")
    if length:
        if not length.isdigit():
            raise InvalidArgument(f"Invalid Content-Length: {length}")
        if int(length) > limit:
            raise TooLarge()
        return bytes(stream.read(int(length)))
    # No length: chunked (the server decodes it) or none at all; read up to one byte past the limit.
    parts = []
    total = 0
    while total <= limit:
        chunk = stream.read(min(_CHUNK, limit + 1 - total))
        if not chunk:
            break
        parts.append(chunk)
        total += len(chunk)
    if total > limit:
        raise TooLarge()
    return b"".join(parts)


def _drain(environ: dict[str, Any]) -> None:
    """Read and drop what is left of a refused body (bounded), so the client sees the answer."""
    stream = environ.get("wsgi.input")
    length = environ.get("CONTENT_LENGTH")
    left = min(int(length), _DRAIN_LIMIT) if length and length.isdigit() else _DRAIN_LIMIT
    try:
        while stream is not None and left > 0:
            chunk = stream.read(min(left, _CHUNK))
            if not chunk:
                break
            left -= len(chunk)
    except Exception:  # the client went away: nothing to drain
        pass


def raw_path(environ: dict[str, Any]) -> str:
    """The path as the client sent it (before percent-decoding), without the query."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if not raw:
        return environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    if not raw.startswith("/"):
        raw = urlsplit(raw).path or "/"
    return raw.split("?", 1)[0]


def _call(state: Any, environ: dict[str, Any], match: re.Match[str]) -> Call:
    name, version_text, label = match.group(1), match.group(2), match.group(3)
    version = None
    if version_text:
        version = int(version_text)
        if version > _INT64_MAX:
            raise InvalidArgument(f"Failed to convert version: {version_text} to numeric.")
    return Call(state, environ, unquote(name or ""), version, unquote(label) if label else None)


Answer = tuple[bytes, Outcome | None]


def predict(call: Call) -> Answer:
    raw = call.raw_body()
    inputs = None
    # One dense array of numbers: decoded without a Python float each, when the model has a
    # signature that path can feed (else the body would be parsed twice for nothing).
    found = dense.parse(raw) if _takes_dense(call) else None
    if found is not None:
        servable = call.servable()
        sig = servable.signature(found.signature_name)
        inputs, fmt = found.inputs(sig.inputs), found.fmt
    if inputs is None:
        doc = codec.parse_json(raw)
        signature_name = codec.signature_name(doc)
        servable = call.servable()
        sig = servable.signature(signature_name)
        inputs, fmt = codec.decode_predict(doc, sig.inputs)
    outputs, outcome = call.dataplane.predict(servable, sig, inputs, call.policy(), call.deadline())
    return codec.encode_predict(outputs, fmt), outcome


def _takes_dense(call: Call) -> bool:
    try:
        return bool(call.servable().takes_dense)
    except TFWSGIError:  # no such model or version: the general path answers, in its order
        return False


def _examples(call: Call) -> tuple[str, Any]:
    """The signature name and the serialized tf.Examples of a classify/regress body."""
    from .servable import serialize_examples  # TensorFlow: only ever reached in a worker

    doc = call.body()
    signature_name = codec.signature_name(doc)
    context, examples = codec.decode_examples(doc)
    return signature_name, serialize_examples(context, examples)


def classify(call: Call) -> Answer:
    signature_name, examples = _examples(call)
    out, outcome = call.dataplane.classify(call.servable(), signature_name, examples, call.policy(),
                                            call.deadline())
    return codec.encode_classify(out.get("classes"), out.get("scores"), len(examples)), outcome


def regress(call: Call) -> Answer:
    signature_name, examples = _examples(call)
    out, outcome = call.dataplane.regress(call.servable(), signature_name, examples, call.policy(),
                                           call.deadline())
    return codec.encode_regress(out["outputs"]), outcome


_METHODS = {"predict": predict, "classify": classify, "regress": regress}


def _run(state: Any, environ: dict[str, Any], match: re.Match[str]) -> Answer:
    return _METHODS[match.group(4).lower()](_call(state, environ, match))


def status(call: Call) -> Answer:
    # TF Serving's GetModelStatus looks only at the version: with a label it lists every version.
    states = call.dataplane.manager.status(call.name, call.version)
    body = {"model_version_status": [
        {"version": str(s.version), "state": s.state,
         "status": {"error_code": CODE_NAMES.get(s.error_code, "UNKNOWN"), "error_message": s.error_message}}
        for s in states]}
    return codec.dumps(body), None


def metadata(call: Call) -> Answer:
    servable = call.servable()
    body = {
        "model_spec": {"name": servable.name, "signature_name": "",
                       "version": str(servable.version)},
        "metadata": {"signature_def": servable.signature_def_map},
    }
    return codec.dumps(body), None


def route(state: Any, environ: dict[str, Any], method: str, path: str) -> Answer:
    """Route a ``/v1/…`` request the way TF Serving does, and answer it."""
    if method == "POST":
        m = _PREDICT.fullmatch(path)
        if m:
            return metrics.observe_request(m.group(1), m.group(4), _run, state, environ, m)
    elif method in ("GET", "HEAD"):
        m = _STATUS.fullmatch(path)
        if m:
            call = _call(state, environ, m)
            if not call.name:
                raise InvalidArgument("Missing model name in request.")
            return metadata(call) if m.group(4) else status(call)
    raise InvalidArgument(f"Malformed request: {method} {path}")


class RestAPI:
    """WSGI middleware: answers ``/v1/…`` (case-insensitive, as TF Serving) and hands the rest on."""

    def __init__(self, state: Any, next_app: WSGIApp) -> None:
        self.state = state
        self.next_app = next_app
        self.cors = state.settings.rest_api_enable_cors_support

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = raw_path(environ)
        if path[:4].lower() != "/v1/":
            return self.next_app(environ, start_response)
        method = environ["REQUEST_METHOD"]
        extra = CORS_HEADERS if self.cors else []
        if method == "OPTIONS" and self.cors:
            start_response(_STATUS_LINES[204], list(extra))
            return []
        outcome = None
        try:
            body, outcome = route(self.state, environ, method, path)
            status = 200
        except TFWSGIError as exc:
            body, status = codec.encode_error(exc.message), exc.status
        except TooLarge:
            _drain(environ)
            limit = self.state.settings.max_request_bytes
            body, status = codec.encode_error(f"Request body is larger than the limit of {limit} bytes"), 413
        except Exception as exc:
            log.exception("tfwsgi: unexpected error on %s %s", method, path)
            body, status = codec.encode_error(f"Internal error: {type(exc).__name__}: {exc}"), 500
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        if outcome is not None:
            headers.append(("Cache-Status", cache_status(outcome)))
        start_response(_STATUS_LINES.get(status) or status_line(status), headers + extra)
        return [] if method == "HEAD" else [body]
