"""tfwsgi/openapi.json: a valid OpenAPI 3 document, served at /openapi.json, and schemathesis
fuzzing a live server from it: every answer has a documented status and a JSON body, never a 5xx."""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from conftest import Server
from v2_fuzz import infer_bodies

pytestmark = pytest.mark.e2e

SPEC_FILE = Path(__file__).resolve().parents[2] / "tfwsgi" / "openapi.json"
# Enough to reach every operation with bodies of every shape the schemas allow, and to keep the
# whole fuzz run within about a minute on two cores (20 operations).
MAX_EXAMPLES = 50


def load_spec() -> dict:
    return json.loads(SPEC_FILE.read_text())


def test_the_spec_is_valid_openapi_3():
    spec = load_spec()
    assert spec["openapi"].startswith("3.")
    schemathesis.openapi.from_dict(spec).validate()  # raises on a document that is not OpenAPI 3


def test_the_validation_would_catch_a_broken_spec():
    broken = copy.deepcopy(load_spec())
    broken["paths"]["/v2/health/live"]["get"]["responses"] = {"200": {}}  # a response needs a description
    with pytest.raises(Exception, match="health~1live"):
        schemathesis.openapi.from_dict(broken).validate()


def test_every_error_response_is_the_error_schema():
    spec = load_spec()
    for path, item in spec["paths"].items():
        for op in item.values():
            for code, resp in op["responses"].items():
                if path.endswith("/ready") and code in ("400", "503"):  # readiness: its answers
                    continue
                if int(code) >= 400:
                    assert resp == {"$ref": f"#/components/responses/E{code}"}, (path, code)
    assert spec["components"]["schemas"]["Error"]["required"] == ["error"]


def test_the_spec_names_every_route_the_server_has(server):
    """Flask's routes, the /v1 forms of api.py and v2.py's routes are all described (and nothing else is)."""
    spec_paths = set(load_spec()["paths"])
    served = server.get("/openapi.json")
    assert served.status_code == 200 and served.headers["Content-Type"] == "application/json"
    assert served.json() == load_spec()
    flask_paths = {"/v2", "/v2/health/live", "/v2/health/ready", "/metrics", "/monitoring/prometheus/metrics",
                   "/openapi.json"}
    v2 = {f"/v2/models/{{model}}{spec}{tail}"
          for spec in ("", "/versions/{version}") for tail in ("", "/ready", "/infer")}
    v1 = {f"/v1/models/{{model}}{spec}{tail}"
          for spec in ("", "/versions/{version}", "/labels/{label}")
          for tail in ("", "/metadata", ":predict", ":classify", ":regress")}
    assert spec_paths == flask_paths | v1 | v2
    for path in flask_paths:
        assert server.get(path).status_code in (200, 503), path
    assert server.get("/openapi.json/x").status_code == 404  # the HTML 404 of other paths stays


