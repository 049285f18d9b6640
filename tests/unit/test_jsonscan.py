"""RapidJSON's error messages and offsets, as TF Serving words a malformed body.

The (text, message, offset) rows are RapidJSON v1.1.0's own, from test/unittest/readertest.cpp
(the test named in each comment); rows that expect kParseErrorDocumentRootNotSingular there are
accepted here, as TF Serving parses with kParseStopWhenDoneFlag.
"""

from __future__ import annotations

import math

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tfwsgi import codec, jsonscan
from tfwsgi.errors import InvalidArgument

E = jsonscan
ERRORS = [
    # IterativeParsing_ErrorHandling (kParseIterativeFlag, TF Serving's reader)
    (b'{"a": a}', E.VALUE_INVALID, 6),
    (b"", E.DOCUMENT_EMPTY, 0),
    (b"{1}", E.OBJECT_MISS_NAME, 1),
    (b'{"a", 1}', E.OBJECT_MISS_COLON, 4),
    (b'{"a"}', E.OBJECT_MISS_COLON, 4),
    (b'{"a": 1', E.OBJECT_MISS_COMMA, 7),
    (b"[1 2 3]", E.ARRAY_MISS_COMMA, 3),
    (b'{"a: 1', E.STRING_MISS_QUOTE, 6),
    (b'{"a":}', E.VALUE_INVALID, 5),
    (b'{"a":]', E.VALUE_INVALID, 5),
    (b"[1,2,}", E.VALUE_INVALID, 5),
    (b"[}]", E.VALUE_INVALID, 1),
    (b"[,]", E.VALUE_INVALID, 1),
    (b"[1,,]", E.VALUE_INVALID, 3),
    (b'{"a": 1,}', E.OBJECT_MISS_NAME, 8),
    (b"[1,2,3,]", E.VALUE_INVALID, 7),
    (b'"ab', E.STRING_MISS_QUOTE, 3),
    (b"truE", E.VALUE_INVALID, 3),
    (b"False", E.VALUE_INVALID, 0),
    (b"nulL", E.VALUE_INVALID, 3),
    # ParseDocument_Error
    (b" ", E.DOCUMENT_EMPTY, 1),
    (b" \n", E.DOCUMENT_EMPTY, 2),
    # ParseValue_Error
    (b"falsE", E.VALUE_INVALID, 4),
    (b"a]", E.VALUE_INVALID, 0),
    (b".1", E.VALUE_INVALID, 0),
    # ParseObject_Error
    (b"{:1}", E.OBJECT_MISS_NAME, 1),
    (b"{null:1}", E.OBJECT_MISS_NAME, 1),
    (b"{true:1}", E.OBJECT_MISS_NAME, 1),
    (b"{false:1}", E.OBJECT_MISS_NAME, 1),
    (b"{1:1}", E.OBJECT_MISS_NAME, 1),
    (b"{[]:1}", E.OBJECT_MISS_NAME, 1),
    (b"{{}:1}", E.OBJECT_MISS_NAME, 1),
    (b"{xyz:1}", E.OBJECT_MISS_NAME, 1),
    (b'{"a" 1}', E.OBJECT_MISS_COLON, 5),
    (b'{"a",1}', E.OBJECT_MISS_COLON, 4),
    (b'{"a":1]', E.OBJECT_MISS_COMMA, 6),
    (b'{"a":1,}', E.OBJECT_MISS_NAME, 7),
    # ParseArray_Error
    (b"[1", E.ARRAY_MISS_COMMA, 2),
    (b"[1}", E.ARRAY_MISS_COMMA, 2),
    (b"[1 2]", E.ARRAY_MISS_COMMA, 3),
    (b"[1,]", E.VALUE_INVALID, 3),
    # ParseNumber_Error
    (b"1" + b"0" * 309, E.NUMBER_TOO_BIG, 0),
    (b"1e309", E.NUMBER_TOO_BIG, 0),
    (b"1.", E.NUMBER_MISS_FRACTION, 2),
    (b"1.a", E.NUMBER_MISS_FRACTION, 2),
    (b"1e", E.NUMBER_MISS_EXPONENT, 2),
    (b"1e_", E.NUMBER_MISS_EXPONENT, 2),
    # ParseString_Error
    (b'["\\a"]', E.STRING_ESCAPE, 2),
    (b'["\\uABCG"]', E.STRING_INVALID_HEX, 2),
    (b'["\\uaaa"]', E.STRING_INVALID_HEX, 2),
    (b'["\\uD800\\uFFF"]', E.STRING_INVALID_HEX, 2),
    (b'["\\uD800X"]', E.STRING_SURROGATE, 2),
    (b'["\\uD800\\uFFFF"]', E.STRING_SURROGATE, 2),
    (b'["Test]', E.STRING_MISS_QUOTE, 7),
    # ParseNanAndInfinity (kParseNanAndInfFlag)
    (b"nan", E.VALUE_INVALID, 1),
    (b"-nan", E.VALUE_INVALID, 1),
    (b"NAN", E.VALUE_INVALID, 1),
    (b"-Infinty", E.VALUE_INVALID, 6),
]

