"""KServe v2 infer bodies for fuzzing, shared by the in-process tier (tests/unit/test_rest_v2.py)
and the real server's (tests/e2e/test_openapi_e2e.py): near-valid requests with one thing or more
gone wrong, in JSON and in the binary tensor data extension. schemathesis, from the OpenAPI
document, sends bodies the schema allows and random bytes; these reach further into the decoder:
bad or huge ``Inference-Header-Content-Length`` values and ``binary_data_size``s, shapes that do not
match the data, BYTES length prefixes past the end, unknown datatypes, values of the wrong type."""

from __future__ import annotations

import json
import struct
from typing import Any

from hypothesis import strategies as st

DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "FP32", "FP64", "BYTES"]
ITEMSIZE = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "UINT32": 4,
            "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8}
HUGE = [2**31, 2**32, 2**63 - 1, 2**63, 2**64, 10**30]
# The test models' signatures (tests/models.py, and tests/unit/fakes.py's fakes of them) → their
# inputs' datatypes, so that most bodies reach the model.
SIGNATURES = {
    "hp": {"serving_default": {"x": "FP32"}},
    "half_plus_two": {"serving_default": {"x": "FP32"}},
    "multi": {"serving_default": {"a": "FP32", "b": "INT32"}, "strings": {"s": "BYTES"},
              "scalar": {"x": "FP32"}, "boolean": {"flag": "BOOL"}, "double": {"x": "FP64"}},
}

VALUES = {"BOOL": st.booleans(), "BYTES": st.text(max_size=4),
          "FP16": st.floats(width=16), "FP32": st.floats(width=32), "FP64": st.floats(),
          **{t: st.integers(-2**(8 * n - 1), 2**(8 * n - 1) - 1) for t, n in
             [("INT8", 1), ("INT16", 2), ("INT32", 4), ("INT64", 8)]},
          **{t: st.integers(0, 2**(8 * n) - 1) for t, n in
             [("UINT8", 1), ("UINT16", 2), ("UINT32", 4), ("UINT64", 8)]}}


