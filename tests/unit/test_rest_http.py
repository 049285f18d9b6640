"""The HTTP around the API, in process: CORS on and off, ``Cache-Status`` from the in-process cache,
health and readiness, ``/openapi.json``, the metrics endpoints, and a user's ``before_request``."""

from __future__ import annotations

import json
from importlib import resources

import pytest
from flask import jsonify, request
from flask.testing import FlaskClient

from conftest import metric_total
from fakes import FakeModel, half_plus_two, loaded, make_app, standard_models
from tfwsgi.errors import TFWSGIError
from tfwsgi.source import ALL, VersionPolicy

P = "/v1/models/hp/versions/1:predict"
CORS = {"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Methods": "POST, GET",
        "Access-Control-Allow-Headers": "Content-Type"}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return make_app(tmp_path_factory.mktemp("http"))


@pytest.fixture
def client(app) -> FlaskClient:
    return app.test_client()


@pytest.fixture(scope="module")
def cors(tmp_path_factory) -> FlaskClient:
    """TFWSGI_REST_API_ENABLE_CORS_SUPPORT=true."""
    return make_app(tmp_path_factory.mktemp("cors"), rest_api_enable_cors_support=True).test_client()


# ------------------------------------------------------------------ CORS

def cors_headers(resp) -> dict[str, str]:
    return {k: v for k, v in resp.headers.items() if k.startswith("Access-Control-")}


@pytest.mark.parametrize("path", [P, "/v1/models/hp", "/v1/models/nope:predict", "/v2/health/ready"])
def test_cors_preflight_is_204_with_the_cors_headers(cors, path):
    r = cors.options(path, headers={"Origin": "https://example.com",
                                    "Access-Control-Request-Method": "POST"})
    assert r.status_code in (200, 204)  # /v1 answers 204 as TF Serving; Flask's own OPTIONS 200
    assert cors_headers(r) == CORS
    if path.startswith("/v1/"):
        assert r.status_code == 204 and r.get_data() == b""


def test_cors_headers_on_answers_errors_and_flask_routes(cors):
    for resp in (cors.post(P, json={"instances": [1.0]}),
                 cors.post(P, data=b"{"),
                 cors.get("/v1/models/nope"),
                 cors.post(P, data=b"x" * 10, environ_overrides={"CONTENT_LENGTH": "bad"}),
                 cors.get("/v1/models/hp/versions/1/metadata"),
                 cors.get("/v2/health/live"),
                 cors.get("/metrics"),
                 cors.get("/openapi.json")):
        assert cors_headers(resp) == CORS, (resp.status_code, resp.request.path)


def test_no_cors_by_default(client):
    for resp in (client.post(P, json={"instances": [1.0]}), client.get("/v1/models/nope"),
                 client.get("/v2/health/ready"), client.get("/metrics")):
        assert cors_headers(resp) == {}
    r = client.options(P)
    assert r.status_code == 400 and r.get_json() == {"error": f"Malformed request: OPTIONS {P}"}


# ------------------------------------------------------------------ Cache-Status (in-process LRU)

def cache_status(resp) -> str:
    assert resp.status_code == 200, resp.get_data(as_text=True)
    return resp.headers["Cache-Status"]


def test_miss_then_hit_and_the_model_runs_once(app, client):
    sig = loaded(app, "hp", 1).signature("")
    before = sig.runs
    assert cache_status(client.post(P, json={"instances": [11.0]})) == "tfwsgi; fwd=miss; stored"
    r = client.post(P, json={"instances": [11.0]})
    assert cache_status(r) == "tfwsgi; hit" and r.get_json() == {"predictions": [7.5]}
    assert sig.runs == before + 1


