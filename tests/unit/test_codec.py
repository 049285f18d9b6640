"""Unit tests of the pure JSON ⇄ numpy codec."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from tfwsgi import codec
from tfwsgi.errors import InvalidArgument

F32 = np.dtype(np.float32)
I32 = np.dtype(np.int32)
I64 = np.dtype(np.int64)
U8 = np.dtype(np.uint8)
BOOL = np.dtype(bool)
STR = codec.STRING


def raises(match: str):
    return pytest.raises(InvalidArgument, match=match)


# ----------------------------------------------------------- parse_json

def test_parse_json_accepts_nan_and_infinity():
    doc = codec.parse_json(b'{"inputs": [NaN, Infinity, -Infinity, 1.5]}')
    assert np.isnan(doc["inputs"][0]) and doc["inputs"][1:] == [np.inf, -np.inf, 1.5]


@pytest.mark.parametrize(("body", "message"), [
    (b"", "JSON Parse error: The document is empty"),  # TF Serving's own check: no offset
    (b"  \n", "JSON Parse error: The document is empty. at offset: 3"),
    (b"{", "JSON Parse error: Missing a name for object member. at offset: 1"),
    (b"\xff", "JSON Parse error: Invalid value. at offset: 0"),
    (b"[1]", "JSON Value: [1] Is not object"),
    (b"null", "JSON Value: null Is not object"),
    (b'"x"', 'JSON Value: "x" Is not object'),
])
def test_parse_json_rejects(body, message):
    with pytest.raises(InvalidArgument) as info:
        codec.parse_json(body)
    assert info.value.message == message


def test_parse_json_stops_after_the_root_as_tf_serving_does():
    """kParseStopWhenDoneFlag: what follows the root object is not read."""
    assert codec.parse_json(b'{"instances": [1]}}') == {"instances": [1]}
    assert codec.parse_json(b'{"instances": [NaN]} and more')["instances"][0] != 0


def test_parse_json_deep_nesting_is_an_error_not_a_crash():
    with raises("JSON Parse error"):
        codec.parse_json(b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b", NaN: 1}")


@pytest.mark.parametrize("depth", [300, 1000, 1020])  # orjson reads up to 1024 levels
def test_error_messages_about_deeply_nested_documents_are_400s(depth):
    """The message quotes the document: writing a 1000-deep one whole was a RecursionError (a 500)."""
    nested = b"[" * depth + b"]" * depth
    doc = codec.parse_json(b'{"signature_name": 1, "x": ' + nested + b"}")
    with raises("'signature_name' key must be a string value") as info:
        codec.signature_name(doc)
    assert len(info.value.message) < 400
    with raises("Expecting 'instances' to be an list/array"):
        codec.decode_predict(codec.parse_json(b'{"instances": 5, "x": ' + nested + b"}"),
                             {"x": np.dtype(np.float32)})


def test_signature_name():
    assert codec.signature_name({}) == ""
    assert codec.signature_name({"signature_name": "s"}) == "s"
    with raises("must be a string"):
        codec.signature_name({"signature_name": ["s"]})


# ----------------------------------------------------------- to_tensor

@pytest.mark.parametrize(("value", "dtype", "expected"), [
    (1.5, F32, np.float32(1.5)),
    ([1, 2], F32, np.array([1, 2], np.float32)),
    ([[1, 2], [3, 4]], I32, np.array([[1, 2], [3, 4]], np.int32)),
    ([True, False], BOOL, np.array([True, False])),
    ([255, 0], U8, np.array([255, 0], np.uint8)),
    ([2**62], I64, np.array([2**62], np.int64)),
    ([], F32, np.zeros(0, np.float32)),
    ([], I32, np.zeros(0, np.int32)),
    ([[], []], F32, np.zeros((2, 0), np.float32)),
])
def test_to_tensor_values(value, dtype, expected):
    out = codec.to_tensor(value, dtype)
    assert out.dtype == dtype
    assert out.shape == np.shape(expected)
    assert np.array_equal(out, expected)


def test_to_tensor_strings_and_b64():
    out = codec.to_tensor(["a", {"b64": base64.b64encode(b"\x00\xff").decode()}], STR)
    assert out.dtype == object and out.tolist() == [b"a", b"\x00\xff"]


def test_to_tensor_b64_urlsafe_and_unpadded():
    raw = b"\xfb\xff\xfe"
    text = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    assert codec.to_tensor({"b64": text}, STR)[()] == raw


@pytest.mark.parametrize(("value", "dtype", "match"), [
    (["a"], F32, "Type: String is not of expected type: float"),
    ([None], F32, "Type: Null is not of expected type: float"),
    ([True], F32, "Type: True is not of expected type: float"),
    ([1.5], I32, "is not of expected type: int32"),
    ([2**31], I32, "is not of expected type: int32"),
    ([-1], U8, "is not of expected type: uint8"),
    ([256], U8, "is not of expected type: uint8"),
    ([1], BOOL, "is not of expected type: bool"),
    ([1], STR, "Type: Number is not of expected type: string"),
    ([{"x": 1}], STR, "not formatted correctly for base64 data"),
    ([{"b64": "***"}], STR, "Unable to base64 decode"),
    ([{"b64": "AA=="}], F32, "Type: Object is not of expected type: float"),
    ([[1, 2], [3]], F32, "Encountered list at unexpected size: 1 at level: 1 expected size: 2"),
    ([[1, 2], 3], F32, "found at incorrect level: 2 in the JSON DOM. Expected at level: 2"),
    ([1, [2]], F32, "Encountered list at unexpected level: 1 expected < 1"),
])
def test_to_tensor_errors(value, dtype, match):
    with raises(match):
        codec.to_tensor(value, dtype)


def test_to_tensor_rank_limit():
    deep: object = 1
    for _ in range(40):
        deep = [deep]
    with raises("rank"):
        codec.to_tensor(deep, F32)


# ----------------------------------------------------------- decode_predict

def test_row_single_input():
    inputs, fmt = codec.decode_predict({"instances": [[1, 2], [3, 4]]}, {"x": F32})
    assert fmt == codec.ROW and inputs["x"].shape == (2, 2)


def test_row_and_columnar_give_the_same_tensors():
    row, _ = codec.decode_predict({"instances": [{"a": [1, 2], "b": 3}, {"a": [4, 5], "b": 6}]},
                                  {"a": F32, "b": I32})
    col, fmt = codec.decode_predict({"inputs": {"a": [[1, 2], [4, 5]], "b": [3, 6]}},
                                    {"a": F32, "b": I32})
    assert fmt == codec.COLUMNAR
    for k in ("a", "b"):
        assert row[k].dtype == col[k].dtype and np.array_equal(row[k], col[k])


def test_row_named_strings_with_b64():
    inputs, _ = codec.decode_predict(
        {"instances": [{"s": ["a", "b"]}, {"s": [{"b64": "Yw=="}, "d"]}]}, {"s": STR})
    assert inputs["s"].shape == (2, 2) and inputs["s"].tolist() == [[b"a", b"b"], [b"c", b"d"]]


def test_row_b64_instances_are_values_not_named_objects():
    inputs, _ = codec.decode_predict({"instances": [{"b64": "YQ=="}, {"b64": "Yg=="}]}, {"s": STR})
    assert inputs["s"].tolist() == [b"a", b"b"]


def test_row_instances_of_different_shapes():
    with raises(r"Failed to process element: 1 of 'instances' list. Error: INVALID_ARGUMENT: "
                r"Expecting tensor size: 2 but got: 3"):
        codec.decode_predict({"instances": [["a", "b"], ["a", "b", "c"]]}, {"s": STR})
    with raises(r"Expecting shape \[2,1\] but got: \[1,2\]"):
        codec.decode_predict({"instances": [[["a"], ["b"]], [["a", "b"]]]}, {"s": STR})


def test_row_named_element_error_names_the_key():
    with raises(r"Failed to process element: 1 key: b of 'instances' list"):
        codec.decode_predict({"instances": [{"a": 1, "b": 1}, {"a": 1, "b": "x"}]},
                             {"a": F32, "b": F32})


def test_columnar_ignores_extra_keys_and_allows_different_batch_sizes():
    inputs, _ = codec.decode_predict({"inputs": {"a": [1], "b": [1, 2, 3], "zzz": 1}},
                                     {"a": F32, "b": F32})
    assert inputs["a"].shape == (1,) and inputs["b"].shape == (3,)


@pytest.mark.parametrize(("doc", "match"), [
    ({"instances": [1], "inputs": [1]}, "expecting only one of 'inputs' or 'instances'"),
    ({}, "Missing 'inputs' or 'instances' key"),
    ({"instances": {}}, "to be an list/array"),
    ({"instances": []}, "No values in 'instances' array"),
    ({"instances": [{"a": 1}]}, "keys must be equal to: a,b"),
    ({"instances": [[1]]}, "instances is a plain list"),
    ({"inputs": [1]}, "inputs is a plain value/list"),
    ({"inputs": {"a": 1}}, "Missing named input: b in 'inputs' object."),
    ({"instances": [{"a": 1, "b": 1}, 5]}, "Expecting object but got list at item 1"),
])
def test_decode_predict_errors_two_inputs(doc, match):
    with raises(match):
        codec.decode_predict(doc, {"a": F32, "b": F32})


def test_plain_list_then_object_single_input():
    with raises("Expecting value/list but got object at item 1 of input list"):
        codec.decode_predict({"instances": [1, {"x": 1}]}, {"x": F32})


# ----------------------------------------------------------- encode

def test_encode_row_single_output_omits_the_name():
    body = codec.encode_predict({"y": np.array([2.5, 3.0], np.float32)}, codec.ROW)
    assert body == b'{"predictions":[2.5,3.0]}'


def test_encode_row_multi_output_is_a_list_of_objects():
    out = {"b": np.array([[1], [2]], np.int64), "a": np.array([b"x", b"y"], dtype=object)}
    assert json.loads(codec.encode_predict(out, codec.ROW)) == {
        "predictions": [{"a": "x", "b": [1]}, {"a": "y", "b": [2]}]}


def test_encode_columnar():
    out = {"b": np.array([1, 2], np.int32), "a": np.array(1.5, np.float32)}
    assert json.loads(codec.encode_predict(out, codec.COLUMNAR)) == {"outputs": {"a": 1.5, "b": [1, 2]}}
    assert codec.encode_predict({"b": np.array([1, 2], np.int32)}, codec.COLUMNAR) == b'{"outputs":[1,2]}'


def test_encode_row_errors():
    with raises("Tensor name: a has no shape information"):
        codec.encode_predict({"a": np.array(1.0, np.float32)}, codec.ROW)
    with raises("Tensor name: b has inconsistent batch size: 3 expecting: 2"):
        codec.encode_predict({"a": np.zeros(2), "b": np.zeros(3)}, codec.ROW)
    with raises("empty tensor map"):
        codec.encode_predict({}, codec.ROW)


def test_encode_bytes_suffix_is_b64_and_other_strings_are_text():
    out = {"img_bytes": np.array([b"\x00\x01"], dtype=object), "label": np.array([b"cat"], dtype=object)}
    assert json.loads(codec.encode_predict(out, codec.COLUMNAR)) == {
        "outputs": {"img_bytes": [{"b64": "AAE="}], "label": ["cat"]}}


def test_encode_invalid_utf8_string_is_b64_not_broken_json():
    body = codec.encode_predict({"s": np.array([b"\xff"], dtype=object)}, codec.ROW)
    assert json.loads(body) == {"predictions": [{"b64": "/w=="}]}


def test_encode_nonfinite_floats():
    arr = np.array([[1.0, np.nan], [np.inf, -np.inf]], np.float32)
    assert codec.encode_predict({"y": arr}, codec.ROW) == b'{"predictions":[[1.0,NaN],[Infinity,-Infinity]]}'


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_encode_floats_round_trip_exactly(dtype):
    rng = np.random.default_rng(1)
    top = 4 if dtype is np.float16 else 30
    arr = (rng.standard_normal(1000) * 10.0 ** rng.integers(-top, top, 1000)).astype(dtype)
    back = np.array(json.loads(codec.encode_predict({"y": arr}, codec.ROW))["predictions"], dtype=dtype)
    assert np.array_equal(back, arr)


def test_encode_whole_float_keeps_decimal_point():
    assert codec.encode_predict({"y": np.array([3.0, 1e20], np.float32)}, codec.ROW) == (
        b'{"predictions":[3.0,1e+20]}')  # as TF Serving's %g writes it


def test_encode_complex_is_an_error():
    with raises("Failed to write JSON value for tensor type: complex64"):
        codec.encode_predict({"y": np.array([1j], np.complex64)}, codec.ROW)


def test_encode_bool_and_ints():
    out = {"y": np.array([True, False])}
    assert codec.encode_predict(out, codec.ROW) == b'{"predictions":[true,false]}'
    out = {"y": np.array([2**63 - 1], np.int64)}
    assert codec.encode_predict(out, codec.ROW) == b'{"predictions":[9223372036854775807]}'


# ----------------------------------------------------------- classify / regress

def test_example_features_types():
    feats = codec.example_features({"f": 1.5, "i": [1, 2], "s": "a", "b": {"b64": "AA=="}, "t": True})
    assert feats == {"f": ("float", [1.5]), "i": ("int64", [1, 2]), "s": ("bytes", [b"a"]),
                     "b": ("bytes", [b"\x00"]), "t": ("int64", [1])}


@pytest.mark.parametrize(("example", "match"), [
    ([1], "Example must be JSON object but got JSON Array"),
    ({"f": None}, "Feature: f has element with unexpected JSON type: Null"),
    ({"f": [[1]]}, "Feature: f has element with unexpected JSON type: Array"),
    ({"f": {"x": 1}}, "Feature: f has element with unexpected JSON type: Object"),
    ({"f": [1, 1.5]}, "Unexpected element type in feature: f expecting type: int64"),
    ({"f": [2**64 - 1]}, "Only int64_t is supported"),
])
def test_example_features_errors(example, match):
    with raises(match):
        codec.example_features(example)


def test_decode_examples():
    context, examples = codec.decode_examples({"context": {"c": 1}, "examples": [{"x": 1.0}]})
    assert context == {"c": ("int64", [1])} and examples == [{"x": ("float", [1.0])}]
    with raises("'examples' is expected"):
        codec.decode_examples({})
    with raises("empty array"):
        codec.decode_examples({"examples": []})


def test_encode_classify_and_regress():
    classes = np.array([[b"a", b"b"]], dtype=object)
    scores = np.array([[0.25, 0.75]], np.float32)
    assert json.loads(codec.encode_classify(classes, scores, 1)) == {"results": [[["a", 0.25], ["b", 0.75]]]}
    assert json.loads(codec.encode_classify(None, scores, 1)) == {"results": [[["", 0.25], ["", 0.75]]]}
    assert json.loads(codec.encode_classify(classes, None, 1)) == {"results": [[["a", 0.0], ["b", 0.0]]]}
    assert codec.encode_regress(np.array([[1.5], [2.0]], np.float32)) == b'{"results":[1.5,2.0]}'


@pytest.mark.parametrize(("doc", "name"), [({"instances": [1]}, "DEFAULT"),
                                           ({"signature_name": "s", "instances": [1]}, "s")])
def test_a_signature_without_inputs_is_named_as_tf_serving_names_it(doc, name):
    with pytest.raises(InvalidArgument) as info:
        codec.decode_predict(doc, {})
    assert info.value.message == f"Failed to get input map for signature: {name}"


# tensorflow_serving/util/json_tensor_test.cc, SingleUnnamedTensorErrors and
# MultipleNamedTensorErrors: each body with the substring TF Serving's test asserts.
_NAMED = {"int_tensor": I32, "str_tensor": STR}
_TF_SERVING_ERRORS = [
    (b"", {"default": I32}, "document is empty"),
    (b'{"signature_name": 5, "instances": [[1,2],[3,4],[5,6,7]]}', {"default": I32},
     "must be a string value"),
    (b'{"instances": [[1,2],[3,4],[5,6,7]], "inputs": [[1,2],[3,4],[5,6,7]]}', {"default": I32},
     "Not formatted correctly"),
    (b'{"instances": [[1,2],[3,4],[5,6,7]]}', {"default": I32}, "Expecting tensor size"),
    (b'{"instances": [[1,2],[3,4],[[5,6]]]}', {"default": I32}, "Expecting shape"),
    (b'{"instances": [1, [1]]}', {"default": I32}, "Expecting shape"),
    (b'{"instances": [[1,2],["a", "b"]]}', {"default": I32}, "not of expected type"),
    (b'{"instances": [{"int_tensor": [[1,2],[3,4],[5,6]], "str_tensor": ["foo", "bar"]},'
     b' {"int_tensor": [[[7,8],[9,0],[1,2]]], "str_tensor": ["baz", "bat"]}]}', _NAMED, "Expecting shape"),
    (b'{"instances": [{"int_tensor": [[1,2],[3,4],[5,6],[7,8]], "str_tensor": ["foo", "bar"]},'
     b' {"int_tensor": [[7,8],[9,0],[1,2]], "str_tensor": ["baz", "bat"]}]}', _NAMED,
     "Expecting tensor size"),
    (b'{"instances": [{"int_tensor": [[1,2],[3,4],[5,6]], "str_tensor": ["foo", "bar"]}, [1, 20, 30],'
     b' {"int_tensor": [[[7,8],[9,0],[1,2]]], "str_tensor": ["baz", "bat"]}]}', _NAMED,
     "Expecting object but got list"),
    (b'{"instances": [["baz", "bar"], {"str_tensor": ["baz", "bat"]}]}', {"str_tensor": STR},
     "Expecting value/list but got object"),
]


@pytest.mark.parametrize(("body", "inputs", "substring"), _TF_SERVING_ERRORS)
def test_tf_serving_json_tensor_test_errors(body, inputs, substring):
    with pytest.raises(InvalidArgument) as info:
        doc = codec.parse_json(body)
        codec.signature_name(doc)  # as the REST layer does, first
        codec.decode_predict(doc, inputs)
    assert substring in info.value.message


def test_a_malformed_body_past_the_scan_limit_gets_orjsons_words_not_a_rescan() -> None:
    """The exact (pure-Python) reader is not run on bodies past SCAN_LIMIT: their error is
    orjson's; below it, RapidJSON's words and offset."""
    body = b'{"instances": [' + b'{"a": 1.5, "b": [1,2]}, ' * (codec.SCAN_LIMIT // 20) + b'{"a" 1}]}'
    assert len(body) > codec.SCAN_LIMIT
    with pytest.raises(InvalidArgument) as refused:
        codec.parse_json(body)
    assert refused.value.message.startswith("JSON Parse error: ")
    assert "at offset" not in refused.value.message and "colon" not in refused.value.message
    small = b'{"instances": [{"a" 1}]}'
    with pytest.raises(InvalidArgument) as refused:
        codec.parse_json(small)
    assert refused.value.message.endswith("Missing a colon after a name of object member. at offset: 20")
