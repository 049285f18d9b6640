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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from conftest import Server

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
                if int(code) >= 400 and path != "/v2/health/ready":  # readiness: 503 is its answer
                    assert resp == {"$ref": f"#/components/responses/E{code}"}, (path, code)
    assert spec["components"]["schemas"]["Error"]["required"] == ["error"]


def test_the_spec_names_every_route_the_server_has(server):
    """Flask's routes and the /v1 forms of api.py are all described (and nothing else is)."""
    spec_paths = set(load_spec()["paths"])
    served = server.get("/openapi.json")
    assert served.status_code == 200 and served.headers["Content-Type"] == "application/json"
    assert served.json() == load_spec()
    flask_paths = {"/v2/health/live", "/v2/health/ready", "/metrics", "/monitoring/prometheus/metrics",
                   "/openapi.json"}
    v1 = {f"/v1/models/{{model}}{spec}{tail}"
          for spec in ("", "/versions/{version}", "/labels/{label}")
          for tail in ("", "/metadata", ":predict", ":classify", ":regress")}
    assert spec_paths == flask_paths | v1
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
    """Every answer but the metrics text is a JSON document."""
    if case.path in ("/metrics", "/monitoring/prometheus/metrics"):
        return None
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type.startswith("application/json"), (response.status_code, content_type)
    doc = json.loads(response.content)  # Python's parser: TF Serving writes NaN and Infinity
    if response.status_code >= 400:
        assert isinstance(doc, dict) and set(doc) == {"error"}, doc
    return True


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, json_body]
OPERATIONS = [op["operationId"] for item in load_spec()["paths"].values() for op in item.values()]
# Served models (name, a version, a label), so that generated bodies reach the decoders and the
# models, not only the 404.
MODELS = [{"model": "half_plus_two", "version": 2, "label": "stable"},
          {"model": "multi", "version": 7, "label": "none"}]
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
        for model in MODELS:
            params = {k: v for k, v in model.items() if k in names}
            strategies.append(operation.as_strategy(path_parameters=params))
            if operation.body:  # and the documented example body (the README's curl examples)
                example = operation.body[0].definition["example"]
                strategies.append(operation.as_strategy(path_parameters=params, body=example))
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
    for method in ("predict", "classify", "regress"):
        codes = {code for (op, code) in STATUSES if op.startswith(method)}
        assert {200, 400, 404} <= codes, (method, codes)
    with_model = sum("{model}" in path for path in load_spec()["paths"])
    assert sum(STATUSES.values()) >= with_model * MAX_EXAMPLES * 0.9


def test_the_fuzz_left_every_worker_alive(fuzz_server: Server) -> None:
    """Runs after the fuzz: no worker died or logged a traceback."""
    log = fuzz_server.log()
    assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]
    assert len(set(fuzz_server.ready_pids())) == fuzz_server.workers
    assert re.search(r"Booting worker", log)
