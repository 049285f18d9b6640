"""KServe v2 over gRPC (``inference.GRPCInferenceService`` in tfwsgi/grpc_api.py, messages in
tfwsgi/v2protocodec.py), in process over the fake models on a loopback port: the answers of /v2
over REST (the same app's test client), raw and typed contents of every datatype, outputs
selection, BYTES, the cache shared with /v1, and every bad request as a gRPC status."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from flask import Flask
from prometheus_client import REGISTRY
from test_rest_v2 import DTYPES, types

from fakes import FakeModel, loaded, make_app, make_settings, standard_models
from tfwsgi import __version__, grpc_api, metrics
from tfwsgi.v2proto import grpc_predict_v2_pb2 as pb
from tfwsgi.v2proto import grpc_predict_v2_pb2_grpc as pb_grpc

Stub = pb_grpc.GRPCInferenceServiceStub


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Flask:
    return make_app(tmp_path_factory.mktemp("grpcv2"), [*standard_models(), FakeModel("types", {1: types})])


@pytest.fixture(scope="module")
def stub(app: Flask) -> Iterator[Any]:
    server = grpc_api.build(app.extensions["tfwsgi"].dataplane, make_settings())
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield Stub(ch)
    grpc_api.stop(server, grace=1.0)


def raw(arr: np.ndarray) -> bytes:
    if arr.dtype == object:
        return b"".join(struct.pack("<I", len(v)) + v for v in arr.reshape(-1))
    return arr.astype(arr.dtype.newbyteorder("<")).tobytes()


def request(model: str, inputs: list[tuple[str, str, np.ndarray]], outputs: list[str] | None = None,
            version: str = "", typed: bool = False, **parameters: Any) -> Any:
    """A ModelInferRequest with the inputs in raw_input_contents (typed: in their contents)."""
    r = pb.ModelInferRequest(model_name=model, model_version=version)
    for key, value in parameters.items():
        r.parameters[key].string_param = value
    for name, datatype, arr in inputs:
        t = r.inputs.add(name=name, datatype=datatype, shape=list(arr.shape))
        if typed:
            field = {"BOOL": "bool_contents", "INT64": "int64_contents", "UINT64": "uint64_contents",
                     "FP32": "fp32_contents", "FP16": "fp32_contents", "FP64": "fp64_contents",
                     "BYTES": "bytes_contents"}.get(
                datatype, "int_contents" if datatype.startswith("INT") else "uint_contents")
            getattr(t.contents, field).extend(arr.reshape(-1).tolist())
        else:
            r.raw_input_contents.append(raw(arr))
    for name in outputs or ():
        r.outputs.add(name=name)
    return r


def outputs(response: Any) -> dict[str, tuple[str, list[int], np.ndarray]]:
    """Each output: datatype, shape, values (decoded from raw_output_contents)."""
    out = {}
    for meta, data in zip(response.outputs, response.raw_output_contents, strict=True):
        if meta.datatype == "BYTES":
            items, i = [], 0
            while i < len(data):
                (n,) = struct.unpack_from("<I", data, i)
                items.append(data[i + 4:i + 4 + n])
                i += 4 + n
            values = np.array(items, dtype=object)
        else:
            from tfwsgi.v2codec import DATATYPES
            values = np.frombuffer(data, DATATYPES[meta.datatype].newbyteorder("<"))
        out[meta.name] = (meta.datatype, list(meta.shape), values.reshape(tuple(meta.shape)))
    return out


def fails(call: Any, req: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call(req, timeout=10)
    return info.value.code(), info.value.details()


def test_health_and_server_metadata_agree_with_rest(stub: Any, app: Flask) -> None:
    assert stub.ServerLive(pb.ServerLiveRequest()).live is True
    assert stub.ServerReady(pb.ServerReadyRequest()).ready is True
    meta = stub.ServerMetadata(pb.ServerMetadataRequest())
    rest = app.test_client().get("/v2").get_json()
    assert (meta.name, meta.version, list(meta.extensions)) == (rest["name"], rest["version"],
                                                               rest["extensions"])
    assert meta.version == __version__


def test_model_metadata_agrees_with_rest(stub: Any, app: Flask) -> None:
    for model, version in [("hp", ""), ("hp", "1"), ("hp", "stable"), ("multi", "")]:
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=model, version=version))
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "")
        rest = app.test_client().get(path).get_json()
        assert {"name": meta.name, "versions": list(meta.versions), "platform": meta.platform,
                "inputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                           for t in meta.inputs],
                "outputs": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                            for t in meta.outputs]} == rest
    assert fails(stub.ModelMetadata, pb.ModelMetadataRequest(name="nope")) == (
        grpc.StatusCode.NOT_FOUND, "Servable not found for request: Latest(nope)")


def test_model_ready(stub: Any) -> None:
    for version in ("", "1", "stable"):
        assert stub.ModelReady(pb.ModelReadyRequest(name="hp", version=version)).ready is True
    assert fails(stub.ModelReady, pb.ModelReadyRequest(name="nope")) == (
        grpc.StatusCode.NOT_FOUND, "Could not find any versions of model nope")
    assert fails(stub.ModelReady, pb.ModelReadyRequest(name="hp", version="3")) == (
        grpc.StatusCode.NOT_FOUND, "Could not find version 3 of model hp")
    # failed to load: not ready, and why
    response, call = stub.ModelReady.with_call(pb.ModelReadyRequest(name="flaky", version="2"))
    assert response.ready is False
    why = dict(call.trailing_metadata())["tfwsgi-not-ready"]
    assert "version 2 is END: Can't parse saved_model.pb" in why


def test_infer_raw_and_typed_agree_with_rest_and_v1(stub: Any, app: Flask) -> None:
    x = np.array([1.0, 2.0, 5.0], np.float32)
    client = app.test_client()
    v1 = client.post("/v1/models/hp:predict", json={"instances": x.tolist()}).get_json()["predictions"]
    rest = client.post("/v2/models/hp/infer", json={
        "id": "r1",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [3], "data": x.tolist()}]}).get_json()
    for typed in (False, True):
        req = request("hp", [("x", "FP32", x)], typed=typed)
        req.id = "r1"
        response = stub.ModelInfer(req, timeout=10)
        assert (response.model_name, response.model_version, response.id) == ("hp", "2", "r1")
        (name, (datatype, shape, values)), = outputs(response).items()
        assert (name, datatype, shape, values.tolist()) == ("y", "FP32", [3], v1)
        assert rest["outputs"] == [{"name": name, "datatype": datatype, "shape": shape,
                                    "data": values.tolist()}]
    stable = stub.ModelInfer(request("hp", [("x", "FP32", x)], version="stable"), timeout=10)
    assert stable.model_version == "1" and outputs(stable)["y"][2].tolist() == [2.5, 3.0, 4.5]
    assert stub.ModelInfer(request("hp", [("x", "FP32", x)]), timeout=10).id == ""


def test_outputs_selection_and_order(stub: Any) -> None:
    inputs = [("a", "FP32", np.array([[1, 2], [3, 4]], np.float32)),
              ("b", "INT32", np.array([10, 20], np.int32))]
    every = outputs(stub.ModelInfer(request("multi", inputs), timeout=10))
    assert list(every) == ["b_twice", "sum"]  # by name, as /v2 over REST
    one = outputs(stub.ModelInfer(request("multi", inputs, outputs=["sum"]), timeout=10))
    assert list(one) == ["sum"] and one["sum"][2].tolist() == [13.0, 27.0]
    both = outputs(stub.ModelInfer(request("multi", inputs, outputs=["sum", "b_twice"]), timeout=10))
    assert list(both) == ["sum", "b_twice"] and both["b_twice"][2].tolist() == [20, 40]


@pytest.mark.parametrize("typed", [False, True], ids=["raw", "typed"])
def test_bytes(stub: Any, typed: bool) -> None:
    s = np.array([b"ab", b"x\xffz"], dtype=object)
    out = outputs(stub.ModelInfer(request("multi", [("s", "BYTES", s)], typed=typed,
                                          signature_name="strings"), timeout=10))
    assert out["upper"][:2] == ("BYTES", [2]) and out["upper"][2].tolist() == [b"AB", b"X\xffZ"]
    assert out["length"][2].tolist() == [2, 3]


@pytest.mark.parametrize("datatype", [d for d in DTYPES if d != "FP16"] + ["FP16"])
@pytest.mark.parametrize("typed", [False, True], ids=["raw", "typed"])
def test_every_datatype(stub: Any, datatype: str, typed: bool) -> None:
    dtype = DTYPES[datatype]
    if dtype.kind == "b":
        x = np.array([True, False, True])
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        x = np.array([info.min, 0, info.max], dtype)
    else:
        x = np.array([-1.5, 0.0, 2.25], dtype)
    req = request("types", [("x", datatype, x)], typed=typed, signature_name=datatype)
    if typed and datatype == "FP16":
        assert fails(stub.ModelInfer, req) == (
            grpc.StatusCode.INVALID_ARGUMENT, "input 'x': FP16 data must be given in raw_input_contents")
        return
    (datatype_, shape, values) = outputs(stub.ModelInfer(req, timeout=10))["y"]
    assert (datatype_, shape, values.dtype, values.tolist()) == (datatype, [3], dtype, x.tolist())


def test_v1_and_grpc_v2_share_a_cache_entry(stub: Any, app: Flask) -> None:
    sig = loaded(app, "hp", 2).signature("")
    before = sig.runs
    r1 = app.test_client().post("/v1/models/hp:predict", json={"instances": [71.0, 72.0]})
    assert r1.headers["Cache-Status"] == "tfwsgi; fwd=miss; stored"
    for typed in (False, True):
        response = stub.ModelInfer(request("hp", [("x", "FP32", np.array([71, 72], np.float32))],
                                           typed=typed), timeout=10)
        assert outputs(response)["y"][2].tolist() == r1.get_json()["predictions"]
    assert sig.runs == before + 1


def test_infer_is_counted_as_grpc(stub: Any) -> None:
    def count() -> float:  # the latency histogram's count: the one metric with the entrypoint
        metrics.flush()
        value = REGISTRY.get_sample_value(
            ":tensorflow:serving:request_latency_count",
            {"model_name": "hp", "API": "Predict", "entrypoint": "GRPC"})
        return value or 0.0
    before = count()
    stub.ModelInfer(request("hp", [("x", "FP32", np.ones(2, np.float32))]), timeout=10)
    assert count() == before + 1


X = ("x", "FP32", np.ones(2, np.float32))
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _raw_and_contents() -> Any:
    r = request("hp", [X])
    r.inputs[0].contents.fp32_contents.extend([1.0, 1.0])
    return r


def _raw_count() -> Any:
    r = request("hp", [X])
    r.raw_input_contents.append(b"")
    return r


def _wrong_field() -> Any:
    r = request("hp", [X], typed=True)
    r.inputs[0].contents.fp64_contents.append(1.0)
    return r


def _shared_memory() -> Any:
    r = request("hp", [X])
    r.inputs[0].parameters["shared_memory_region"].string_param = "r"
    return r


def _short_bytes() -> Any:
    r = request("multi", [("s", "BYTES", np.array([b"ab"], dtype=object))], signature_name="strings")
    r.raw_input_contents[0] = b"\5\0\0\0ab"  # says 5 bytes, has 2
    return r


def _classification() -> Any:
    r = request("hp", [X], outputs=["y"])
    r.outputs[0].parameters["classification"].int64_param = 2
    return r


@pytest.mark.parametrize("req, code, message", [
    (request("nope", [X]), grpc.StatusCode.NOT_FOUND, "Servable not found for request: Latest(nope)"),
    (request("hp", [X], version="3"), grpc.StatusCode.NOT_FOUND,
     "Servable not found for request: Specific(hp, 3)"),
    (request("hp", [X], version=str(2**64)), INVALID, f"Failed to convert version: {2**64} to numeric."),
    (pb.ModelInferRequest(model_name="hp"), INVALID, "the request must have inputs"),
    (request("hp", [("x", "FP64", np.ones(2))]), INVALID,
     "inference input 'x' data-type is 'FP64', but model 'hp' expects 'FP32'"),
    (request("hp", [("x", "FP23", np.ones(2, np.float32))]), INVALID,
     "input 'x': unsupported datatype 'FP23'"),
    (request("hp", [X], outputs=["z"]), INVALID, "unexpected inference output 'z' for model 'hp'"),
    (request("hp", [X], outputs=["y", "y"]), INVALID, "output 'y' is requested more than once"),
    (request("hp", [X, X]), INVALID, "input 'x' is given more than once"),
    (request("hp", [("y", "FP32", np.ones(2, np.float32))]), INVALID, "y"),
    (_raw_and_contents(), INVALID, "input 'x': 'contents' must not be given with raw_input_contents"),
    (_raw_count(), INVALID,
     "raw_input_contents must hold one entry per input: 1 inputs, 2 raw_input_contents"),
    (_wrong_field(), INVALID, "input 'x': FP32 values go in 'fp32_contents', not in 'fp64_contents'"),
    (pb.ModelInferRequest(model_name="hp", inputs=[pb.ModelInferRequest.InferInputTensor(
        name="x", datatype="FP32", shape=[3])], raw_input_contents=[b"\0" * 8]), INVALID,
     "input 'x': binary_data_size is 8 bytes, shape [3] of FP32 takes 12"),
    (request("hp", [("x", "FP32", np.ones(2, np.float32))], typed=False, signature_name="nosig"),
     INVALID, "nosig"),
    (request("types", [("x", "INT8", np.array([300]))], typed=True, signature_name="INT8"), INVALID,
     "input 'x': a value is out of the range of INT8"),
    (_short_bytes(), INVALID, "input 's': a BYTES element of 5 bytes is past the end of its data"),
    (_shared_memory(), grpc.StatusCode.UNIMPLEMENTED, "input 'x': shared memory is not supported"),
    (_classification(), grpc.StatusCode.UNIMPLEMENTED, "classification extension"),
    (request("multi", [X], signature_name="unavailable"), grpc.StatusCode.UNAVAILABLE,
     "the device went away"),
], ids=lambda v: None)
def test_bad_requests_get_tritons_codes(stub: Any, req: Any, code: grpc.StatusCode, message: str) -> None:
    got_code, details = fails(stub.ModelInfer, req)
    assert got_code == code and message in details, details