def test_cache_control_no_cache_and_no_store(app, client):
    sig = loaded(app, "hp", 1).signature("")
    body = {"instances": [41.0]}
    client.post(P, json=body)
    before = sig.runs
    r = client.post(P, json=body, headers={"Cache-Control": "no-cache"})
    assert cache_status(r) == "tfwsgi; fwd=request; stored" and r.get_json() == {"predictions": [22.5]}
    assert cache_status(client.post(P, json=body, headers={"Cache-Control": "max-age=0"})) == (
        "tfwsgi; fwd=request; stored")
    r = client.post(P, json=body, headers={"Cache-Control": "No-Store"})
    assert cache_status(r) == "tfwsgi; fwd=bypass" and r.get_json() == {"predictions": [22.5]}
    assert sig.runs == before + 3
    assert cache_status(client.post(P, json=body, headers={"Cache-Control": "max-age=60"})) == "tfwsgi; hit"
    fresh = {"instances": [42.0]}
    assert cache_status(client.post(P, json=fresh, headers={"Cache-Control": "no-store"})) == (
        "tfwsgi; fwd=bypass")
    assert cache_status(client.post(P, json=fresh)) == "tfwsgi; fwd=miss; stored"  # no-store wrote nothing


def test_row_and_columnar_share_an_entry(client):
    assert cache_status(client.post(P, json={"instances": [1.5, 2.5]})) == "tfwsgi; fwd=miss; stored"
    r = client.post(P, json={"inputs": {"x": [1.5, 2.5]}})
    assert cache_status(r) == "tfwsgi; hit" and r.get_json() == {"outputs": [2.75, 3.25]}


def test_versions_labels_and_signatures_have_their_own_entries(client):
    body = {"instances": [31.0]}
    assert "stored" in cache_status(client.post(P, json=body))
    r = client.post("/v1/models/hp/versions/2:predict", json=body)
    assert cache_status(r) == "tfwsgi; fwd=miss; stored" and r.get_json() == {"predictions": [18.5]}
    r = client.post("/v1/models/hp/labels/stable:predict", json=body)  # stable is version 1
    assert cache_status(r) == "tfwsgi; hit" and r.get_json() == {"predictions": [17.5]}
    r = client.post("/v1/models/hp:predict", json=body)  # latest is version 2
    assert cache_status(r) == "tfwsgi; hit" and r.get_json() == {"predictions": [18.5]}
    body["signature_name"] = "tensorflow/serving/predict"
    assert cache_status(client.post(P, json=body)) == "tfwsgi; fwd=miss; stored"


def test_no_cache_status_on_errors_status_or_metadata(client):
    for resp in (client.post(P, json={"instances": ["a"]}), client.post("/v1/models/nope:predict", json={}),
                 client.get("/v1/models/hp"), client.get("/v1/models/hp/metadata")):
        assert "Cache-Status" not in resp.headers


def test_a_failed_run_is_not_cached(client):
    body = {"signature_name": "positive_only", "instances": [-2.0]}
    for _ in range(2):
        r = client.post("/v1/models/multi:predict", json=body)
        assert r.status_code == 400 and "Cache-Status" not in r.headers


def test_cache_off_and_per_model_ttl(tmp_path):
    off = make_app(tmp_path / "off", cache_enabled=False).test_client()
    for _ in range(2):
        assert cache_status(off.post(P, json={"instances": [1.0]})) == "tfwsgi; fwd=bypass"
    one = make_app(tmp_path / "ttl", cache_model_ttl="hp=off").test_client()
    for _ in range(2):
        assert cache_status(one.post(P, json={"instances": [1.0]})) == "tfwsgi; fwd=bypass"
    body = {"signature_name": "double", "instances": [3.0]}
    assert cache_status(one.post("/v1/models/multi:predict", json=body)) == "tfwsgi; fwd=miss; stored"
    assert cache_status(one.post("/v1/models/multi:predict", json=body)) == "tfwsgi; hit"


