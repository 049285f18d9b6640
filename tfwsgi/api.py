"""TensorFlow Serving's REST API (``/v1/models/…``) as Flask views: parse HTTP, call the core, render.

The blueprint ``v1`` routes every method on ``/v1/…`` (case-insensitive, as TF Serving) to one
view, which matches TF Serving's own expressions against the path as the client sent it
(``http_rest_api_util.cc``). So Flask's extension points (``before_request``, error handlers,
extensions) cover predictions, and errors are rendered once, by the app's handlers.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import flask
from flask import Blueprint, Flask, current_app, request
from werkzeug.routing import BaseConverter, Map, MapAdapter, Rule, RuleFactory

from . import codec, metrics
from .cachecontrol import cache_status, request_policy
from .dataplane import DataPlane, JsonPredict, ModelSpec, Options
from .errors import CODE_NAMES, InvalidArgument, ResourceExhausted

if TYPE_CHECKING:
    from .application import WorkerState

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

JSON = "application/json"
CORS_HEADERS = (("Access-Control-Allow-Origin", "*"), ("Access-Control-Allow-Methods", "POST, GET"),
                ("Access-Control-Allow-Headers", "Content-Type"))


class TooLarge(ResourceExhausted):
    """The body is over ``max_request_bytes`` (drained): 413, counted as RESOURCE_EXHAUSTED."""

    @property
    def status(self) -> int:
        return 413


class Request(flask.Request):
    """Flask's request, which finds its blueprints once per matched rule: Flask asks for them
    three times a request (before, after and teardown functions), each time from the endpoint."""

    @property
    def blueprints(self) -> list[str]:
        rule = self.url_rule
        found = self.__dict__.get("_tfwsgi_blueprints")
        if found is None or found[0] is not rule:
            found = self.__dict__["_tfwsgi_blueprints"] = (rule, super().blueprints)
        return found[1]


class Response(flask.Response):
    """Flask's response. A body held as a list of bytes with nothing to call on close goes to the
    server as that list: what werkzeug's ``ClosingIterator`` over ``iter_encoded`` would yield,
    without building either (``get_app_iter``)."""

    def get_app_iter(self, environ: Mapping[str, Any]) -> Any:
        body = self.response
        if (type(body) is list and not getattr(self, "_on_close", True) and not self.direct_passthrough
                and environ["REQUEST_METHOD"] != "HEAD" and self.status_code >= 200
                and self.status_code not in (204, 304) and all(type(x) is bytes for x in body)):
            return body
        return super().get_app_iter(environ)  # type: ignore[arg-type]


class _V1(BaseConverter):
    regex = "[vV]1"


class _Rest(BaseConverter):
    regex = "(?s:.*)"  # any character, a line break too (TF Serving matches the raw path)
    part_isolating = False


ENDPOINT = "v1.api"


def _register(state: Any) -> None:
    app: Flask = state.app
    app.url_map.converters.update(tfwsgi_v1=_V1, tfwsgi_rest=_Rest)
    # methods=None: every method reaches the view, which answers TF Serving's 400 for the others.
    app.url_map.add(Rule("/<tfwsgi_v1:_v>/<tfwsgi_rest:_rest>", endpoint=ENDPOINT, methods=None))
    app.view_functions[ENDPOINT] = v1


class V1Map(Map):
    """werkzeug's ``Map``, which also knows whether a path under ``/v1/`` can only match the v1
    view's rule: true until a rule is added that starts with ``/v1`` (any case), starts with a
    variable part, or is bound to a host or subdomain."""

    v1_rule: Rule | None = None
    v1_only = True

    def add(self, rulefactory: RuleFactory) -> None:
        super().add(rulefactory)
        for rule in rulefactory.get_rules(self):
            if rule.endpoint == ENDPOINT:
                self.v1_rule = rule
            elif rule.rule[:3].lower() == "/v1" or rule.rule.startswith("/<") or rule.host or rule.subdomain:
                self.v1_only = False


class V1Adapter:
    """The URL adapter of a request whose path is under ``/v1/`` when only the v1 rule can
    match it (``V1Map.v1_only``): Flask's request context asks it for the match, answered without
    binding a werkzeug ``MapAdapter`` to the environment and walking its state machine (~11 µs
    of a request's Python here); for anything else (``url_for``'s ``build``, a match with other
    arguments) it binds the real one, as Flask would have."""

    __slots__ = ("_bind", "_path", "_real", "_rule")

    def __init__(self, rule: Rule, path: str, bind: Any) -> None:
        self._rule = rule
        self._path = path
        self._bind = bind  # () -> the MapAdapter Flask would have made
        self._real: MapAdapter | None = None

    def match(self, path_info: str | None = None, method: str | None = None, return_rule: bool = False,
              query_args: Any = None, websocket: bool | None = None) -> tuple[Any, Mapping[str, Any]]:
        if path_info is None and return_rule and query_args is None and websocket is None:
            return self._rule, {"_v": self._path[1:3], "_rest": self._path[4:]}
        real: Any = self.real()  # werkzeug overloads match on return_rule
        return real.match(path_info, method, return_rule, query_args, websocket)

    def real(self) -> MapAdapter:
        if self._real is None:
            self._real = self._bind()
        return self._real

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real(), name)


def v1_path(path: str) -> bool:
    """Whether werkzeug would match ``path`` (a request's decoded path) against the v1 rule:
    ``/v1/`` in any case, then anything."""
    return path[:4] in ("/v1/", "/V1/")


blueprint = Blueprint("v1", __name__)
blueprint.record_once(_register)


def v1(**_: str) -> Response:
    environ = request.environ
    method = environ["REQUEST_METHOD"]
    state: WorkerState = current_app.extensions["tfwsgi"]
    if method == "OPTIONS" and state.settings.rest_api_enable_cors_support:
        return Response(status=204)  # the app adds the CORS headers to every response
    path = raw_path(environ)
    if method == "POST":
        m = _PREDICT.fullmatch(path)
        if m:
            call = _VERBS[m.group(4).lower()]
            return metrics.observe_request(m.group(1), m.group(4), call, state, environ, _spec(m))
    elif method in ("GET", "HEAD"):
        m = _STATUS.fullmatch(path)
        if m:
            spec = _spec(m)
            if not spec.name:
                raise InvalidArgument("Missing model name in request.")
            return metadata(state.dataplane, spec) if m.group(4) else status(state.dataplane, spec)
    raise InvalidArgument(f"Malformed request: {method} {path}")


def predict(state: WorkerState, environ: dict[str, Any], spec: ModelSpec) -> Response:
    body = JsonPredict(read_body(environ, state.settings.max_request_bytes))
    answer = state.dataplane.predict(spec, body, request_options(environ))
    return _json(codec.encode_predict(answer.outputs, answer.fmt), cache_status(answer.outcome))


def classify(state: WorkerState, environ: dict[str, Any], spec: ModelSpec) -> Response:
    signature_name, examples = _examples(state, environ)
    answer = state.dataplane.classify(spec, signature_name, examples, request_options(environ))
    out = answer.outputs
    return _json(codec.encode_classify(out.get("classes"), out.get("scores"), len(examples)),
                 cache_status(answer.outcome))


def regress(state: WorkerState, environ: dict[str, Any], spec: ModelSpec) -> Response:
    signature_name, examples = _examples(state, environ)
    answer = state.dataplane.regress(spec, signature_name, examples, request_options(environ))
    return _json(codec.encode_regress(answer.outputs["outputs"]), cache_status(answer.outcome))


_VERBS = {"predict": predict, "classify": classify, "regress": regress}


def status(dataplane: DataPlane, spec: ModelSpec) -> Response:
    return _json(codec.dumps({"model_version_status": [
        {"version": str(s.version), "state": s.state,
         "status": {"error_code": CODE_NAMES.get(s.error_code, "UNKNOWN"), "error_message": s.error_message}}
        for s in dataplane.status(spec)]}))


def metadata(dataplane: DataPlane, spec: ModelSpec) -> Response:
    servable, signature_def = dataplane.metadata(spec)
    return _json(codec.dumps({
        "model_spec": {"name": servable.name, "signature_name": "", "version": str(servable.version)},
        "metadata": {"signature_def": signature_def},
    }))


def _json(body: bytes, cache_status: str | None = None) -> Response:
    response = Response(body, mimetype=JSON)
    if cache_status is not None:
        response.headers["Cache-Status"] = cache_status
    return response


def _examples(state: WorkerState, environ: dict[str, Any]) -> tuple[str, Any]:
    """The signature name and the serialized tf.Examples of a classify/regress body."""
    from .servable import serialize_examples  # TensorFlow: only ever reached in a worker

    doc = codec.parse_json(read_body(environ, state.settings.max_request_bytes))
    signature_name = codec.signature_name(doc)
    context, examples = codec.decode_examples(doc)
    return signature_name, serialize_examples(context, examples)


def _spec(match: re.Match[str]) -> ModelSpec:
    name, version_text, label = match.group(1), match.group(2), match.group(3)
    version = None
    if version_text:
        version = int(version_text)
        if version > _INT64_MAX:
            raise InvalidArgument(f"Failed to convert version: {version_text} to numeric.")
    return ModelSpec(unquote(name or ""), version, unquote(label) if label else None)


def request_options(environ: dict[str, Any]) -> Options:
    deadline = environ.get("tfwsgi.deadline")  # set by tfwsgi.worker: when it answers 504
    # None: no deadline, also for one further than any wait can be bounded (infinite, or past
    # threading.TIMEOUT_MAX: ~292 years), as gRPC's _options treats a far one.
    if deadline is not None and float(deadline) - time.monotonic() >= threading.TIMEOUT_MAX:
        deadline = None
    return Options(request_policy(environ.get("HTTP_CACHE_CONTROL")),
                   None if deadline is None else float(deadline))


def read_body(environ: dict[str, Any], limit: int) -> bytes:
    """The request body; past ``limit`` bytes (chunked bodies are counted as read) the rest is
    drained and TooLarge raised."""
    stream = environ["wsgi.input"]
    length = environ.get("CONTENT_LENGTH")
    if length:
        if not length.isdigit():
            raise InvalidArgument(f"Invalid Content-Length: {length}")
        if int(length) > limit:
            raise _too_large(environ, limit)
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
        raise _too_large(environ, limit)
    return b"".join(parts)


def _too_large(environ: dict[str, Any], limit: int) -> TooLarge:
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
    return TooLarge(f"Request body is larger than the limit of {limit} bytes")


def raw_path(environ: dict[str, Any]) -> str:
    """The path as the client sent it (before percent-decoding), without the query."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if not raw:
        return environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    if not raw.startswith("/"):
        raw = urlsplit(raw).path or "/"
    return raw.split("?", 1)[0]