# Read off reader.h (v1.1.0) for what the rows above leave out: TF Serving's kind of body.
MORE_ERRORS = [
    (b'{"instances": [1.0,', E.VALUE_INVALID, 19),
    (b'{"instances": [1.0 2.0]}', E.ARRAY_MISS_COMMA, 19),
    (b"instances = [1, 2]", E.VALUE_INVALID, 0),  # TF Serving's http_rest_api_handler_test
    (b'{"instances": [1e400]}', E.NUMBER_TOO_BIG, 15),
    (b'{"instances": [-1e400]}', E.NUMBER_TOO_BIG, 15),
    (b"0e309", E.NUMBER_TOO_BIG, 0),  # the exponent alone decides (maxExp = 308 - fraction digits)
    (b'"\\x"', E.STRING_ESCAPE, 1),
    (b'"\\', E.STRING_ESCAPE, 1),
    (b'"a\tb"', E.STRING_ESCAPE, 2),  # a raw control character
    (b'"a\x00b"', E.STRING_MISS_QUOTE, 2),  # a NUL ends the stream
    (b"[1\x00]", E.ARRAY_MISS_COMMA, 2),
    (b"-", E.VALUE_INVALID, 1),
    (b"-x", E.VALUE_INVALID, 1),
    (b"Na", E.VALUE_INVALID, 2),
    (b"Infinit", E.VALUE_INVALID, 7),
    (b"\xef\xbb\xbf[1,]", E.VALUE_INVALID, 6),  # the byte order mark counts in the offset
    (b'{"a": "\xff"}', E.STRING_ENCODING, 7),  # tfwsgi's: RapidJSON would copy the byte
    (b'{"a": "ok\xe0A"}', E.STRING_ENCODING, 9),
    (b"[" * 1025, E.TOO_DEEP, 1024),  # tfwsgi's (orjson's) limit
]


@pytest.mark.parametrize(("body", "message", "offset"), ERRORS + MORE_ERRORS,
                         ids=[repr(r[0][:24]) for r in ERRORS + MORE_ERRORS])
def test_rapidjson_message_and_offset(body, message, offset):
    with pytest.raises(jsonscan.ParseError) as info:
        jsonscan.parse(body)
    assert (info.value.message, info.value.offset) == (message, offset)
    assert str(info.value) == f"{message} at offset: {offset}"


# orjson reads these, so the success path does too: a documented difference (codec's docstring).
ORJSON_READS = {b"0e309"}
PARSE_JSON_ERRORS = [r for r in ERRORS + MORE_ERRORS if r[0] and r[0] not in ORJSON_READS]


@pytest.mark.parametrize(("body", "message", "offset"), PARSE_JSON_ERRORS,
                         ids=[repr(r[0][:24]) for r in PARSE_JSON_ERRORS])
def test_parse_json_words_it_as_tf_serving(body, message, offset):
    """json_tensor.cc: StrCat("JSON Parse error: ", GetParseError_En(code), " at offset: ", offset)."""
    with pytest.raises(InvalidArgument) as info:
        codec.parse_json(body)
    assert info.value.message == f"JSON Parse error: {message} at offset: {offset}"


