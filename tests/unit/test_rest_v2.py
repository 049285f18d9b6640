"""KServe v2 / Open Inference Protocol over REST (``tfwsgi/v2.py``), in process against the fake
models: health, server and model metadata, model readiness, infer with JSON and binary tensors of
every datatype, outputs selection, BYTES, the shared cache, and every error as 4xx JSON."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakes import FakeModel, FakeServable, FakeSignature, loaded, make_app, standard_models
from tfwsgi import __version__, v2codec
from v2_fuzz import infer_bodies

HP = "/v2/models/hp"
DTYPES = {k: v for k, v in v2codec.DATATYPES.items() if k != "BYTES"}


def types(name: str, version: int, path: str) -> FakeServable:
    """One identity signature per numeric datatype, named after it: x → y."""
    return FakeServable(name, version, path, [
        FakeSignature(datatype, {"x": dtype}, {"y": dtype}, lambda x: {"y": x}, {"x": (None,)})
        for datatype, dtype in DTYPES.items()])


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    return make_app(tmp_path_factory.mktemp("v2"), [*standard_models(), FakeModel("types", {1: types})])


@pytest.fixture
def client(app) -> FlaskClient:
    return app.test_client()


def ok(resp) -> dict:
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.headers["Content-Type"] == "application/json"
    return json.loads(resp.get_data())


def error(resp, status: int) -> str:
    assert resp.status_code == status, resp.get_data(as_text=True)
    assert resp.headers["Content-Type"] == "application/json"
    doc = json.loads(resp.get_data())
    assert set(doc) == {"error"}, doc
    return str(doc["error"])


def tensor(name, datatype, shape, data) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def binary_request(inputs, outputs=None, **parameters) -> tuple[bytes, dict[str, str]]:
    """A body with every input as binary data: (body, headers), as tritonclient writes it."""
    doc: dict = {"inputs": []}
    chunks = []
    for name, datatype, arr in inputs:
        raw = v2codec.encode_binary(np.asarray(arr), datatype)
        doc["inputs"].append({"name": name, "datatype": datatype, "shape": list(np.shape(arr)),
                              "parameters": {"binary_data_size": len(raw)}})
        chunks.append(raw)
    if outputs is not None:
        doc["outputs"] = outputs
    if parameters:
        doc["parameters"] = parameters
    header = json.dumps(doc).encode()
    return header + b"".join(chunks), {"Inference-Header-Content-Length": str(len(header)),
                                       "Content-Type": "application/octet-stream"}


def binary_response(resp) -> tuple[dict, dict[str, np.ndarray]]:
    """The JSON header and the binary outputs (numeric ones) of a response."""
    assert resp.status_code == 200, resp.get_data(as_text=True)
    assert resp.headers["Content-Type"] == "application/octet-stream"
    body = resp.get_data()
    n = int(resp.headers["Inference-Header-Content-Length"])
    doc = json.loads(body[:n])
    arrays = {}
    offset = n
    for out in doc["outputs"]:
        if "parameters" in out:
            size = out["parameters"]["binary_data_size"]
            raw = body[offset:offset + size]
            offset += size
            if out["datatype"] == "BYTES":
                arrays[out["name"]] = np.array(list(_unprefix(raw)), dtype=object).reshape(out["shape"])
            else:
                dtype = v2codec.DATATYPES[out["datatype"]].newbyteorder("<")
                arrays[out["name"]] = np.frombuffer(raw, dtype=dtype).reshape(out["shape"])
    assert offset == len(body)
    return doc, arrays


def _unprefix(raw: bytes):
    i = 0
    while i < len(raw):
        (n,) = struct.unpack_from("<I", raw, i)
        yield raw[i + 4:i + 4 + n]
        i += 4 + n


# ------------------------------------------------------------------ health and metadata

def test_server_metadata_and_health(client):
    assert ok(client.get("/v2")) == {"name": "tfwsgi", "version": __version__,
                                     "extensions": ["binary_tensor_data"]}
    assert ok(client.get("/v2/health/live")) == {"live": True}
    assert ok(client.get("/v2/health/ready"))["ready"] is True


def test_model_metadata(client):
    assert ok(client.get(HP)) == {
        "name": "hp", "versions": ["1", "2"], "platform": "tensorflow_savedmodel",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1]}]}  # unknown rank: [-1]
    assert ok(client.get(HP + "/versions/1"))["name"] == "hp"
    assert ok(client.get(HP + "/versions/stable"))["versions"] == ["1", "2"]  # a label
    multi = ok(client.get("/v2/models/multi"))
    assert multi["inputs"] == [{"name": "a", "datatype": "FP32", "shape": [-1, 2]},
                               {"name": "b", "datatype": "INT32", "shape": [-1]}]
    strings = ok(client.get("/v2/models/multi?signature_name=strings"))
    assert strings["inputs"] == [{"name": "s", "datatype": "BYTES", "shape": [-1]}]
    assert [o["datatype"] for o in strings["outputs"]] == ["BYTES", "INT32", "BYTES"]
    fp16 = ok(client.get("/v2/models/types?signature_name=FP16"))
    assert [i["datatype"] for i in fp16["inputs"]] == ["FP16"]


def test_model_metadata_errors(client):
    assert "Latest(nope)" in error(client.get("/v2/models/nope"), 404)
    assert "Specific(hp, 3)" in error(client.get(HP + "/versions/3"), 404)
    assert "label: nolabel" in error(client.get(HP + "/versions/nolabel"), 400)
    assert '"nosuch" not found' in error(client.get(HP + "?signature_name=nosuch"), 400)


def test_model_ready(client):
    assert ok(client.get(HP + "/ready")) == {"name": "hp", "ready": True}
    assert ok(client.get(HP + "/versions/1/ready")) == {"name": "hp", "ready": True}
    assert ok(client.get(HP + "/versions/canary/ready")) == {"name": "hp", "ready": True}
    assert ok(client.get("/v2/models/flaky/versions/1/ready"))["ready"] is True


def test_model_ready_unknown_or_not_ready_is_said_so(client):
    assert error(client.get("/v2/models/nope/ready"), 404) == "Could not find any versions of model nope"
    assert error(client.get(HP + "/versions/3/ready"), 404) == "Could not find version 3 of model hp"
    r = client.get("/v2/models/flaky/versions/2/ready")  # failed to load
    assert r.status_code == 400
    doc = r.get_json()
    assert doc["ready"] is False and doc["name"] == "flaky"
    assert "version 2 is END: Can't parse saved_model.pb" in doc["error"]


# ------------------------------------------------------------------ infer: JSON

def test_infer_json_agrees_with_v1(client):
    body = {"id": "req-1", "inputs": [tensor("x", "FP32", [3], [1.0, 2.0, 5.0])]}
    doc = ok(client.post(HP + "/infer", json=body))
    v1 = client.post("/v1/models/hp:predict", json={"instances": [1.0, 2.0, 5.0]}).get_json()
    assert doc == {"model_name": "hp", "model_version": "2", "id": "req-1",
                   "outputs": [{"name": "y", "datatype": "FP32", "shape": [3], "data": v1["predictions"]}]}
    assert v1["predictions"] == [3.5, 4.0, 5.5]
    doc = ok(client.post(HP + "/versions/stable/infer", json=body))  # label stable: version 1
    assert doc["model_version"] == "1" and doc["outputs"][0]["data"] == [2.5, 3.0, 4.5]
    assert "id" not in ok(client.post(HP + "/infer", json={"inputs": body["inputs"]}))


def test_infer_nested_data_and_outputs_selection(client):
    inputs = [tensor("a", "FP32", [2, 2], [[1, 2], [3, 4]]), tensor("b", "INT32", [2], [10, 20])]
    doc = ok(client.post("/v2/models/multi/infer", json={"inputs": inputs}))
    assert doc["outputs"] == [
        {"name": "b_twice", "datatype": "INT32", "shape": [2], "data": [20, 40]},
        {"name": "sum", "datatype": "FP32", "shape": [2], "data": [13.0, 27.0]}]
    flat = [tensor("a", "FP32", [2, 2], [1, 2, 3, 4]), inputs[1]]
    doc = ok(client.post("/v2/models/multi/infer", json={"inputs": flat, "outputs": [{"name": "sum"}]}))
    assert doc["outputs"] == [{"name": "sum", "datatype": "FP32", "shape": [2], "data": [13.0, 27.0]}]


@pytest.mark.parametrize("datatype", list(DTYPES))
def test_every_datatype_json(client, datatype):
    data = [True, False] if datatype == "BOOL" else [0, 1, 2.5] if datatype.startswith("FP") else [0, 1, 7]
    info = None if datatype == "BOOL" or datatype.startswith("FP") else np.iinfo(DTYPES[datatype])
    if info is not None:
        data = [int(info.min), 1, int(info.max)]
    body = {"inputs": [tensor("x", datatype, [len(data)], data)], "parameters": {"signature_name": datatype}}
    doc = ok(client.post("/v2/models/types/infer", json=body))
    assert doc["outputs"] == [{"name": "y", "datatype": datatype, "shape": [len(data)], "data": data}]


@pytest.mark.parametrize("datatype", list(DTYPES))
def test_every_datatype_binary(client, datatype):
    dtype = DTYPES[datatype]
    arr = (np.array([[True, False], [False, True]]) if datatype == "BOOL" else
           np.array([[0, 1], [2, 3.5 if dtype.kind == "f" else 100]], dtype=dtype))
    if dtype.kind in "iu":
        arr[1, 1] = np.iinfo(dtype).max
    body, headers = binary_request([("x", datatype, arr)], binary_data_output=True, signature_name=datatype)
    doc, arrays = binary_response(client.post("/v2/models/types/infer", data=body, headers=headers))
    assert doc["outputs"][0]["datatype"] == datatype and doc["outputs"][0]["shape"] == [2, 2]
    np.testing.assert_array_equal(arrays["y"], arr)
    assert arrays["y"].dtype == dtype.newbyteorder("<")


def test_binary_output_per_output_overrides_the_request_default(client):
    a = np.array([[1, 2], [3, 4]], dtype=np.float32)
    b = np.array([10, 20], dtype=np.int32)
    body, headers = binary_request([("a", "FP32", a), ("b", "INT32", b)],
                                   outputs=[{"name": "sum", "parameters": {"binary_data": True}},
                                            {"name": "b_twice", "parameters": {"binary_data": False}}])
    doc, arrays = binary_response(client.post("/v2/models/multi/infer", data=body, headers=headers))
    assert [o["name"] for o in doc["outputs"]] == ["sum", "b_twice"]  # the request's order
    assert doc["outputs"][1]["data"] == [20, 40] and "parameters" not in doc["outputs"][1]
    assert doc["outputs"][0]["parameters"] == {"binary_data_size": 8}
    np.testing.assert_array_equal(arrays["sum"], [13.0, 27.0])
    # binary inputs, JSON outputs: a plain JSON answer
    body, headers = binary_request([("a", "FP32", a), ("b", "INT32", b)])
    doc = ok(client.post("/v2/models/multi/infer", data=body, headers=headers))
    assert doc["outputs"][1]["data"] == [13, 27]


def test_bytes_json_and_binary(client):
    body = {"inputs": [tensor("s", "BYTES", [2], ["ab", "çd"])], "parameters": {"signature_name": "strings"}}
    doc = ok(client.post("/v2/models/multi/infer", json=body))
    assert doc["outputs"] == [
        {"name": "echo_bytes", "datatype": "BYTES", "shape": [2], "data": ["ab", "çd"]},
        {"name": "length", "datatype": "INT32", "shape": [2], "data": [2, 3]},
        {"name": "upper", "datatype": "BYTES", "shape": [2], "data": ["AB", "çD"]}]
    raw = np.array([b"\xff\x00", b"", b"xyz"], dtype=object)
    body, headers = binary_request([("s", "BYTES", raw)], binary_data_output=True, signature_name="strings")
    doc, arrays = binary_response(client.post("/v2/models/multi/infer", data=body, headers=headers))
    assert list(arrays["echo_bytes"]) == [b"\xff\x00", b"", b"xyz"]
    assert list(arrays["upper"]) == [b"\xff\x00", b"", b"XYZ"]
    np.testing.assert_array_equal(arrays["length"], [2, 0, 3])


def test_bytes_that_json_cannot_carry_ask_for_binary(client):
    body, headers = binary_request([("s", "BYTES", np.array([b"\xff"], dtype=object))],
                                   signature_name="strings")
    message = error(client.post("/v2/models/multi/infer", data=body, headers=headers), 400)
    assert "not UTF-8" in message and "binary_data" in message


# ------------------------------------------------------------------ the core: cache, metrics

def test_v1_and_v2_share_a_cache_entry_and_the_model_runs_once(app, client):
    sig = loaded(app, "hp", 2).signature("")
    before = sig.runs
    r1 = client.post("/v1/models/hp:predict", json={"instances": [61.0, 62.0]})
    assert r1.headers["Cache-Status"] == "tfwsgi; fwd=miss; stored"
    r2 = client.post(HP + "/infer", json={"inputs": [tensor("x", "FP32", [2], [61, 62])]})
    assert r2.headers["Cache-Status"] == "tfwsgi; hit"
    body, headers = binary_request([("x", "FP32", np.array([61, 62], dtype=np.float32))])
    r3 = client.post(HP + "/infer", data=body, headers=headers)
    assert r3.headers["Cache-Status"] == "tfwsgi; hit"
    assert ok(r2)["outputs"][0]["data"] == ok(r3)["outputs"][0]["data"] == r1.get_json()["predictions"]
    assert sig.runs == before + 1


# ------------------------------------------------------------------ errors: 4xx JSON

def infer_json(inputs, **extra) -> dict:
    return {"inputs": inputs, **extra}


X = tensor("x", "FP32", [1], [1.0])
BAD_BODIES = [
    (b"", "The document is empty"),
    (b"{", "JSON Parse error"),
    (b"[]", "Is not object"),
    (b"{}", "'inputs': a non-empty list"),
    (json.dumps({"inputs": []}), "'inputs': a non-empty list"),
    (json.dumps({"inputs": [1]}), "each of 'inputs' must be a JSON object"),
    (json.dumps({"inputs": [{"datatype": "FP32", "shape": [1], "data": [1]}]}), "string 'name'"),
    (json.dumps({"inputs": [{"name": "x", "shape": [1], "data": [1]}]}), "string 'datatype'"),
    (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "data": [1]}]}), "must have a 'shape'"),
    (json.dumps({"inputs": [tensor("x", "FP32", [-1], [1])]}), "non-negative integer"),
    (json.dumps({"inputs": [tensor("x", "FP32", [True], [1])]}), "non-negative integer"),
    (json.dumps({"inputs": [tensor("x", "FP99", [1], [1])]}), "unsupported datatype 'FP99'"),
    (json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1]}]}), "has no 'data'"),
    (json.dumps({"inputs": [tensor("x", "FP32", [2], [1])]}), "shape [2] has 2 elements, 'data' has 1"),
    (json.dumps({"inputs": [tensor("x", "FP32", [2], [[1], [2, 3]])]}), "evenly nested"),
    (json.dumps({"inputs": [tensor("x", "FP32", [1], ["a"])]}), "not FP32"),
    (json.dumps({"inputs": [tensor("x", "FP32", [1], [None])]}), "not FP32"),
    (json.dumps({"inputs": [tensor("x", "FP32", [1], [{"b64": "AA=="}])]}), "not FP32"),
    (json.dumps({"inputs": [X, X]}), "input 'x' is given more than once"),
    (json.dumps({"inputs": [X], "id": 7}), "'id' must be a string"),
    (json.dumps({"inputs": [X], "parameters": []}), "'parameters' must be a JSON object"),
    (json.dumps({"inputs": [X], "parameters": {"signature_name": 1}}), "'signature_name' must be a string"),
    (json.dumps({"inputs": [X], "parameters": {"binary_data_output": "yes"}}), "must be a boolean"),
    (json.dumps({"inputs": [X], "outputs": {}}), "'outputs' must be a list"),
    (json.dumps({"inputs": [X], "outputs": [{"name": "y"}, {"name": "y"}]}), "requested more than once"),
    (json.dumps({"inputs": [X], "outputs": [{"name": "z"}]}),
     "unexpected inference output 'z' for model 'hp'"),
    (json.dumps({"inputs": [X], "outputs": [{"name": "y", "parameters": {"binary_data": 1}}]}),
     "must be a boolean"),
    (json.dumps({"inputs": [tensor("x", "FP64", [1], [1])]}),
     "inference input 'x' data-type is 'FP64', but model 'hp' expects 'FP32'"),
    (json.dumps({"inputs": [tensor("z", "FP32", [1], [1])]}), "input size does not match signature"),
    (json.dumps({"inputs": [X], "parameters": {"signature_name": "nosuch"}}), '"nosuch" not found'),
    (json.dumps({"inputs": [{**X, "parameters": {"binary_data_size": 4}}]}), "both 'data' and"),
    # nested 1000 deep (the JSON parser takes 1024): was a RecursionError and a 500
    ('{"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": '
     + "[" * 1000 + '"a"' + "]" * 1000 + "}]}", "model 'hp' expects 'FP32'"),
    ('{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": '
     + "[" * 1000 + "1" + "]" * 1000 + "}]}", "evenly nested"),
]


@pytest.mark.parametrize(("body", "message"), BAD_BODIES)
def test_bad_bodies_are_400_json(client, body, message):
    assert message in error(client.post(HP + "/infer", data=body), 400)


INT_RANGE = [("INT8", [128]), ("INT8", [-129]), ("UINT8", [-1]), ("UINT64", [-1]),
             ("INT64", [2**63]), ("INT32", [1.5]), ("BOOL", [1]), ("FP32", [True])]


@pytest.mark.parametrize(("datatype", "data"), INT_RANGE)
def test_values_out_of_range_or_of_the_wrong_type(client, datatype, data):
    body = infer_json([tensor("x", datatype, [1], data)], parameters={"signature_name": datatype})
    message = error(client.post("/v2/models/types/infer", json=body), 400)
    assert "out of the range" in message or "not " + datatype in message


@pytest.mark.parametrize("datatype", ["FP16", "FP32"])
def test_floats_past_the_range_are_infinities(client, datatype):
    """As Triton's and TF Serving's casts give (was a RuntimeWarning: a 500 where warnings are errors)."""
    body = infer_json([tensor("x", datatype, [2], [1e300, -1e300])], parameters={"signature_name": datatype})
    assert ok(client.post("/v2/models/types/infer", json=body))["outputs"][0]["data"] == [
        float("inf"), float("-inf")]


def raw_infer(client, header: dict, binary: bytes, header_length: int | str | None = None):
    text = json.dumps(header).encode()
    n = len(text) if header_length is None else header_length
    return client.post(HP + "/infer", data=text + binary, headers={"Inference-Header-Content-Length": str(n)})


def size(n: int, datatype: str = "FP32", shape: list[int] | None = None) -> dict:
    return {"inputs": [{"name": "x", "datatype": datatype, "shape": shape or [1],
                        "parameters": {"binary_data_size": n}}]}


@pytest.mark.parametrize(("header", "binary", "length", "message"), [
    (size(4), b"\0\0\x80?", "x", "must be a non-negative integer"),
    (size(4), b"\0\0\x80?", "\u00b2", "must be a non-negative integer"),  # was a 500 (found by the fuzz)
    (size(4), b"\0\0\x80?", 10**6, "is larger than the body"),
    (size(8), b"\0\0\x80?", None, "past the end of the binary data"),
    (size(4), b"\0\0\x80?\0", None, "1 bytes of binary data follow the inputs"),
    (size(3), b"\0\0\x80", None, "binary_data_size is 3 bytes, shape [1] of FP32 takes 4"),
    (size(-1), b"", None, "non-negative integer"),
    (size(2, "BOOL", [2]), b"\x01\x02", None, "BOOL bytes must be 0 or 1"),
    (size(3, "BYTES"), b"\x05\0\0", None, "ends inside an element's 4-byte length"),
    (size(5, "BYTES"), b"\x05\0\0\0a", None, "past the end of its data"),
    (size(5, "BYTES", [2]), b"\x01\0\0\0a", None, "shape [2] has 2 elements, 'data' has 1"),
    ({"inputs": [X]}, b"junk", None, "4 bytes of binary data follow the inputs"),
])
def test_bad_binary_bodies_are_400_json(client, header, binary, length, message):
    assert message in error(raw_infer(client, header, binary, length), 400)


def test_unsupported_extensions_are_501(client):
    body = infer_json([X], outputs=[{"name": "y", "parameters": {"classification": 2}}])
    assert "classification" in error(client.post(HP + "/infer", json=body), 501)
    body = infer_json([{**X, "parameters": {"shared_memory_region": "r"}}])
    assert "shared memory" in error(client.post(HP + "/infer", json=body), 501)


def test_model_errors_get_tritons_status(client):
    assert "Latest(nope)" in error(client.post("/v2/models/nope/infer", json=infer_json([X])), 404)
    assert "Specific(hp, 3)" in error(client.post(HP + "/versions/3/infer", json=infer_json([X])), 404)
    assert "label: nolabel" in error(client.post(HP + "/versions/nolabel/infer", json=infer_json([X])), 400)
    assert "Failed to convert version" in error(client.post(HP + f"/versions/{2**64}/infer",
                                                            json=infer_json([X])), 400)
    unavailable = infer_json([X], parameters={"signature_name": "unavailable"})
    assert error(client.post("/v2/models/multi/infer", json=unavailable), 503) == "the device went away"
    op_error = infer_json([tensor("x", "FP32", [1], [-1])], parameters={"signature_name": "positive_only"})
    assert "x must be > 0" in error(client.post("/v2/models/multi/infer", json=op_error), 400)


@pytest.mark.parametrize("version", ["\u00b2", "\u0661", "1\u00b2"])
def test_a_version_of_non_ascii_digits_is_a_label(client, version):
    """Was a 500 for "²" (str.isdigit, then int() fails) and version 1 for "١" (int() takes it)."""
    assert f"label: {version}" in error(client.get(f"{HP}/versions/{version}"), 400)
    infer = client.post(f"{HP}/versions/{version}/infer", json=infer_json([X]))
    assert f"label: {version}" in error(infer, 400)


def test_other_paths_and_methods_are_400_json(client):
    assert error(client.get("/v2/models/hp/infer"), 400) == "Malformed request: GET /v2/models/hp/infer"
    assert error(client.post(HP), 400) == "Malformed request: POST /v2/models/hp"
    assert error(client.get("/v2/repository/index"), 400) == "Malformed request: GET /v2/repository/index"
    assert error(client.delete("/v2/health/live"), 400) == "Malformed request: DELETE /v2/health/live"


def test_a_body_over_the_limit_is_413_json(tmp_path):
    small = make_app(tmp_path, max_request_bytes=64).test_client()
    body = infer_json([tensor("x", "FP32", [40], [1.0] * 40)])
    assert "larger than the limit of 64 bytes" in error(small.post(HP + "/infer", json=body), 413)


FUZZ_STATUSES: set[int] = set()


@given(model=st.sampled_from(["hp", "multi"]), data=st.data())
@settings(max_examples=600, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_fuzzed_bodies_get_an_answer_or_a_4xx_json_error(app, model, data):
    """tests/v2_fuzz.py's near-valid bodies (binary sizes and lengths, shapes, datatypes, values):
    a 200, or a 4xx/501 ``{"error": "…"}``, never a 500 (warnings are errors here, too)."""
    body, headers = data.draw(infer_bodies(model))
    resp = app.test_client().post(f"/v2/models/{model}/infer", data=body, headers=headers)
    FUZZ_STATUSES.add(resp.status_code)
    assert resp.status_code == 200 or 400 <= resp.status_code < 500 or resp.status_code == 501, (
        resp.status_code, resp.get_data(as_text=True), body[:300], headers)
    if resp.status_code != 200:
        error(resp, resp.status_code)


def test_the_fuzz_reached_the_models():
    """Runs after the fuzz (file order): the bodies got answers too, not only errors."""
    assert {200, 400} <= FUZZ_STATUSES