def test_a_prediction_too_large_for_the_cache_is_served_not_stored(tmp_path):
    client = make_app(tmp_path, memcached_max_item_bytes=600).test_client()
    big = {"instances": [float(i) for i in range(200)]}
    for _ in range(2):
        r = client.post(P, json=big)
        assert cache_status(r) == "tfwsgi; fwd=miss; detail=too-large"
        assert len(r.get_json()["predictions"]) == 200


# ------------------------------------------------------------------ health and readiness

def test_liveness_and_readiness(client):
    r = client.get("/v2/health/live")
    assert r.status_code == 200 and r.get_json() == {"live": True}
    r = client.get("/v2/health/ready")
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
    assert r.get_json() == {"ready": True, "models": {"hp": True, "multi": True, "flaky": True,
                                                      "wide": True}}


def test_not_ready_while_a_model_has_no_version_available(tmp_path):
    broken = FakeModel("broken", {1: TFWSGIError("SavedModel file does not exist at: x", 5)})
    client = make_app(tmp_path, [*standard_models(), broken]).test_client()
    r = client.get("/v2/health/ready")
    assert r.status_code == 503 and r.headers["Content-Type"] == "application/json"
    assert r.get_json()["ready"] is False and r.get_json()["models"]["broken"] is False
    assert r.get_json()["models"]["hp"] is True
    assert client.get("/v2/health/live").status_code == 200  # alive, just not ready
    r = client.post("/v1/models/broken:predict", json={"instances": [1.0]})
    assert r.status_code == 404
    assert r.get_json() == {"error": "Servable not found for request: Latest(broken)"}


# ------------------------------------------------------------------ /openapi.json

SPEC = json.loads(resources.files("tfwsgi").joinpath("openapi.json").read_bytes())


def test_openapi_document_is_served_as_shipped(client):
    r = client.get("/openapi.json")
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/json"
    assert r.get_json() == SPEC and r.get_json()["openapi"].startswith("3.")
    assert client.get("/openapi.json/x").status_code == 404


def spec_calls(endings: tuple[str, ...]) -> list[tuple[str, str, str, object, dict]]:
    """Every operation of the spec whose path ends so, with its example path parameters and body."""
    calls = []
    params = {name: p["example"] for name, p in SPEC["components"]["parameters"].items() if p["in"] == "path"}
    for template, item in SPEC["paths"].items():
        for method, op in item.items():
            if template.endswith(endings):
                path = template.format(**params)
                body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("example")
                calls.append((op["operationId"], method.upper(), path, body, op["responses"]))
    return calls


@pytest.fixture(scope="module")
def documented(tmp_path_factory) -> FlaskClient:
    """The spec's example model (half_plus_two, labels stable and canary)."""
    def hp(b: float):
        return lambda name, version, path: half_plus_two(name, version, path, b)

    model = FakeModel("half_plus_two", {1: hp(2.0), 2: hp(3.0)}, VersionPolicy(ALL),
                      {"stable": 1, "canary": 2})
    return make_app(tmp_path_factory.mktemp("documented"), [model]).test_client()


@pytest.mark.parametrize(("op_id", "method", "path", "body", "responses"),
                         spec_calls(("}", "/metadata", ":predict", "/v2", "live", "ready", "/infer",
                                     "metrics", ".json")))
def test_every_documented_operation_answers_its_example(documented, op_id, method, path, body, responses):
    """Every path of the spec but classify/regress (test_rest_examples.py) is served, and its
    documented example gets a documented 200."""
    r = documented.open(path, method=method, json=body)
    assert r.status_code == 200, (op_id, r.get_data(as_text=True))
    assert "200" in responses
    if path.startswith(("/v1/", "/v2")) or path.endswith(".json"):
        assert r.headers["Content-Type"] == "application/json"
        r.get_json()


def test_the_documented_predict_example_gives_the_documented_numbers(documented):
    r = documented.post("/v1/models/half_plus_two:predict", json={"instances": [1.0, 2.0, 5.0]})
    assert r.get_json() == {"predictions": [3.5, 4.0, 5.5]}


# ------------------------------------------------------------------ metrics