@pytest.mark.parametrize(("body", "value"), [
    # kParseStopWhenDoneFlag: readertest's RootNotSingular rows read their first value.
    (b"{}{}", {}), (b"[] 0", []), (b"null []", None), (b"0 {}", 0), (b"1a", 1),
    (b"true, false", True), (b'{"a": [1]} trailing', {"a": [1]}),
    # kParseNanAndInfFlag (ParseNanAndInfinity)
    (b"-Inf", -math.inf), (b"Inf", math.inf), (b"Infinity", math.inf), (b"-Infinity", -math.inf),
    # the stream skips a byte order mark
    (b"\xef\xbb\xbf{}", {}),
    # numbers past 64 bits are doubles; a lone low surrogate is kept (written as 3 UTF-8 bytes)
    (b"18446744073709551616", 18446744073709551616.0), (b"-9223372036854775809", -9223372036854775809.0),
    (b"18446744073709551615", 18446744073709551615), (b"-9223372036854775808", -(2**63)),
    (b'"\\udc00"', "\udc00"), (b'"\\ud83d\\ude00"', "\U0001F600"),
    (b"1" + b"0" * 308, 1e308), (b"10e308", math.inf),
])
def test_what_rapidjson_accepts(body, value):
    assert jsonscan.parse(body) == value


def test_nan_variants():
    for body in (b"NaN", b"-NaN"):
        assert math.isnan(jsonscan.parse(body))


def test_tf_serving_accepts_what_orjson_refuses():
    assert codec.parse_json(b'{"inputs": [Inf, -Inf, 1]} x')["inputs"] == [math.inf, -math.inf, 1]
    assert codec.parse_json(b'\xef\xbb\xbf{"inputs": [1]}') == {"inputs": [1]}


@pytest.mark.parametrize(("body", "message"), [
    # A body with NaN goes to Python's parser first; where it reads more than RapidJSON, RapidJSON decides.
    (b'{"inputs": [NaN, "\\ud800"]}', "The surrogate pair in string is invalid. at offset: 18"),
    (b'{"inputs": [NaN, 1e400]}', "Number too big to be stored in double. at offset: 17"),
    (b'{"inputs": [NaN, 1' + b"0" * 309 + b"]}", "Number too big to be stored in double. at offset: 17"),
    (b'{"inputs": [NaN, Nan]}', "Invalid value. at offset: 19"),
])
def test_nan_bodies_are_still_read_as_rapidjson_reads_them(body, message):
    with pytest.raises(InvalidArgument) as info:
        codec.parse_json(body)
    assert info.value.message == f"JSON Parse error: {message}"


def test_nan_bodies_keep_big_integers_as_rapidjson_does():
    doc = codec.parse_json(b'{"inputs": [NaN, 18446744073709551616, 18446744073709551615]}')
    assert doc["inputs"][1:] == [18446744073709551616.0, 18446744073709551615]
    assert isinstance(doc["inputs"][1], float) and isinstance(doc["inputs"][2], int)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda children: (st.lists(children, max_size=4)
                      | st.dictionaries(st.text(max_size=4), children, max_size=4)),
    max_leaves=30)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=4), JSON, max_size=4))
def test_reads_what_orjson_reads(doc):
    body = orjson.dumps(doc)
    assert jsonscan.parse(body) == orjson.loads(body)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=4), JSON, min_size=1, max_size=4), st.data())
def test_a_cut_document_is_an_error_at_or_before_the_cut(doc, data):
    body = orjson.dumps(doc)
    cut = data.draw(st.integers(0, len(body) - 1))
    with pytest.raises(jsonscan.ParseError) as info:
        jsonscan.parse(body[:cut])
    assert info.value.offset <= cut


def test_orjson_reads_a_zero_with_a_huge_exponent():
    """The one kind of body found where orjson (the success path) reads what RapidJSON refuses."""
    assert codec.parse_json(b'{"inputs": [0e309]}') == {"inputs": [0.0]}