@pytest.fixture(scope="module")
def fuzz_server(model_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The spec's example model name (half_plus_two, with labels) and a many-dtype model."""
    root = tmp_path_factory.mktemp("fuzz")
    config = root / "models.config"
    config.write_text(f"""model_config_list {{
  config {{ name: "half_plus_two" base_path: "{model_root}/hp"
           model_version_policy {{ specific {{ versions: 1 versions: 2 }} }}
           version_labels {{ key: "stable" value: 1 }} version_labels {{ key: "canary" value: 2 }} }}
  config {{ name: "multi" base_path: "{model_root}/multi" }}
}}""")
    srv = Server({"TFWSGI_MODEL_CONFIG_FILE": str(config), "TFWSGI_MAX_REQUEST_BYTES": "65536"},
                 log_path=root / "gunicorn.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_server: Server) -> schemathesis.BaseSchema:
    schema = schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")
    schema.config.update(base_url=fuzz_server.url)
    return schema


def json_body(ctx: object, response: schemathesis.Response, case: schemathesis.Case) -> bool | None:
    """Every answer but the metrics text is a JSON document (v2's binary answers start with one);
    every error is ``{"error": "…"}`` (a model not ready says so with its name, as documented)."""
    if case.path in ("/metrics", "/monitoring/prometheus/metrics"):
        return None
    content_type = response.headers.get("content-type", [""])[0]
    content = response.content
    if response.status_code == 200 and case.path.endswith("/infer") and "octet-stream" in content_type:
        length = int(response.headers["inference-header-content-length"][0])
        content, content_type = content[:length], "application/json"
        for output in json.loads(content)["outputs"]:
            assert "data" in output or "binary_data_size" in output["parameters"], output
    assert content_type.startswith("application/json"), (response.status_code, content_type)
    doc = json.loads(content)  # Python's parser: TF Serving writes NaN and Infinity
    if response.status_code >= 400:
        keys = {"error", "name", "ready"} if case.path.endswith("/ready") else {"error"}
        assert isinstance(doc, dict) and "error" in doc and set(doc) <= keys, doc
        assert isinstance(doc["error"], str) and doc["error"], doc
    return True


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, json_body]
OPERATIONS = [op["operationId"] for item in load_spec()["paths"].values() for op in item.values()]
# Served models (name, a version, a label), so that generated bodies reach the decoders and the
# models, not only the 404.
MODELS = [{"model": "half_plus_two", "version": 2, "label": "stable"},
          {"model": "multi", "version": 7, "label": "none"}]
V2_MODELS = [{"model": "half_plus_two", "version": v} for v in ("2", "stable")] + [
    {"model": "multi", "version": "7"}]  # /v2's {version} is a number or a label
STATUSES: Counter[tuple[str, int]] = Counter()  # (operationId, status) of every fuzz request


@pytest.mark.parametrize("operation_id", OPERATIONS)
def test_fuzz_the_live_server(fuzz_schema: schemathesis.BaseSchema, fuzz_server: Server,
                              operation_id: str) -> None:
    run_fuzz(fuzz_schema, operation_id)


def run_fuzz(fuzz_schema: schemathesis.BaseSchema, operation_id: str) -> None:
    operation = fuzz_schema.find_operation_by_id(operation_id)
    strategies = [operation.as_strategy(), operation.as_strategy(GenerationMode.NEGATIVE)]
    names = {p.name for p in operation.path_parameters}
    if "model" in names:
        for model in V2_MODELS if operation.path.startswith("/v2") else MODELS:
            params = {k: v for k, v in model.items() if k in names}
            strategies.append(operation.as_strategy(path_parameters=params))
            if operation.body:  # and the documented example body (the README's curl examples)
                json_body = next(b for b in operation.body if b.media_type == "application/json")
                strategies.append(operation.as_strategy(path_parameters=params, body=json_body.definition[
                    "example"], media_type="application/json"))
    session = requests.Session()

    @given(case=st.one_of(strategies))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def fuzz(case: schemathesis.Case) -> None:
        response = case.call(session=session, timeout=30)
        STATUSES[operation_id, response.status_code] += 1
        case.validate_response(response, checks=CHECKS)

    with session:
        fuzz()


def test_the_fuzz_reached_the_models(fuzz_schema: schemathesis.BaseSchema, fuzz_server: Server) -> None:
    """Generated bodies got answers, not only errors. Runs after the fuzz (file order); run alone
    (or with ``-k``), it fuzzes the operations that were not fuzzed in this session first."""
    for operation_id in OPERATIONS:
        if not any(op == operation_id for op, _ in STATUSES):
            run_fuzz(fuzz_schema, operation_id)
    print(sorted(STATUSES.items()))
    for method in ("predict", "classify", "regress", "inferV2"):
        codes = {code for (op, code) in STATUSES if op.startswith(method)}
        assert {200, 400, 404} <= codes, (method, codes)
    with_model = sum("{model}" in path for path in load_spec()["paths"])
    assert sum(STATUSES.values()) >= with_model * MAX_EXAMPLES * 0.9


V2_STATUSES: Counter[int] = Counter()


@pytest.mark.parametrize("model", ["half_plus_two", "multi"])
def test_fuzz_v2_bodies_on_the_live_server(fuzz_server: Server, model: str) -> None:
    """tests/v2_fuzz.py's near-valid /v2 infer bodies (binary sizes and lengths, BYTES prefixes,
    shapes, datatypes) through the real models: a 200, or a 4xx/501 ``{"error": "…"}``."""
    session = requests.Session()

    @given(body=infer_bodies(model))
    @example(body=(b'{"inputs": []}', {"Inference-Header-Content-Length": "\u00b2"}))  # were 500s
    @example(body=(b'{"inputs": [{"name": "s", "datatype": "BYTES", "shape": [1], "data": '
                   + b"[" * 1000 + b'"a"' + b"]" * 1000 + b"}]}", {}))
    @settings(max_examples=4 * MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def fuzz(body: tuple[bytes, dict[str, str]]) -> None:
        data, headers = body
        r = session.post(f"{fuzz_server.url}/v2/models/{model}/infer", data=data, headers=headers,
                         timeout=30)
        V2_STATUSES[r.status_code] += 1
        assert r.status_code == 200 or 400 <= r.status_code < 500 or r.status_code == 501, (
            r.status_code, r.text[:300], data[:300], headers)
        if r.status_code != 200:
            assert r.headers["Content-Type"] == "application/json"
            assert set(r.json()) == {"error"}, r.text

    with session:
        fuzz()
    print(model, sorted(V2_STATUSES.items()))
    assert {200, 400} <= set(V2_STATUSES)


def test_the_fuzz_left_every_worker_alive(fuzz_server: Server) -> None:
    """Runs after the fuzz: no worker died or logged a traceback."""
    log = fuzz_server.log()
    assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]
    assert len(set(fuzz_server.ready_pids())) == fuzz_server.workers
    assert re.search(r"Booting worker", log)