def scrape(client: FlaskClient, path: str = "/metrics") -> str:
    r = client.get(path)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain")
    return r.get_data(as_text=True)


def request_count(text: str, model: str, status: str) -> float:
    return metric_total(text, ":tensorflow:serving:request_count", model_name=model, status=status)


def test_requests_are_counted_in_tf_serving_metrics(client):
    path = "/v1/models/wide:predict"
    ok_before = request_count(scrape(client), "wide", "OK")
    bad_before = request_count(scrape(client), "wide", "INVALID_ARGUMENT")
    for i in range(3):
        assert client.post(path, json={"instances": [[float(i)] * 16]}).status_code == 200
    assert client.post(path, json={"instances": ["x"]}).status_code == 400
    text = scrape(client, "/monitoring/prometheus/metrics")
    assert request_count(text, "wide", "OK") == ok_before + 3
    assert request_count(text, "wide", "INVALID_ARGUMENT") == bad_before + 1
    assert metric_total(text, ":tensorflow:serving:request_latency_count", model_name="wide", API="Predict",
                        entrypoint="REST") >= 4
    assert ":tensorflow:serving:request_count_total" not in text


def test_unknown_models_are_counted_not_found(client):
    before = request_count(scrape(client), "ghost", "NOT_FOUND")
    assert client.post("/v1/models/ghost:predict", json={"instances": [1.0]}).status_code == 404
    assert request_count(scrape(client), "ghost", "NOT_FOUND") == before + 1


def test_cache_lookups_and_model_runs_are_counted(client):
    def total(name: str, **labels: str) -> float:
        return metric_total(scrape(client), name, model_name="multi", **labels)

    hits, misses = total("tfwsgi_cache_lookups_total", result="hit"), total("tfwsgi_cache_lookups_total",
                                                                             result="miss")
    runs = total("tfwsgi_model_runs_total", signature_name="double", method="predict")
    body = {"signature_name": "double", "instances": [987.0]}
    for _ in range(3):
        assert client.post("/v1/models/multi:predict", json=body).status_code == 200
    assert total("tfwsgi_cache_lookups_total", result="miss") == misses + 1
    assert total("tfwsgi_cache_lookups_total", result="hit") == hits + 2
    assert total("tfwsgi_model_runs_total", signature_name="double", method="predict") == runs + 1


def test_monitoring_config_moves_or_turns_off_the_metrics(tmp_path):
    moved = tmp_path / "moved.config"
    moved.write_text('prometheus_config { enable: true path: "/my/metrics" }')
    client = make_app(tmp_path / "a", monitoring_config_file=str(moved)).test_client()
    assert ":tensorflow:serving:request_count" in scrape(client, "/my/metrics")
    assert client.get("/metrics").status_code == 200
    assert client.get("/monitoring/prometheus/metrics").status_code == 404
    off = tmp_path / "off.config"
    off.write_text("prometheus_config { enable: false }")
    client = make_app(tmp_path / "b", monitoring_config_file=str(off)).test_client()
    assert client.get("/metrics").status_code == 404
    assert client.get("/monitoring/prometheus/metrics").status_code == 404


def test_a_413_is_counted_resource_exhausted(tmp_path):
    """Regression (issue 17): a 413 was counted as UNKNOWN; TF Serving says RESOURCE_EXHAUSTED."""
    client = make_app(tmp_path, max_request_bytes=64).test_client()

    before = request_count(scrape(client), "hp", "RESOURCE_EXHAUSTED")
    assert client.post(P, data=b'{"instances": [' + b"1.0, " * 20 + b"1.0]}").status_code == 413
    assert request_count(scrape(client), "hp", "RESOURCE_EXHAUSTED") == before + 1


