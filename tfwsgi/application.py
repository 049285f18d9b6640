"""``create_app()``: the Flask application of one worker, with its state in ``app.extensions``.

Under gunicorn it is built in each worker (``tfwsgi:app``, after ``post_fork``) and loads that
worker's models before the worker takes a request.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from types import FunctionType
from typing import Any

from flask import Flask, request
from flask.sessions import NullSession, SessionInterface, SessionMixin

from . import api, codec, metrics, v2
from .api import Response
from .batching import Batcher, BatchingParameters, parse_batching_parameters
from .cache import PredictionCache
from .dataplane import DataPlane
from .errors import ConfigError, TFWSGIError
from .manager import ModelManager, manager_from_settings, watch
from .reloads import RELOAD_DIR_ENV, Reloads, begin
from .settings import Settings, from_env, names

log = logging.getLogger("tfwsgi")

OPENAPI_PATH = "/openapi.json"  # outside /v1/, which is TF Serving's (api.blueprint)


class _NoSessions(SessionInterface):
    """tfwsgi keeps no sessions: every request shares one null session and nothing is saved
    (Flask's default builds and checks a new one per request)."""

    _null = NullSession()

    def open_session(self, app: Flask, request: Any) -> SessionMixin:
        return self._null

    def save_session(self, app: Flask, session: SessionMixin, response: Any) -> None:
        return None


class _App(Flask):
    """Flask, with /v1 requests routed without werkzeug's router when only the v1 rule can take
    them (``api.V1Adapter``): the same rule, view arguments and request context, a cheaper match."""

    url_map_class = api.V1Map
    url_map: api.V1Map
    request_class = api.Request
    response_class = api.Response

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sync: dict[Callable[..., Any], Callable[..., Any]] = {}  # see ensure_sync

    def create_url_adapter(self, request: Any) -> Any:
        url_map = self.url_map
        if (request is not None and url_map.v1_only and url_map.v1_rule is not None
                and not url_map.host_matching and not self.subdomain_matching
                and self.config["TRUSTED_HOSTS"] is None and self.config["SERVER_NAME"] is None
                and request.environ.get("wsgi.url_scheme") in ("http", "https")
                and api.v1_path(request.path)):
            return api.V1Adapter(url_map.v1_rule, request.path,
                                 functools.partial(Flask.create_url_adapter, self, request))
        return super().create_url_adapter(request)

    def ensure_sync(self, func: Callable[..., Any]) -> Callable[..., Any]:
        """Flask's, remembered for plain functions (a view, a hook): Flask asks it for every
        view and hook it calls, and ``inspect.iscoroutinefunction`` costs more than the call."""
        if type(func) is not FunctionType:
            return super().ensure_sync(func)
        sync = self._sync.get(func)
        if sync is None:
            sync = self._sync[func] = super().ensure_sync(func)
        return sync


@dataclass
class WorkerState:
    settings: Settings
    dataplane: DataPlane
    reloads: Reloads | None = None  # HandleReloadConfigRequest (tfwsgi.reloads)


def create_app(manager: ModelManager | None = None, settings: Settings | None = None) -> Flask:
    """Build the app around a manager: the given one, or one that loads every configured model
    now (in this process) and watches for new versions."""
    settings = settings or from_env()
    if manager is None:
        import_custom_op_modules(settings.custom_op_modules)
        # Under gunicorn, from the latest config a gRPC reload sent to any worker (tfwsgi.reloads).
        directory = os.environ.get(RELOAD_DIR_ENV)
        start = begin(directory)
        manager = manager_from_settings(settings, start.configs)
        manager.load_all()
        watch(manager, settings)
        reloads = Reloads(manager, directory, start)
        reloads.started()
    else:
        reloads = Reloads(manager)

    app = _App("tfwsgi", static_folder=None)  # no static files: a rule fewer to match per request
    app.session_interface = _NoSessions()
    app.url_map.merge_slashes = False
    cache = PredictionCache(settings)
    batcher = _batcher(settings)
    if batcher is not None:
        manager.add_listener(batcher)  # it forgets a version once it is unloaded
    dataplane = DataPlane(manager, cache, batcher, settings.enable_signature_method_name_check)
    app.extensions["tfwsgi"] = WorkerState(settings, dataplane, reloads)

    app.add_url_rule(OPENAPI_PATH, "openapi", _openapi)
    for i, path in enumerate(metrics.prometheus_paths(settings.monitoring_config_file)):
        app.add_url_rule(path, f"metrics_{i}", _metrics)
    app.register_blueprint(api.blueprint)
    app.register_blueprint(v2.blueprint)
    app.register_error_handler(TFWSGIError, _tfwsgi_error)
    app.register_error_handler(Exception, _unexpected)
    if settings.rest_api_enable_cors_support:
        app.after_request(_cors)
    return app


def import_custom_op_modules(modules: str) -> None:
    """Import the modules ``TFWSGI_CUSTOM_OP_MODULES`` names, whose import registers the custom
    ops some models need (``tensorflow_text``), before any model loads: in a worker, never in
    gunicorn's master. One that fails to import stops this worker's start."""
    for name in names(modules):
        started = time.monotonic()
        try:
            importlib.import_module(name)
        except Exception as exc:
            message = (f"TFWSGI_CUSTOM_OP_MODULES: importing {name} failed: "
                       f"{type(exc).__name__}: {exc}")
            log.error("tfwsgi: %s", message)
            raise ConfigError(message) from exc
        log.info("tfwsgi: pid %d imported custom-op module %s in %.2fs",
                 os.getpid(), name, time.monotonic() - started)


def _batcher(settings: Settings) -> Batcher | None:
    if not settings.enable_batching:
        return None
    params = BatchingParameters().validate()
    if settings.batching_parameters_file:
        path = settings.batching_parameters_file
        try:
            with open(path, encoding="utf-8") as f:
                params = parse_batching_parameters(f.read(), origin=path)
        except OSError as exc:
            raise ConfigError(f"TFWSGI_BATCHING_PARAMETERS_FILE: cannot read {path}: {exc}") from None
    return Batcher(params, on_batch=lambda rows, padded: metrics.BATCH_SIZE.observe(rows),
                   on_queue=metrics.BATCH_QUEUE_DEPTH.inc)


@functools.cache
def openapi_document() -> bytes:
    """The OpenAPI 3 description of the REST API (``tfwsgi/openapi.json``), as shipped."""
    return resources.files("tfwsgi").joinpath("openapi.json").read_bytes()


def _openapi() -> Response:
    return Response(openapi_document(), mimetype="application/json")


def _metrics() -> Response:
    body, content_type = metrics.render()
    return Response(body, content_type=content_type)


def _error(message: str, status: int) -> Response:
    return Response(codec.encode_error(message), status=status, mimetype="application/json")


def _tfwsgi_error(exc: TFWSGIError) -> Response:
    return _error(exc.message, exc.status)


def _unexpected(exc: Exception) -> Response:
    from werkzeug.exceptions import HTTPException

    if isinstance(exc, HTTPException):
        return exc  # type: ignore[return-value]
    log.exception("tfwsgi: unexpected error on %s %s", request.method, request.path)
    return _error(f"Internal error: {type(exc).__name__}: {exc}", 500)


def _cors(response: Response) -> Response:
    for name, value in api.CORS_HEADERS:
        response.headers[name] = value
    return response