def wrong(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Mostly ``good``, about one time in eight ``bad``: near-valid requests get past the first check."""
    return rarely(8).flatmap(lambda r: bad if r else good)


def rarely(n: int) -> st.SearchStrategy[bool]:
    """True about one time in ``n`` (hypothesis draws small integers and the first choices often)."""
    return st.sampled_from(range(n)).map(lambda i: i == n - 1)


names = st.sampled_from(["x", "a", "b", "y", "c", "", "x" * 300])
datatypes = wrong(st.sampled_from(DATATYPES), st.one_of(
    st.sampled_from(["BF16", "fp32", "STRING", ""]), st.integers(), st.none()))
dims = st.one_of(st.integers(0, 4), st.sampled_from([*HUGE, -1]), st.floats(0, 4), st.just("2"))
shapes = wrong(st.lists(st.integers(0, 3), max_size=3),
               st.one_of(st.lists(dims, max_size=40), st.none(), st.integers()))
scalars = st.one_of(st.integers(-2**70, 2**70), st.floats(), st.booleans(), st.text(max_size=4),
                    st.none())
json_data = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=3), inner, max_size=2), max_leaves=12)
sizes = st.sampled_from([*HUGE, -1, 1.5, "4", True, 0, 1, 3, 5])


def elements(shape: Any) -> int | None:
    """How many elements a shape has, if it is a small, well-formed one."""
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d <= 4 for d in shape):
        return None
    n = 1
    for d in shape:
        n *= d
    return n


@st.composite
def bytes_elements(draw: st.DrawFn, n: int) -> bytes:
    """BYTES binary data: elements after their 4-byte lengths, some lengths lying (past the end)."""
    out = b""
    for item in draw(st.lists(st.binary(max_size=6), min_size=n, max_size=n)):
        length = len(item) + draw(wrong(st.just(0), st.sampled_from([1, 2**31, 2**32 - 1])))
        out += struct.pack("<I", length % 2**32) + item
    return out + draw(wrong(st.just(b""), st.binary(max_size=3)))  # maybe a cut-off length prefix


@st.composite
def infer_input(draw: st.DrawFn, name: str, datatype: str) -> tuple[dict[str, Any], bytes | None]:
    """One input entry (mostly of the signature input's name and datatype), and its binary data
    if it goes in the binary part."""
    datatype = draw(wrong(st.just(datatype), datatypes))
    shape = draw(shapes)
    entry: dict[str, Any] = {"name": draw(wrong(st.just(name), names)), "datatype": datatype, "shape": shape}
    n = elements(shape)
    n = draw(wrong(st.just(n), st.integers(0, 5))) if n is not None else draw(st.integers(0, 5))
    values = VALUES.get(datatype, scalars) if isinstance(datatype, str) else scalars
    if draw(st.booleans()):  # binary
        if datatype == "BYTES":
            raw = draw(bytes_elements(n))
        else:
            width = ITEMSIZE.get(datatype, 4) if isinstance(datatype, str) else 4
            raw = draw(wrong(st.binary(min_size=n * width, max_size=n * width), st.binary(max_size=16)))
            if datatype == "BOOL" and draw(wrong(st.just(True), st.just(False))):
                raw = bytes(b & 1 for b in raw)
        entry["parameters"] = {"binary_data_size": draw(wrong(st.just(len(raw)), sizes))}
        if draw(rarely(16)):
            entry["data"] = draw(json_data)  # both
        return entry, raw
    data = draw(wrong(st.lists(values, min_size=n, max_size=n), json_data))
    if isinstance(shape, list) and len(shape) == 2 and shape[1] and isinstance(data, list) and \
            len(data) == elements(shape) and draw(st.booleans()):  # nested, row-major
        data = [data[i:i + shape[1]] for i in range(0, len(data), shape[1])]
    if not draw(rarely(16)):
        entry["data"] = data
    if draw(rarely(16)):
        entry["parameters"] = draw(st.one_of(json_data, st.just({"shared_memory_region": "r"})))
    return entry, None


@st.composite
def infer_bodies(draw: st.DrawFn, model: str) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of an infer request for one of ``model``'s signatures, probably wrong
    somewhere."""
    signature_name = draw(st.sampled_from(sorted(SIGNATURES[model])))
    signature = SIGNATURES[model][signature_name]
    inputs = [draw(infer_input(name, datatype)) for name, datatype in signature.items()]
    if draw(rarely(8)):
        inputs = draw(st.lists(infer_input("x", "FP32"), max_size=4))
    doc: dict[str, Any] = {"inputs": [entry for entry, _ in inputs]}
    if signature_name != "serving_default":
        doc["parameters"] = {"signature_name": signature_name}
    if draw(rarely(4)):
        output = st.fixed_dictionaries({"name": wrong(st.sampled_from(["y", "sum", "b_twice", "upper",
                                                                         "echo_bytes", "negated"]), names)},
                                       optional={"parameters": st.fixed_dictionaries({}, optional={
                                           "binary_data": wrong(st.booleans(), scalars),
                                           "classification": st.integers()})})
        doc["outputs"] = draw(wrong(st.lists(output, max_size=3), json_data))
    if draw(rarely(3)):
        doc["parameters"] = draw(wrong(st.fixed_dictionaries({}, optional={
            "binary_data_output": wrong(st.booleans(), scalars),
            "signature_name": wrong(st.just(signature_name), st.one_of(scalars, names))}), json_data))
    if draw(rarely(6)):
        doc["id"] = draw(wrong(st.text(max_size=5), scalars))
    header = json.dumps(doc).encode()
    if draw(rarely(16)):  # broken JSON
        header = header[:draw(st.integers(0, len(header)))]
    binary = b"".join(raw for _, raw in inputs if raw is not None)
    if draw(rarely(10)):
        binary += draw(st.binary(max_size=8))  # bytes no input claims
    if not binary and not draw(rarely(4)):
        return header, {}
    length: str = draw(wrong(st.just(str(len(header))), st.one_of(
        st.integers(-2, len(header) + len(binary) + 2).map(str),
        st.sampled_from([str(h) for h in HUGE] + ["", " ", "x", "1e3", "0x10", "+5", "²",
                                                  "٣".encode().decode("latin-1")]))))
    return header + binary, {"Inference-Header-Content-Length": length,
                             "Content-Type": "application/octet-stream"}