def test_a_no_cache_request_is_counted_as_a_refresh(client):
    """Regression (issue 17): a no-cache request counted no lookup, though the help promises refresh."""
    def refreshes() -> float:
        return metric_total(scrape(client), "tfwsgi_cache_lookups_total", model_name="hp", result="refresh")

    before = refreshes()
    r = client.post(P, json={"instances": [5.5]}, headers={"Cache-Control": "no-cache"})
    assert cache_status(r) == "tfwsgi; fwd=request; stored"
    assert refreshes() == before + 1


# ------------------------------------------------------------------ the user's Flask hooks

def with_api_key(app) -> FlaskClient:
    """The user's API key check: a Flask before_request that refuses requests without X-API-Key."""
    @app.before_request
    def require_api_key():
        if request.headers.get("X-API-Key") != "s3cret":
            return jsonify(error="missing or wrong X-API-Key"), 401
        return None

    return app.test_client()


def test_an_api_key_before_request_guards_the_flask_routes(tmp_path):
    client = with_api_key(make_app(tmp_path))
    r = client.get("/v2/health/ready")
    assert r.status_code == 401 and r.get_json() == {"error": "missing or wrong X-API-Key"}
    assert client.get("/metrics").status_code == 401
    assert client.get("/v2/health/ready", headers={"X-API-Key": "s3cret"}).status_code == 200


def test_an_api_key_before_request_refuses_an_unauthenticated_predict(tmp_path):
    client = with_api_key(make_app(tmp_path))
    r = client.post(P, json={"instances": [1.0]})
    assert r.status_code in (401, 403), r.get_data(as_text=True)
    assert client.get("/v1/models/hp").status_code in (401, 403)
    r = client.post(P, json={"instances": [1.0]}, headers={"X-API-Key": "s3cret"})
    assert r.status_code == 200 and r.get_json() == {"predictions": [2.5]}


# ------------------------------------------------------------------ routing /v1 without werkzeug's router

ROUTED = ["/v1/models/hp:predict", "/V1/models/hp/versions/1:predict", "/v1/", "/v1/models",
          "/v1/models/a%20b/labels/x:classify", "/v1//models//hp", "/v1/models/hp/metadata",
          "/v1/models/a%0Ab:predict", "/v1/models/%0D%0A/versions/1"]


def test_a_v1_path_matches_as_werkzeugs_router_matches_it(app):
    """The shortcut (api.V1Adapter) gives Flask the rule and view arguments werkzeug's own
    router gives for the same request, so everything Flask does with them is unchanged."""
    from tfwsgi.api import V1Adapter

    for path in ROUTED:
        with app.test_request_context(path, method="POST"):
            ctx_adapter = app.create_url_adapter(request._get_current_object())
            assert isinstance(ctx_adapter, V1Adapter), path
            real = ctx_adapter.real()
            assert type(real).__name__ == "MapAdapter"
            assert ctx_adapter.match(return_rule=True) == real.match(return_rule=True), path
            assert request.url_rule is app.url_map.v1_rule
            assert request.view_args == real.match()[1]


def test_a_path_werkzeug_would_not_match_is_left_to_werkzeug(app):
    from tfwsgi.api import V1Adapter

    for path in ["/v2/health/live", "/v1", "/v11/models", "/metrics"]:
        with app.test_request_context(path):
            assert not isinstance(app.create_url_adapter(request._get_current_object()), V1Adapter), path


def test_a_users_route_under_v1_is_routed_by_werkzeug_and_answers(tmp_path):
    """A rule the user adds under /v1 turns the shortcut off: werkzeug's router then decides,
    as it did before the shortcut existed (its static part beats the catch-all)."""
    from tfwsgi.api import V1Adapter

    app = make_app(tmp_path)
    app.add_url_rule("/v1/custom", "custom", lambda: "mine")
    assert not app.url_map.v1_only
    client = app.test_client()
    assert client.get("/v1/custom").get_data(as_text=True) == "mine"
    assert client.post(P, json={"instances": [1.0]}).status_code == 200
    with app.test_request_context(P, method="POST"):
        assert not isinstance(app.create_url_adapter(request._get_current_object()), V1Adapter)


