"""KServe v2 / Open Inference Protocol over REST (``/v2/…``) as a Flask blueprint: parse HTTP,
call the core once, render.

Health, server and model metadata, model readiness and ``infer`` (JSON tensors and the binary
tensor data extension, ``v2codec``). ``{version}`` in a path is a version number or, as ``/v1``'s
``labels/``, a version label. A TF model has signatures where v2 has none: ``infer`` runs the one
its ``signature_name`` request parameter names (default ``serving_default``), and metadata describes
the one the ``signature_name`` query parameter names. Errors are ``{"error": "…"}`` with the status
Triton gives their code (``HttpCodeFromError`` in triton-inference-server/server
``src/http_server.cc``): NOT_FOUND 404, UNAVAILABLE 503, UNIMPLEMENTED 501, INTERNAL 500, the
others 400; what Triton has no code for keeps its HTTP meaning (a body over the limit 413,
RESOURCE_EXHAUSTED 429, DEADLINE_EXCEEDED 504, DATA_LOSS 500).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flask import Blueprint, current_app, request

from . import __version__, codec, metrics, v2codec
from .api import JSON, Response, TooLarge, raw_path, read_body, request_options
from .cachecontrol import cache_status
from .dataplane import ModelSpec, V2Predict
from .errors import Code, InvalidArgument, NotFound, TFWSGIError
from .interfaces import DEFAULT_SIGNATURE
from .manager import AVAILABLE

if TYPE_CHECKING:
    from .application import WorkerState

SERVER_NAME = "tfwsgi"
EXTENSIONS = ["binary_tensor_data"]
HEADER_LENGTH = "Inference-Header-Content-Length"
_INT64_MAX = 2**63 - 1

# Triton's HTTP status per code; the codes it has no equivalent for keep their HTTP meaning.
_STATUS = {Code.NOT_FOUND: 404, Code.UNAVAILABLE: 503, Code.UNIMPLEMENTED: 501, Code.INTERNAL: 500,
           Code.DATA_LOSS: 500, Code.RESOURCE_EXHAUSTED: 429, Code.DEADLINE_EXCEEDED: 504}

blueprint = Blueprint("v2", __name__)
MODEL = "/v2/models/<name>"
VERSION = "/v2/models/<name>/versions/<version>"


def _state() -> WorkerState:
    state: WorkerState = current_app.extensions["tfwsgi"]
    return state


def _json(doc: Any, status: int = 200) -> Response:
    return Response(codec.dumps(doc), status=status, mimetype=JSON)


def status_for(exc: TFWSGIError) -> int:
    """The HTTP status of an error on /v2 (Triton's mapping)."""
    if isinstance(exc, TooLarge):
        return exc.status
    return _STATUS.get(exc.code, 400)


@blueprint.errorhandler(TFWSGIError)
def _error(exc: TFWSGIError) -> Response:
    return _json({"error": exc.message}, status_for(exc))


@blueprint.get("/v2")
def server_metadata() -> Response:
    return _json({"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS})


@blueprint.get("/v2/health/live")
def live() -> Response:
    return _json({"live": True})


@blueprint.get("/v2/health/ready")
def ready() -> Response:
    """200 when this worker has a version of every configured model available, else 503."""
    models = _state().dataplane.manager.ready()
    ok = all(models.values())
    return _json({"ready": ok, "models": models}, 200 if ok else 503)


def _spec(name: str, version: str | None) -> ModelSpec:
    if version is None:
        return ModelSpec(name)
    if version.isascii() and version.isdigit():  # not "²" (int() fails) nor "١" (int() takes it)
        if int(version) > _INT64_MAX:
            raise InvalidArgument(f"Failed to convert version: {version} to numeric.")
        return ModelSpec(name, int(version))
    return ModelSpec(name, label=version)  # a version label, as /v1/models/{m}/labels/{l}


@blueprint.get(MODEL)
@blueprint.get(VERSION)
def model_metadata(name: str, version: str | None = None) -> Response:
    dataplane = _state().dataplane
    servable, signature_defs = dataplane.metadata(_spec(name, version))
    signature_name = request.args.get("signature_name", "") or DEFAULT_SIGNATURE
    sig = signature_defs.get("signature_def", {}).get(signature_name)
    if sig is None:
        raise InvalidArgument(f'Serving signature name: "{signature_name}" not found in signature def')
    versions = sorted(s.version for s in dataplane.status(ModelSpec(name)) if s.state == AVAILABLE)
    return _json({"name": servable.name, "versions": [str(v) for v in versions],
                  "platform": "tensorflow_savedmodel",
                  "inputs": v2codec.tensor_metadata(sig.get("inputs", {})),
                  "outputs": v2codec.tensor_metadata(sig.get("outputs", {}))})


@blueprint.get(MODEL + "/ready")
@blueprint.get(VERSION + "/ready")
def model_ready(name: str, version: str | None = None) -> Response:
    """200 ready; 400 not ready (a version loading, unloaded or failed); 404 no such model or version."""
    dataplane = _state().dataplane
    spec = _spec(name, version)
    try:
        dataplane.servable(spec)
    except NotFound as exc:
        states = dataplane.status(ModelSpec(name, spec.version))  # NotFound: no such model/version
        detail = "; ".join(f"version {s.version} is {s.state}"
                           + (f": {s.error_message}" if s.error_message else "") for s in states)
        return _json({"name": name, "ready": False, "error": f"{exc.message} ({detail})"}, 400)
    return _json({"name": name, "ready": True})


@blueprint.post(MODEL + "/infer")
@blueprint.post(VERSION + "/infer")
def infer(name: str, version: str | None = None) -> Response:
    state = _state()
    return metrics.observe_request(name, "predict", _infer, state, _spec(name, version))


def _infer(state: WorkerState, spec: ModelSpec) -> Response:
    environ = request.environ
    body = read_body(environ, state.settings.max_request_bytes)
    infer_request = v2codec.parse_infer(body, environ.get("HTTP_INFERENCE_HEADER_CONTENT_LENGTH"))
    answer = state.dataplane.predict(spec, V2Predict(infer_request), request_options(environ))
    out, header_length = v2codec.encode_infer(spec.name, answer.version, infer_request, answer.outputs)
    if header_length is None:
        response = Response(out, mimetype=JSON)
    else:
        response = Response(out, mimetype="application/octet-stream")
        response.headers[HEADER_LENGTH] = str(header_length)
    response.headers["Cache-Status"] = cache_status(answer.outcome)
    return response


@blueprint.route("/v2/", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"])
@blueprint.route("/v2/<path:_rest>", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"])
def malformed(_rest: str = "") -> Response:
    """Any other path or method under /v2: Triton's 400, as JSON."""
    raise InvalidArgument(f"Malformed request: {request.method} {raw_path(request.environ)}")
