"""Real KServe v2 clients against a tfwsgi server: ``python tests/v2_clients.py URL SCENARIO``
prints what the clients saw as one JSON document. SCENARIO ``triton`` and ``kserve`` speak REST
to URL; ``triton_grpc`` and ``kserve_grpc`` speak gRPC to URL = ``host:port`` (TFWSGI_PORT).

It runs in the clients' own virtualenv (``make v2-clients``: tritonclient 2.73 and kserve 0.21 pin
protobuf < 7 and ml_dtypes < 0.6, older than the server's), so tests/e2e/test_v2_e2e.py calls it in
a subprocess. Nothing here imports tfwsgi.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any
from urllib.parse import urlsplit

import numpy as np


def _out(arr: Any) -> Any:
    """An output as JSON: bytes as latin-1 text, numbers as lists, with the dtype."""
    arr = np.asarray(arr)
    if arr.dtype.kind in "OS":
        return {"dtype": "bytes", "shape": list(arr.shape),
                "values": [v.decode("latin-1") if isinstance(v, bytes) else v for v in arr.reshape(-1)]}
    return {"dtype": arr.dtype.name, "shape": list(arr.shape), "values": arr.reshape(-1).tolist()}


def triton(url: str) -> dict[str, Any]:
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    c = httpclient.InferenceServerClient(urlsplit(url).netloc)
    seen: dict[str, Any] = {
        "live": c.is_server_live(), "ready": c.is_server_ready(),
        "model_ready": c.is_model_ready("hp"), "version_ready": c.is_model_ready("hp", "1"),
        "label_ready": c.is_model_ready("hp", "stable"),
        "unknown_ready": c.is_model_ready("nope"), "failed_ready": c.is_model_ready("flaky", "2"),
        "server_metadata": c.get_server_metadata(),
        "hp_metadata": c.get_model_metadata("hp"), "multi_metadata": c.get_model_metadata("multi"),
    }

    def infer(model: str, inputs: list[tuple[str, str, np.ndarray]], binary: bool,
              outputs: list[str] | None = None, **kw: Any) -> dict[str, Any]:
        tensors = []
        for name, datatype, arr in inputs:
            t = httpclient.InferInput(name, list(arr.shape), datatype)
            t.set_data_from_numpy(arr, binary_data=binary)
            tensors.append(t)
        requested = None
        if outputs is not None:
            requested = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in outputs]
        r = c.infer(model, tensors, outputs=requested, **kw)
        response = r.get_response()
        names = [o["name"] for o in response["outputs"]]
        return {"id": response.get("id"), "model_version": response["model_version"],
                "outputs": {n: _out(r.as_numpy(n)) for n in names}}

    x = np.array([1.0, 2.0, 5.0], dtype=np.float32)
    for binary in (True, False):
        kind = "binary" if binary else "json"
        seen[f"hp_{kind}"] = infer("hp", [("x", "FP32", x)], binary, request_id="r1")
        seen[f"hp_stable_{kind}"] = infer("hp", [("x", "FP32", x)], binary, model_version="stable")
        seen[f"multi_{kind}"] = infer(
            "multi", [("a", "FP32", np.array([[1, 2], [3, 4]], dtype=np.float32)),
                      ("b", "INT32", np.array([10, 20], dtype=np.int32))], binary, outputs=["sum"])
        seen[f"strings_{kind}"] = infer(
            "multi", [("s", "BYTES", np.array([b"ab", b"xyz"], dtype=object))], binary,
            parameters={"signature_name": "strings"})
        seen[f"boolean_{kind}"] = infer(
            "multi", [("flag", "BOOL", np.array([True, False]))], binary,
            parameters={"signature_name": "boolean"})
        seen[f"double_{kind}"] = infer(
            "multi", [("x", "FP64", np.array([3.0, 1.5]))], binary, parameters={"signature_name": "double"})
    errors = {}
    for case, call in {
        "unknown_model": lambda: infer("nope", [("x", "FP32", x)], True),
        "wrong_datatype": lambda: infer("hp", [("x", "FP64", x.astype(np.float64))], True),
        "unknown_output": lambda: infer("hp", [("x", "FP32", x)], True, outputs=["z"]),
    }.items():
        try:
            call()
            errors[case] = None
        except InferenceServerException as exc:
            errors[case] = {"status": exc.status(), "message": exc.message()}
    seen["errors"] = errors
    c.close()
    return seen


async def kserve(url: str) -> dict[str, Any]:
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
    from kserve.protocol.infer_type import RequestedOutput

    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0))
    seen: dict[str, Any] = {
        "live": await client.is_server_live(url), "ready": await client.is_server_ready(url),
        "model_ready": await client.is_model_ready(url, "hp"),
        "unknown_ready": await client.is_model_ready(url, "nope"),
    }

    async def infer(model: str, inputs: list[tuple[str, str, np.ndarray]], binary: bool,
                    outputs: list[str] | None = None, **parameters: Any) -> dict[str, Any]:
        tensors = []
        for name, datatype, arr in inputs:
            t = InferInput(name, list(arr.shape), datatype)
            t.set_data_from_numpy(arr, binary_data=binary)
            tensors.append(t)
        requested = None
        if outputs is not None:
            requested = [RequestedOutput(n, {"binary_data": binary}) for n in outputs]
        request = InferRequest(model, tensors, request_id="k1", parameters=parameters or None,
                               request_outputs=requested)
        r = await client.infer(url, request, model_name=model)
        return {"id": r.id, "model_name": r.model_name,
                "outputs": {o.name: _out(o.as_numpy()) for o in r.outputs}}

    x = np.array([1.0, 2.0, 5.0], dtype=np.float32)
    for binary in (True, False):
        kind = "binary" if binary else "json"
        seen[f"hp_{kind}"] = await infer("hp", [("x", "FP32", x)], binary)
        seen[f"multi_{kind}"] = await infer(
            "multi", [("a", "FP32", np.array([[1, 2], [3, 4]], dtype=np.float32)),
                      ("b", "INT32", np.array([10, 20], dtype=np.int32))], binary, outputs=["b_twice"])
        seen[f"strings_{kind}"] = await infer(
            "multi", [("s", "BYTES", np.array([b"ab", b"xyz"], dtype=object))], binary,
            signature_name="strings")
    await client.close()
    return seen


def triton_grpc(address: str) -> dict[str, Any]:
    """tritonclient.grpc against ``host:port`` (tfwsgi's TFWSGI_PORT)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    c = grpcclient.InferenceServerClient(address)

    def error(call: Any) -> Any:
        try:
            return {"value": call()}
        except InferenceServerException as exc:
            return {"status": exc.status(), "message": exc.message()}

    seen: dict[str, Any] = {
        "live": c.is_server_live(), "ready": c.is_server_ready(),
        "model_ready": c.is_model_ready("hp"), "version_ready": c.is_model_ready("hp", "1"),
        "label_ready": c.is_model_ready("hp", "stable"),
        "unknown_ready": error(lambda: c.is_model_ready("nope")),
        "failed_ready": error(lambda: c.is_model_ready("flaky", "2")),
        "server_metadata": c.get_server_metadata(as_json=True),
        "hp_metadata": c.get_model_metadata("hp", as_json=True),
        "multi_metadata": c.get_model_metadata("multi", as_json=True),
    }

    def infer(model: str, inputs: list[tuple[str, str, np.ndarray]], outputs: list[str] | None = None,
              **kw: Any) -> dict[str, Any]:
        tensors = []
        for name, datatype, arr in inputs:
            t = grpcclient.InferInput(name, list(arr.shape), datatype)
            t.set_data_from_numpy(arr)
            tensors.append(t)
        requested = None if outputs is None else [grpcclient.InferRequestedOutput(n) for n in outputs]
        r = c.infer(model, tensors, outputs=requested, **kw)
        response = r.get_response(as_json=True)
        names = [o["name"] for o in response["outputs"]]
        return {"id": response.get("id"), "model_version": response["model_version"],
                "outputs": {n: _out(r.as_numpy(n)) for n in names}}

    x = np.array([1.0, 2.0, 5.0], dtype=np.float32)
    seen["hp"] = infer("hp", [("x", "FP32", x)], request_id="r1")
    seen["hp_stable"] = infer("hp", [("x", "FP32", x)], model_version="stable")
    seen["multi"] = infer("multi", [("a", "FP32", np.array([[1, 2], [3, 4]], dtype=np.float32)),
                                    ("b", "INT32", np.array([10, 20], dtype=np.int32))], outputs=["sum"])
    seen["strings"] = infer("multi", [("s", "BYTES", np.array([b"ab", b"xyz"], dtype=object))],
                            parameters={"signature_name": "strings"})
    seen["boolean"] = infer("multi", [("flag", "BOOL", np.array([True, False]))],
                            parameters={"signature_name": "boolean"})
    seen["double"] = infer("multi", [("x", "FP64", np.array([3.0, 1.5]))],
                           parameters={"signature_name": "double"})
    seen["errors"] = {
        "unknown_model": error(lambda: infer("nope", [("x", "FP32", x)])),
        "wrong_datatype": error(lambda: infer("hp", [("x", "FP64", x.astype(np.float64))])),
        "unknown_output": error(lambda: infer("hp", [("x", "FP32", x)], outputs=["z"])),
        "wrong_shape": error(lambda: infer("multi", [("a", "FP32", np.ones(3, np.float32)),
                                                     ("b", "INT32", np.ones(3, np.int32))])),
    }
    c.close()
    return seen


async def kserve_grpc(address: str) -> dict[str, Any]:
    """kserve's InferenceGRPCClient against ``host:port``."""
    from kserve import InferenceGRPCClient, InferInput, InferRequest
    from kserve.protocol.infer_type import RequestedOutput

    client = InferenceGRPCClient(address, retries=0)
    seen: dict[str, Any] = {"live": await client.is_server_live(), "ready": await client.is_server_ready(),
                            "model_ready": await client.is_model_ready("hp")}
    try:
        seen["unknown_ready"] = await client.is_model_ready("nope")
    except Exception as exc:  # grpc.aio.AioRpcError
        seen["unknown_ready"] = {"code": str(exc.code()), "details": exc.details()}  # type: ignore[attr-defined]

    async def infer(model: str, inputs: list[tuple[str, str, np.ndarray]], outputs: list[str] | None = None,
                    **parameters: Any) -> dict[str, Any]:
        tensors = []
        for name, datatype, arr in inputs:
            t = InferInput(name, list(arr.shape), datatype)
            t.set_data_from_numpy(arr, binary_data=True)  # raw_input_contents
            tensors.append(t)
        requested = None if outputs is None else [RequestedOutput(n) for n in outputs]
        request = InferRequest(model, tensors, request_id="k1", parameters=parameters or None,
                               request_outputs=requested)
        r = await client.infer(request)
        return {"id": r.id, "model_name": r.model_name, "model_version": r.model_version,
                "outputs": {o.name: _out(o.as_numpy()) for o in r.outputs}}

    x = np.array([1.0, 2.0, 5.0], dtype=np.float32)
    seen["hp"] = await infer("hp", [("x", "FP32", x)])
    seen["multi"] = await infer("multi", [("a", "FP32", np.array([[1, 2], [3, 4]], dtype=np.float32)),
                                          ("b", "INT32", np.array([10, 20], dtype=np.int32))],
                                outputs=["b_twice"])
    seen["strings"] = await infer("multi", [("s", "BYTES", np.array([b"ab", b"xyz"], dtype=object))],
                                  signature_name="strings")
    await client.close()
    return seen


def main() -> None:
    url, scenario = sys.argv[1], sys.argv[2]
    if scenario == "triton":
        seen = triton(url)
    elif scenario == "triton_grpc":
        seen = triton_grpc(url)
    elif scenario == "kserve_grpc":
        seen = asyncio.run(kserve_grpc(url))
    else:
        seen = asyncio.run(kserve(url))
    json.dump(seen, sys.stdout)


if __name__ == "__main__":
    main()
