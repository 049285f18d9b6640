"""TensorFlow Serving's REST API (``/v1/models/…``) as a Flask blueprint: parse, call the core, render."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from flask import Blueprint, Response, abort, current_app, request
from werkzeug.exceptions import RequestEntityTooLarge

from . import codec, metrics
from .cache import Outcome, request_policy
from .dataplane import DataPlane
from .errors import CODE_NAMES, InvalidArgument

bp = Blueprint("tfserving_v1", __name__)

# tensorflow_serving/model_servers/http_rest_api_util.cc, matched against the raw path.
_PREDICT = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?:(classify|regress|predict)",
    re.IGNORECASE)
_STATUS = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?",
    re.IGNORECASE)
_V1 = re.compile(r"/v1/", re.IGNORECASE)
_INT64_MAX = 2**63 - 1
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def json_response(body: bytes, status: int = 200, outcome: Outcome | None = None) -> Response:
    resp = Response(body, status=status, content_type="application/json")
    if outcome is not None:
        resp.headers["Cache-Status"] = outcome.header()
    return resp


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

    def policy(self) -> str:
        return request_policy(self.environ.get("HTTP_CACHE_CONTROL"))

    def body(self) -> dict[str, Any]:
        """The JSON object, read straight from the server's input when its length is known."""
        length = self.environ.get("CONTENT_LENGTH")
        limit = self.state.settings.max_request_bytes
        if length and length.isdigit():
            if int(length) > limit:
                raise RequestEntityTooLarge()
            data = self.environ["wsgi.input"].read(int(length))
        else:
            # Chunked: werkzeug's stream stops at MAX_CONTENT_LENGTH (the limit + 1), silently.
            data = request.get_data(cache=False)
            if len(data) > limit:
                raise RequestEntityTooLarge()
        return codec.parse_json(data)


def _raw_path(environ: dict[str, Any]) -> str:
    """The path as the client sent it (before percent-decoding), without the query."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if not raw:
        return request.path
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


@bp.route("/<path:_path>", methods=METHODS)
def dispatch(_path: str) -> Any:
    """Route ``/v1/…`` the way TF Serving does; other paths are plain HTML 404s, as there."""
    environ = request.environ
    path = _raw_path(environ)
    if not _V1.match(path):
        abort(404)
    state = current_app.extensions["tfwsgi"]
    method = environ["REQUEST_METHOD"]
    if method == "OPTIONS" and state.settings.rest_api_enable_cors_support:
        return Response(status=204)
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


def predict(call: Call) -> Response:
    doc = call.body()
    signature_name = codec.signature_name(doc)
    servable = call.servable()
    sig = servable.signature(signature_name)
    inputs, fmt = codec.decode_predict(doc, sig.inputs)
    outputs, outcome = call.dataplane.predict(servable, sig, inputs, call.policy())
    return json_response(codec.encode_predict(outputs, fmt), outcome=outcome)


def _examples(call: Call) -> tuple[str, Any]:
    """The signature name and the serialized tf.Examples of a classify/regress body."""
    from .servable import serialize_examples  # TensorFlow: only ever reached in a worker

    doc = call.body()
    signature_name = codec.signature_name(doc)
    context, examples = codec.decode_examples(doc)
    return signature_name, serialize_examples(context, examples)


def classify(call: Call) -> Response:
    signature_name, examples = _examples(call)
    out, outcome = call.dataplane.classify(call.servable(), signature_name, examples, call.policy())
    body = codec.encode_classify(out.get("classes"), out.get("scores"), len(examples))
    return json_response(body, outcome=outcome)


def regress(call: Call) -> Response:
    signature_name, examples = _examples(call)
    out, outcome = call.dataplane.regress(call.servable(), signature_name, examples, call.policy())
    return json_response(codec.encode_regress(out["outputs"]), outcome=outcome)


_METHODS = {"predict": predict, "classify": classify, "regress": regress}


def _run(state: Any, environ: dict[str, Any], match: re.Match[str]) -> Response:
    return _METHODS[match.group(4).lower()](_call(state, environ, match))


def status(call: Call) -> Response:
    # TF Serving's GetModelStatus looks only at the version: with a label it lists every version.
    states = call.dataplane.manager.status(call.name, call.version)
    body = {"model_version_status": [
        {"version": str(s.version), "state": s.state,
         "status": {"error_code": CODE_NAMES.get(s.error_code, "UNKNOWN"), "error_message": s.error_message}}
        for s in states]}
    return json_response(codec.dumps(body))


def metadata(call: Call) -> Response:
    servable = call.servable()
    body = {
        "model_spec": {"name": servable.name, "signature_name": "",
                       "version": str(servable.version)},
        "metadata": {"signature_def": servable.signature_def_map},
    }
    return json_response(codec.dumps(body))
