"""KServe v2 over REST end to end: real gunicorn, the real TF test models, and the real clients
(``tritonclient.http`` 2.73 and ``kserve``'s ``InferenceRESTClient``, protocol v2) in their own
virtualenv (``make v2-clients``; TFWSGI_V2_CLIENTS_PYTHON names another interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CLIENTS_PYTHON = os.environ.get("TFWSGI_V2_CLIENTS_PYTHON", str(ROOT / ".venv-clients" / "bin" / "python"))


def run_clients(server: Any, scenario: str) -> dict[str, Any]:
    assert Path(CLIENTS_PYTHON).exists(), (
        f"{CLIENTS_PYTHON} is missing: `make v2-clients` builds the clients' virtualenv")
    done = subprocess.run([CLIENTS_PYTHON, str(ROOT / "tests" / "v2_clients.py"), server.url, scenario],
                          capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    seen: dict[str, Any] = json.loads(done.stdout)
    return seen


@pytest.fixture(scope="module")
def triton(server) -> dict[str, Any]:
    return run_clients(server, "triton")


@pytest.fixture(scope="module")
def kserve(server) -> dict[str, Any]:
    return run_clients(server, "kserve")


def v1(server, model: str, body: dict[str, Any]) -> Any:
    r = server.post(f"/v1/models/{model}:predict", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def values(output: dict[str, Any]) -> list[Any]:
    return list(output["values"])


# ------------------------------------------------------------------ tritonclient.http

def test_triton_health_and_readiness(triton):
    assert triton["live"] is True and triton["ready"] is True
    assert triton["model_ready"] is True and triton["version_ready"] is True
    assert triton["label_ready"] is True


def test_unknown_or_failed_models_are_not_ready_and_the_server_says_why(triton, server):
    assert triton["unknown_ready"] is False and triton["failed_ready"] is False
    r = server.get("/v2/models/nope/ready")
    assert r.status_code == 404 and r.json() == {"error": "Could not find any versions of model nope"}
    r = server.get("/v2/models/flaky/versions/2/ready")
    assert r.status_code == 400 and r.json()["ready"] is False
    assert "version 2 is END" in r.json()["error"] and "saved_model.pb" in r.json()["error"]


def test_triton_metadata(triton):
    assert triton["server_metadata"]["name"] == "tfwsgi"
    assert "binary_tensor_data" in triton["server_metadata"]["extensions"]
    hp = triton["hp_metadata"]
    assert hp["name"] == "hp" and hp["versions"] == ["1", "2"] and hp["platform"] == "tensorflow_savedmodel"
    assert hp["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1]}]
    assert hp["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1]}]
    multi = triton["multi_metadata"]
    assert multi["inputs"] == [{"name": "a", "datatype": "FP32", "shape": [-1, 2]},
                               {"name": "b", "datatype": "INT32", "shape": [-1]}]
    assert {o["name"]: o["datatype"] for o in multi["outputs"]} == {"b_twice": "INT32", "sum": "FP32"}


@pytest.mark.parametrize("kind", ["binary", "json"])
def test_triton_infer_agrees_with_v1(triton, server, kind):
    hp = triton[f"hp_{kind}"]
    assert hp["id"] == "r1" and hp["model_version"] == "2"
    assert values(hp["outputs"]["y"]) == v1(server, "hp", {"instances": [1.0, 2.0, 5.0]})["predictions"]
    assert hp["outputs"]["y"]["dtype"] == "float32" and hp["outputs"]["y"]["shape"] == [3]
    stable = triton[f"hp_stable_{kind}"]
    assert stable["model_version"] == "1"
    r = server.post("/v1/models/hp/labels/stable:predict", json={"instances": [1.0, 2.0, 5.0]})
    assert values(stable["outputs"]["y"]) == r.json()["predictions"] == [2.5, 3.0, 4.5]
    multi = triton[f"multi_{kind}"]
    assert list(multi["outputs"]) == ["sum"]  # outputs selection
    expected = v1(server, "multi", {"inputs": {"a": [[1, 2], [3, 4]], "b": [10, 20]}})["outputs"]
    assert values(multi["outputs"]["sum"]) == expected["sum"] == [13.0, 27.0]


@pytest.mark.parametrize("kind", ["binary", "json"])
def test_triton_bytes_bool_and_double(triton, server, kind):
    strings = triton[f"strings_{kind}"]["outputs"]
    expected = v1(server, "multi", {"signature_name": "strings", "inputs": {"s": ["ab", "xyz"]}})["outputs"]
    assert values(strings["upper"]) == expected["upper"] == ["AB", "XYZ"]
    assert values(strings["echo_bytes"]) == ["ab", "xyz"]
    assert values(strings["length"]) == expected["length"] == [2, 3]
    assert strings["length"]["dtype"] == "int32"
    flags = triton[f"boolean_{kind}"]["outputs"]["negated"]
    assert flags["dtype"] == "bool" and values(flags) == [False, True]
    double = triton[f"double_{kind}"]["outputs"]["y"]
    assert double["dtype"] == "float64"
    assert np.array_equal(values(double), v1(server, "multi", {"signature_name": "double",
                                                              "instances": [3.0, 1.5]})["predictions"])


def test_triton_sees_errors_with_their_status(triton):
    errors = triton["errors"]
    assert errors["unknown_model"]["status"] == "404"
    assert "Latest(nope)" in errors["unknown_model"]["message"]
    assert errors["wrong_datatype"]["status"] == "400"
    assert "data-type is 'FP64', but model 'hp' expects 'FP32'" in errors["wrong_datatype"]["message"]
    assert errors["unknown_output"]["status"] == "400"
    assert "unexpected inference output 'z'" in errors["unknown_output"]["message"]


# ------------------------------------------------------------------ kserve InferenceRESTClient

def test_kserve_health_and_readiness(kserve):
    assert kserve["live"] is True and kserve["ready"] is True
    assert kserve["model_ready"] is True and kserve["unknown_ready"] is False


@pytest.mark.parametrize("kind", ["binary", "json"])
def test_kserve_infer_agrees_with_v1(kserve, server, kind):
    hp = kserve[f"hp_{kind}"]
    assert hp["id"] == "k1" and hp["model_name"] == "hp"  # kserve 0.21 drops model_version
    assert values(hp["outputs"]["y"]) == v1(server, "hp", {"instances": [1.0, 2.0, 5.0]})["predictions"]
    multi = kserve[f"multi_{kind}"]["outputs"]
    assert list(multi) == ["b_twice"] and values(multi["b_twice"]) == [20, 40]
    strings = kserve[f"strings_{kind}"]["outputs"]
    assert values(strings["upper"]) == ["AB", "XYZ"] and values(strings["length"]) == [2, 3]


# ------------------------------------------------------------------ plain HTTP

def test_bad_v2_bodies_are_4xx_json_and_the_workers_live(server):
    pids = server.worker_pids()
    for body, headers in [(b"{", {}), (b'{"inputs": [{"name": "x"}]}', {}),
                          (b'{"inputs": []}xx', {"Inference-Header-Content-Length": "14"}),
                          (b'{"inputs": []}', {"Inference-Header-Content-Length": "999"})]:
        r = server.post("/v2/models/hp/infer", data=body, headers=headers)
        assert 400 <= r.status_code < 500 and r.headers["Content-Type"] == "application/json", r.text
        assert set(r.json()) == {"error"}
    assert server.get("/v2/health/live").json() == {"live": True}
    assert server.worker_pids() == pids


def test_a_v2_request_hits_the_entry_a_v1_request_stored(server):
    """One kept-alive connection: one worker, so one in-process cache."""
    with requests.Session() as session:
        r = session.post(server.url + "/v1/models/hp:predict", json={"instances": [71.0, 72.0]}, timeout=30)
        assert r.status_code == 200 and r.headers["Cache-Status"] == "tfwsgi; fwd=miss; stored"
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2], "data": [71, 72]}]}
        r = session.post(server.url + "/v2/models/hp/infer", json=body, timeout=30)
        assert r.status_code == 200 and r.headers["Cache-Status"] == "tfwsgi; hit"
        assert r.json()["outputs"][0]["data"] == [38.5, 39.0]
