"""KServe v2 over gRPC end to end: real gunicorn (2 workers) serving TFWSGI_PORT, the real TF test
models, and the real clients (``tritonclient.grpc`` 2.73 and kserve's ``InferenceGRPCClient``) in
their own virtualenv (tests/v2_clients.py, as tests/e2e/test_v2_e2e.py runs it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from test_v2_e2e import run_clients, v1, values

from conftest import Server, free_port
from tfwsgi.v2proto import grpc_predict_v2_pb2 as pb
from tfwsgi.v2proto import grpc_predict_v2_pb2_grpc as pb_grpc

pytestmark = pytest.mark.e2e


class GrpcServer:
    """The server, with its gRPC address as the clients' ``url``."""

    def __init__(self, server: Server, port: int) -> None:
        self.server = server
        self.url = f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def srv(model_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GrpcServer]:
    port = free_port()
    server = Server({"TFWSGI_MODEL_CONFIG_FILE": str(model_config), "TFWSGI_PORT": str(port)},
                    log_path=tmp_path_factory.mktemp("logs") / "v2-grpc-server.log")
    try:
        server.wait_ready()
        yield GrpcServer(server, port)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def triton(srv: GrpcServer) -> dict[str, Any]:
    return run_clients(srv, "triton_grpc")


@pytest.fixture(scope="module")
def kserve(srv: GrpcServer) -> dict[str, Any]:
    return run_clients(srv, "kserve_grpc")


def test_triton_health_readiness_and_metadata_agree_with_rest(triton: dict[str, Any],
                                                              srv: GrpcServer) -> None:
    assert triton["live"] is True and triton["ready"] is True
    assert triton["model_ready"] is True and triton["version_ready"] is True
    assert triton["label_ready"] is True
    # an unknown model is reported as such, not a silent False; a failed version is not ready
    assert triton["unknown_ready"]["status"] == "StatusCode.NOT_FOUND"
    assert triton["unknown_ready"]["message"] == "Could not find any versions of model nope"
    assert triton["failed_ready"] == {"value": False}
    rest = srv.server.get("/v2").json()
    meta = triton["server_metadata"]
    assert (meta["name"], meta["version"], meta["extensions"]) == (rest["name"], rest["version"],
                                                                  rest["extensions"])
    for model in ("hp", "multi"):
        meta = triton[f"{model}_metadata"]
        for tensors in (meta["inputs"], meta["outputs"]):
            for t in tensors:
                t["shape"] = [int(d) for d in t["shape"]]  # protobuf's JSON writes int64 as strings
        assert meta == srv.server.get(f"/v2/models/{model}").json()


def test_triton_infer_agrees_with_v1(triton: dict[str, Any], srv: GrpcServer) -> None:
    server = srv.server
    hp = triton["hp"]
    assert hp["id"] == "r1" and hp["model_version"] == "2"
    assert values(hp["outputs"]["y"]) == v1(server, "hp", {"instances": [1.0, 2.0, 5.0]})["predictions"]
    assert hp["outputs"]["y"]["dtype"] == "float32" and hp["outputs"]["y"]["shape"] == [3]
    assert triton["hp_stable"]["model_version"] == "1"
    assert values(triton["hp_stable"]["outputs"]["y"]) == [2.5, 3.0, 4.5]
    multi = triton["multi"]["outputs"]
    assert list(multi) == ["sum"]  # outputs selection
    expected = v1(server, "multi", {"inputs": {"a": [[1, 2], [3, 4]], "b": [10, 20]}})["outputs"]
    assert values(multi["sum"]) == expected["sum"] == [13.0, 27.0]
    strings = triton["strings"]["outputs"]
    expected = v1(server, "multi", {"signature_name": "strings", "inputs": {"s": ["ab", "xyz"]}})["outputs"]
    assert values(strings["upper"]) == expected["upper"] == ["AB", "XYZ"]
    assert values(strings["echo_bytes"]) == ["ab", "xyz"]
    assert values(strings["length"]) == expected["length"] == [2, 3]
    flags = triton["boolean"]["outputs"]["negated"]
    assert flags["dtype"] == "bool" and values(flags) == [False, True]
    double = triton["double"]["outputs"]["y"]
    assert double["dtype"] == "float64"
    assert np.array_equal(values(double), v1(server, "multi", {"signature_name": "double",
                                                              "instances": [3.0, 1.5]})["predictions"])


def test_triton_sees_errors_with_their_codes(triton: dict[str, Any]) -> None:
    errors = triton["errors"]
    assert errors["unknown_model"]["status"] == "StatusCode.NOT_FOUND"
    assert "Latest(nope)" in errors["unknown_model"]["message"]
    assert errors["wrong_datatype"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "data-type is 'FP64', but model 'hp' expects 'FP32'" in errors["wrong_datatype"]["message"]
    assert errors["unknown_output"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "unexpected inference output 'z'" in errors["unknown_output"]["message"]
    assert errors["wrong_shape"]["status"] == "StatusCode.INVALID_ARGUMENT"  # the op's own error


def test_kserve_grpc_client(kserve: dict[str, Any], srv: GrpcServer) -> None:
    assert kserve["live"] is True and kserve["ready"] is True and kserve["model_ready"] is True
    assert kserve["unknown_ready"]["code"] == "StatusCode.NOT_FOUND"
    hp = kserve["hp"]
    assert (hp["id"], hp["model_name"], hp["model_version"]) == ("k1", "hp", "2")
    assert values(hp["outputs"]["y"]) == v1(srv.server, "hp", {"instances": [1.0, 2.0, 5.0]})["predictions"]
    multi = kserve["multi"]["outputs"]
    assert list(multi) == ["b_twice"] and values(multi["b_twice"]) == [20, 40]
    strings = kserve["strings"]["outputs"]
    assert values(strings["upper"]) == ["AB", "XYZ"] and values(strings["length"]) == [2, 3]


def test_bad_requests_get_grpc_codes_and_the_workers_live(srv: GrpcServer) -> None:
    pids = srv.server.worker_pids()
    bad = [
        (pb.ModelInferRequest(model_name="hp"), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ModelInferRequest(model_name="hp", inputs=[pb.ModelInferRequest.InferInputTensor(
            name="x", datatype="FP32", shape=[3])], raw_input_contents=[b"\0" * 5]),
         grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ModelInferRequest(model_name="hp", inputs=[pb.ModelInferRequest.InferInputTensor(
            name="x", datatype="FP32", shape=[2**40])]), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.ModelInferRequest(model_name="nope", inputs=[pb.ModelInferRequest.InferInputTensor(
            name="x", datatype="FP32", shape=[1], contents=pb.InferTensorContents(fp32_contents=[1]))]),
         grpc.StatusCode.NOT_FOUND),
    ]
    with grpc.insecure_channel(srv.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(2):  # over the workers' connections
            for request, code in bad:
                with pytest.raises(grpc.RpcError) as info:
                    stub.ModelInfer(request, timeout=30)
                assert info.value.code() == code, info.value.details()
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live is True
    assert srv.server.worker_pids() == pids
