"""The pure parts of bench/v2_bench.py: the requests it sends (read back by tfwsgi's own v2 decoder),
how it reads answers, connection reuse, and the report's table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from tfwsgi import v2codec

PATH = Path(__file__).resolve().parents[2] / "bench" / "v2_bench.py"


@pytest.fixture(scope="module")
def vb() -> ModuleType:
    spec = importlib.util.spec_from_file_location("v2_bench_under_test", PATH)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def x32() -> np.ndarray:
    return np.random.default_rng(1).random((32, 784), dtype=np.float32)


def test_the_harness_imports_no_tensorflow_at_module_level() -> None:
    top = [line for line in PATH.read_text().splitlines() if line.startswith(("import ", "from "))]
    assert not [line for line in top if "tensorflow" in line or "grpc " in line], top


@pytest.mark.parametrize("transport", ["v2-binary", "v2-json"])
def test_v2_requests_decode_to_the_tensor(vb: ModuleType, transport: str) -> None:
    x = x32()
    body, headers = vb.request_body(transport, x)
    request = v2codec.parse_infer(body, headers.get("Inference-Header-Content-Length"))
    assert request.datatypes == {"x": "FP32"}
    np.testing.assert_array_equal(request.inputs["x"], x)
    assert request.outputs == ({"y": True} if transport == "v2-binary" else None)


@pytest.mark.parametrize("transport", ["v1-json", "plain-json"])
def test_v1_requests_are_instances(vb: ModuleType, transport: str) -> None:
    x = x32()
    body, headers = vb.request_body(transport, x)
    assert headers == {"Content-Type": "application/json"}
    np.testing.assert_array_equal(np.asarray(json.loads(body)["instances"], np.float32), x)


def test_paths(vb: ModuleType) -> None:
    assert vb.request_path("v2-binary", "mlp") == vb.request_path("v2-json", "mlp") == "/v2/models/mlp/infer"
    assert vb.request_path("v1-json", "conv") == "/v1/models/conv:predict"
    assert vb.request_path("plain-json", "conv") == "/v1/models/m:predict"  # the plain app's one route
    with pytest.raises(ValueError, match="unknown transport"):
        vb.request_body("v3", x32())


def test_a_whole_http_request(vb: ModuleType) -> None:
    raw = vb.http_request("/v2/models/m/infer", 8501, b"abc", {"Inference-Header-Content-Length": "2"})
    head, body = raw.split(b"\r\n\r\n")
    assert body == b"abc"
    assert head.split(b"\r\n") == [b"POST /v2/models/m/infer HTTP/1.1", b"Host: 127.0.0.1:8501",
                                   b"Content-Length: 3", b"Inference-Header-Content-Length: 2"]


@pytest.mark.parametrize("binary", [True, False])
def test_answers_are_read_back(vb: ModuleType, binary: bool) -> None:
    """tfwsgi's own encoder writes the answer the harness reads."""
    y = np.random.default_rng(2).random((32, 10), dtype=np.float32)
    request = v2codec.InferRequest({}, {}, binary_output=binary)
    body, header_length = v2codec.encode_infer("mlp", 1, request, {"y": y})
    transport = "v2-binary" if binary else "v2-json"
    got = vb.response_tensor(transport, body, None if header_length is None else str(header_length))
    np.testing.assert_allclose(got, y, rtol=1e-6)
    v1 = json.dumps({"predictions": y.tolist()}).encode()
    np.testing.assert_allclose(vb.response_tensor("v1-json", v1, None), y, rtol=1e-6)


def test_keep_alive(vb: ModuleType) -> None:
    """The REST client (grpc_bench's, which this harness drives) opens a connection anew after a
    ``Connection: close`` answer instead of counting the next call's failure."""
    import grpc_bench

    assert grpc_bench.keeps_alive(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
    assert not grpc_bench.keeps_alive(b"HTTP/1.1 200 OK\r\nServer: gunicorn\r\nConnection: close\r\n\r\n")
    assert grpc_bench.keeps_alive(b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n\r\n")


def summary(rps: float) -> dict:
    return {"rps": rps, "rps_min": rps * 0.9, "rps_max": rps * 1.1, "examples": rps * 32, "p50_ms": 5.0,
            "p99_ms": 9.0, "errors": 0, "server_cores": 1.5, "client_cores": 0.1, "other_cores": 0.2,
            "server_us": 1000.0, "client_us": 50.0, "client_proc_max": 0.05, "rounds": 2}


def test_the_report(vb: ModuleType) -> None:
    results = {"mlp-32": {"v2-binary": summary(1000), "v2-json": summary(400), "v1-json": summary(380),
                          "plain-json": summary(100)}}
    args = {"processes": 2, "inflight": 16, "rounds": 2, "duration": 3.0, "warmup": 1.0, "smoke": True,
            "tfwsgi_env": "", "command": "bench/v2_bench.py --smoke"}
    text = vb.render(["mlp-32"], results, {"base": summary(1000), "more": summary(1050)}, args, ["a note"])
    assert "**SMOKE RUN**" in text and "- a note" in text and "(v2-benchmark.png)" in text
    rows = [line for line in text.splitlines() if line.startswith("| mlp-32 |")]
    assert [r.split(" | ")[1] for r in rows] == ["v2-binary", "v2-json", "v1-json", "plain-json"]
    assert rows[0].split(" | ")[2:4] == ["1000 (900–1100)", "32000"]
    assert [r.split(" | ")[6] for r in rows] == ["10.00", "4.00", "3.80", "1.00"]  # ÷ the plain app
    assert "| 1000 (900–1100) | 1050 (945–1155) | 1.05 |" in text
    assert "SMOKE" not in vb.render(["mlp-32"], results, {}, {**args, "smoke": False}, [])