def test_url_for_works_in_a_hook_of_a_shortcut_request(tmp_path):
    """Anything but the match (url_for builds) goes to the real adapter, bound on first use."""
    from flask import url_for

    app = make_app(tmp_path)
    seen = []

    @app.before_request
    def hook():
        seen.append(url_for("v2.ready"))

    assert app.test_client().post(P, json={"instances": [1.0]}).status_code == 200
    assert seen == ["/v2/health/ready"]


def test_a_model_name_with_a_line_break_is_answered_by_the_api_in_json(client):
    """TF Serving matches the raw path, where a line break is %0A: an unknown model, in JSON
    (the route once refused the decoded line break and answered Flask's HTML 404)."""
    for path in ["/v1/models/%0Ahp/versions/1:predict", "/v1/models/a%0Ab:predict"]:
        r = client.post(path, json={"instances": [1.0]})
        assert r.status_code == 404 and r.is_json, (path, r.get_data(as_text=True))
        assert r.get_json()["error"].startswith("Servable not found for request"), path


# ------------------------------------------------------------------ Flask's request and response, lighter

def test_blueprint_hooks_run_as_flask_runs_them(tmp_path):
    """api.Request finds a request's blueprints once per matched rule: a blueprint's before,
    after and teardown functions still run on its routes, and only there."""
    from flask import Blueprint

    app = make_app(tmp_path)
    seen: list[str] = []
    extra = Blueprint("extra", __name__)

    @extra.route("/extra")
    def extra_view():
        return "x"

    extra.before_request(lambda: seen.append("before") and None)
    extra.after_request(lambda r: seen.append("after") or r)
    extra.teardown_request(lambda e: seen.append("teardown"))
    app.register_blueprint(extra)
    client = app.test_client()
    assert client.post(P, json={"instances": [1.0]}).status_code == 200
    assert seen == []
    assert client.get("/extra").get_data(as_text=True) == "x"
    assert seen == ["before", "after", "teardown"]
    with app.test_request_context(P, method="POST"):
        from flask import Request

        assert request.blueprints == Request.blueprints.fget(request) == ["v1"]
        request.url_rule = app.url_map._rules_by_endpoint["extra.extra_view"][0]
        assert request.blueprints == ["extra"]  # the rule changed: found again


def test_a_response_body_goes_out_as_is_unless_something_waits_for_its_close(tmp_path):
    from werkzeug.test import run_wsgi_app

    from tfwsgi.api import Response

    app = make_app(tmp_path)
    with app.test_request_context(P, method="POST"):
        environ = request.environ
        r = Response(b'{"a": 1}', mimetype="application/json")
        assert r.get_app_iter(environ) is r.response  # the list of bytes, not an iterator over it
        closed = []
        r.call_on_close(lambda: closed.append(1))
        it = r.get_app_iter(environ)
        assert it is not r.response and b"".join(it) == b'{"a": 1}'
        it.close()
        assert closed == [1]
        assert list(Response(b"x", status=204).get_app_iter(environ)) == []
        assert list(Response("text").get_app_iter(environ)) == [b"text"]
    head = app.test_request_context(P, method="HEAD").request.environ
    assert list(Response(b"x").get_app_iter(head)) == []
    body, status, _ = run_wsgi_app(Response(b"ok"), {"REQUEST_METHOD": "GET", "SERVER_NAME": "x",
                                                      "SERVER_PORT": "80", "wsgi.url_scheme": "http"})
    assert status == "200 OK" and b"".join(body) == b"ok"


def test_ensure_sync_is_remembered_for_plain_functions_only(tmp_path):
    import functools

    app = make_app(tmp_path)

    def view():
        return "x"

    assert app.ensure_sync(view) is view and view in app._sync
    assert app.ensure_sync(view) is view
    partial = functools.partial(view)
    assert app.ensure_sync(partial) is partial and partial not in app._sync
