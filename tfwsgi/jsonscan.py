"""JSON read as TF Serving reads a request body: RapidJSON 1.1.0's iterative reader, with its
error messages and offsets. Pure; used only when orjson refuses a body.

TF Serving (``tensorflow_serving/util/json_tensor.cc``, ``ParseJson``) parses with
``kParseIterativeFlag | kParseNanAndInfFlag | kParseStopWhenDoneFlag`` from an
``EncodedInputStream<UTF8<>, MemoryStream>`` (RapidJSON v1.1.0, ``tensorflow_serving/workspace.bzl``)
and answers a failure with ``"JSON Parse error: " + GetParseError_En(code) + " at offset: " + offset``.
What those flags mean here, followed from ``include/rapidjson/reader.h`` at v1.1.0:

- ``kParseIterativeFlag``: the state machine of ``GenericReader::IterativeParse`` (its ``Predict``
  table, ``Transit`` and ``HandleError``), which fixes which message a bad token gets;
- ``kParseNanAndInfFlag``: ``NaN``, ``Inf``, ``Infinity``, with or without ``-``, are numbers;
- ``kParseStopWhenDoneFlag``: reading stops after the root value; what follows is ignored;
- no ``kParseFullPrecisionFlag``: only the values differ (RapidJSON may be a unit in the last place
  off), never whether a number is accepted; values here are Python's correctly rounded ones;
- no ``kParseValidateEncodingFlag``: RapidJSON copies bytes that are not UTF-8 into the string.
  Python strings cannot hold them, so tfwsgi refuses such a body with the message RapidJSON gives
  when it does validate ("Invalid encoding in string.") — a deliberate difference;
- the stream stops at a NUL byte (``MemoryStream::Peek`` gives ``'\\0'`` at the end, and so does a
  NUL in the body) and skips a leading UTF-8 byte order mark (its three bytes one by one);
- the iterative reader has no depth limit; tfwsgi keeps orjson's (1024 levels) for both paths
  and words it in the same form — another deliberate difference.
"""

from __future__ import annotations

import math
import re
from typing import Any

import orjson

MAX_DEPTH = 1024  # orjson's limit: the success path and this one accept the same documents

# include/rapidjson/error/en.h (v1.1.0), GetParseError_En
DOCUMENT_EMPTY = "The document is empty."
VALUE_INVALID = "Invalid value."
OBJECT_MISS_NAME = "Missing a name for object member."
OBJECT_MISS_COLON = "Missing a colon after a name of object member."
OBJECT_MISS_COMMA = "Missing a comma or '}' after an object member."
ARRAY_MISS_COMMA = "Missing a comma or ']' after an array element."
STRING_INVALID_HEX = "Incorrect hex digit after \\u escape in string."
STRING_SURROGATE = "The surrogate pair in string is invalid."
STRING_ESCAPE = "Invalid escape character in string."
STRING_MISS_QUOTE = "Missing a closing quotation mark in string."
STRING_ENCODING = "Invalid encoding in string."
NUMBER_TOO_BIG = "Number too big to be stored in double."
NUMBER_MISS_FRACTION = "Miss fraction part in number."
NUMBER_MISS_EXPONENT = "Miss exponent in number."
TOO_DEEP = f"The document is nested deeper than {MAX_DEPTH} levels."  # tfwsgi's, not RapidJSON's


class ParseError(ValueError):
    """RapidJSON's message and byte offset for a body it cannot read."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"{message} at offset: {offset}")
        self.message = message
        self.offset = offset


# IterativeParsingState (reader.h)
(START, FINISH, ERROR, OBJ_INIT, MEMBER_KEY, KV_DELIM, MEMBER_VALUE, MEMBER_DELIM, OBJ_FINISH,
 ARR_INIT, ELEMENT, ELEM_DELIM, ARR_FINISH, VALUE) = range(14)
# Token (reader.h): anything that is not one of these bytes is a NumberToken.
LB, RB, LC, RC, COMMA, COLON, STRING, FALSE, TRUE, NULL, NUMBER = range(11)
_TOKENS = [NUMBER] * 256
for _c, _t in zip(b'[]{},:"ftn', (LB, RB, LC, RC, COMMA, COLON, STRING, FALSE, TRUE, NULL),
                  strict=True):
    _TOKENS[_c] = _t
_SCALAR = (STRING, FALSE, TRUE, NULL, NUMBER)
# Predict's table G: state × token → state; every pair not listed goes to ERROR.
_G: dict[int, dict[int, int]] = {
    START: {LB: ARR_INIT, LC: OBJ_INIT, **{t: VALUE for t in _SCALAR}},
    OBJ_INIT: {RC: OBJ_FINISH, STRING: MEMBER_KEY},
    MEMBER_KEY: {COLON: KV_DELIM},
    KV_DELIM: {LB: ARR_INIT, LC: OBJ_INIT, **{t: MEMBER_VALUE for t in _SCALAR}},
    MEMBER_VALUE: {RC: OBJ_FINISH, COMMA: MEMBER_DELIM},
    MEMBER_DELIM: {RC: OBJ_FINISH, STRING: MEMBER_KEY},
    ARR_INIT: {LB: ARR_INIT, RB: ARR_FINISH, LC: OBJ_INIT, **{t: ELEMENT for t in _SCALAR}},
    ELEMENT: {RB: ARR_FINISH, COMMA: ELEM_DELIM},
    ELEM_DELIM: {LB: ARR_INIT, RB: ARR_FINISH, LC: OBJ_INIT, **{t: ELEMENT for t in _SCALAR}},
}
# HandleError: the message for a token the state does not take (or the end of the input).
_HANDLE_ERROR = {
    START: DOCUMENT_EMPTY,
    OBJ_INIT: OBJECT_MISS_NAME, MEMBER_DELIM: OBJECT_MISS_NAME,
    MEMBER_KEY: OBJECT_MISS_COLON,
    MEMBER_VALUE: OBJECT_MISS_COMMA,
    KV_DELIM: VALUE_INVALID, ARR_INIT: VALUE_INVALID, ELEM_DELIM: VALUE_INVALID,
    ELEMENT: ARRAY_MISS_COMMA,
}

_WS = re.compile(rb"[ \t\n\r]*")
_PLAIN = re.compile(rb'[^"\\\x00-\x1f]*')  # what ParseStringToStream copies as it is
# Numbers whose acceptance cannot depend on RapidJSON's size checks (at most 18 integer digits,
# a two-digit exponent); anything longer or odd goes through _number, byte by byte.
_SHORT_NUMBER = re.compile(rb"-?(?:0|[1-9][0-9]{0,17})(\.[0-9]+)?([eE][+-]?[0-9]{1,2})?")
_NUMBER_TAIL = frozenset(b"0123456789.eE+-")
# A run of elements of an array, each such a number or a flat list of them, each
# followed by a comma: read at once by orjson (the same values), as a long malformed array would
# otherwise take seconds here. Nothing in it can be an error for RapidJSON.
_W = rb"[ \t\n\r]*"
_NUM = rb"-?(?:0|[1-9][0-9]{0,17})(?:\.[0-9]+)?(?:[eE][+-]?[0-9]{1,2})?(?![0-9.eE+-])"


def _list_of(item: bytes) -> bytes:
    return rb"\[" + _W + rb"(?:" + item + _W + rb"," + _W + rb")*" + item + _W + rb"\]"


_RUN = re.compile(rb"(?:(?:" + _NUM + rb"|" + _list_of(_NUM) + rb")" + _W + rb"," + _W + rb")+")
_RUN_START = frozenset(b"-0123456789[")
_ESCAPES = {ord('"'): '"', ord("\\"): "\\", ord("/"): "/", ord("b"): "\b", ord("f"): "\f",
            ord("n"): "\n", ord("r"): "\r", ord("t"): "\t"}
_HEX = frozenset(b"0123456789abcdefABCDEF")
_DIGITS = frozenset(b"0123456789")


class _Reader:
    def __init__(self, body: bytes) -> None:
        self.b = body
        self.n = len(body)

    def peek(self, i: int) -> int:
        return self.b[i] if i < self.n else 0

    def consume(self, i: int, text: bytes) -> tuple[bool, int]:
        """``Consume(is, c) && Consume(is, c2) && …``: how far it got, and whether all matched."""
        for c in text:
            if self.peek(i) != c:
                return False, i
            i += 1
        return True, i

    # -- ParseNull / ParseTrue / ParseFalse / ParseString / ParseNumber ------------------------

    def value(self, i: int) -> tuple[Any, int]:
        c = self.peek(i)
        if c == 0x6E:  # n
            return self.literal(i, b"null", None)
        if c == 0x74:  # t
            return self.literal(i, b"true", True)
        if c == 0x66:  # f
            return self.literal(i, b"false", False)
        if c == 0x22:  # "
            return self.string(i)
        return self.number(i)

    def literal(self, i: int, text: bytes, value: Any) -> tuple[Any, int]:
        ok, i = self.consume(i + 1, text[1:])
        if not ok:
            raise ParseError(VALUE_INVALID, i)
        return value, i

    def string(self, i: int) -> tuple[str, int]:
        i += 1
        end = _PLAIN.match(self.b, i).end()  # type: ignore[union-attr]
        if self.peek(end) == 0x22:  # no escapes: the common case
            return self.utf8(i, end), end + 1
        parts: list[str] = []
        while True:
            end = _PLAIN.match(self.b, i).end()  # type: ignore[union-attr]
            parts.append(self.utf8(i, end))
            i = end
            c = self.peek(i)
            if c == 0x5C:  # backslash
                escape = i
                e = self.peek(i + 1)
                if e in _ESCAPES:
                    parts.append(_ESCAPES[e])
                    i += 2
                elif e == 0x75:  # u
                    code, i = self.hex4(i + 2, escape)
                    if 0xD800 <= code <= 0xDBFF:
                        ok, i = self.consume(i, b"\\u")
                        if not ok:
                            raise ParseError(STRING_SURROGATE, escape)
                        low, i = self.hex4(i, escape)
                        if not 0xDC00 <= low <= 0xDFFF:
                            raise ParseError(STRING_SURROGATE, escape)
                        code = (((code - 0xD800) << 10) | (low - 0xDC00)) + 0x10000
                    # A lone low surrogate is written as its three UTF-8 bytes, as RapidJSON does
                    # (codec encodes strings with "surrogatepass").
                    parts.append(chr(code))
                else:
                    raise ParseError(STRING_ESCAPE, escape)
            elif c == 0x22:
                return "".join(parts), i + 1
            elif c == 0:
                raise ParseError(STRING_MISS_QUOTE, i)
            else:  # a control character
                raise ParseError(STRING_ESCAPE, i)

    def utf8(self, start: int, end: int) -> str:
        try:
            return self.b[start:end].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ParseError(STRING_ENCODING, start + exc.start) from None

    def hex4(self, i: int, escape: int) -> tuple[int, int]:
        digits = self.b[i:i + 4]
        if len(digits) == 4 and all(c in _HEX for c in digits):
            return int(digits, 16), i + 4
        raise ParseError(STRING_INVALID_HEX, escape)

    def number(self, i: int) -> tuple[Any, int]:
        m = _SHORT_NUMBER.match(self.b, i)
        if m is not None and self.peek(m.end()) not in _NUMBER_TAIL:
            text = m.group()
            return (float(text) if m.group(1) or m.group(2) else int(text)), m.end()
        return self.long_number(i)

    def long_number(self, i: int) -> tuple[Any, int]:
        """ParseNumber (reader.h, v1.1.0) step by step: where it stops and why."""
        start = i
        digit = self.peek
        minus = digit(i) == 0x2D
        if minus:
            i += 1
        c = digit(i)
        small = big = significant = 0
        use64 = use_double = nan_or_inf = False
        d = 0.0
        after_special = i
        if c == 0x30:
            i += 1
        elif 0x31 <= c <= 0x39:
            small = c - 0x30
            i += 1
            limit, last = (214748364, 0x38) if minus else (429496729, 0x35)
            while digit(i) in _DIGITS:
                if small >= limit and (small != limit or digit(i) > last):
                    big, use64 = small, True
                    break
                small = small * 10 + digit(i) - 0x30
                i += 1
                significant += 1
        elif c in (0x49, 0x4E):  # I, N
            nan_or_inf = True
            ok, i = self.consume(i, b"NaN")
            if ok:
                d = math.nan
            else:
                ok, i = self.consume(i, b"Inf")
                if not ok:
                    raise ParseError(VALUE_INVALID, i)
                d = -math.inf if minus else math.inf
                if digit(i) == 0x69:  # i
                    ok, i = self.consume(i, b"inity")
                    if not ok:
                        raise ParseError(VALUE_INVALID, i)
            after_special = i
        else:
            raise ParseError(VALUE_INVALID, i)

        if use64:
            limit, last = (0x0CCCCCCCCCCCCCCC, 0x38) if minus else (0x1999999999999999, 0x35)
            while digit(i) in _DIGITS:
                if big >= limit and (big != limit or digit(i) > last):
                    d, use_double = float(big), True
                    break
                big = big * 10 + digit(i) - 0x30
                i += 1
                significant += 1
        if use_double:
            while digit(i) in _DIGITS:
                if d >= 1.7976931348623157e307:  # DBL_MAX / 10
                    raise ParseError(NUMBER_TOO_BIG, start)
                d = d * 10 + (digit(i) - 0x30)
                i += 1

        exp_frac = 0
        if digit(i) == 0x2E:  # .
            i += 1
            if digit(i) not in _DIGITS:
                raise ParseError(NUMBER_MISS_FRACTION, i)
            if not use_double:
                if not use64:
                    big = small
                while digit(i) in _DIGITS:
                    if big > 0x1FFFFFFFFFFFFF:  # 2^53 - 1
                        break
                    big = big * 10 + digit(i) - 0x30
                    i += 1
                    exp_frac -= 1
                    if big != 0:
                        significant += 1
                d, use_double = float(big), True
            while digit(i) in _DIGITS:
                if significant < 17:
                    d = d * 10.0 + (digit(i) - 0x30)
                    exp_frac -= 1
                    if d > 0.0:
                        significant += 1
                i += 1

        if digit(i) in (0x65, 0x45):  # e, E
            i += 1
            use_double = True
            exp_minus = digit(i) == 0x2D
            if digit(i) in (0x2B, 0x2D):
                i += 1
            if digit(i) not in _DIGITS:
                raise ParseError(NUMBER_MISS_EXPONENT, i)
            exp = digit(i) - 0x30
            i += 1
            max_exp = 308 - exp_frac
            while digit(i) in _DIGITS:
                exp = exp * 10 + digit(i) - 0x30
                i += 1
                if not exp_minus and exp > max_exp:
                    raise ParseError(NUMBER_TOO_BIG, start)

        if nan_or_inf and not use_double:
            return d, i
        if nan_or_inf:  # "NaN.5", "Inf1e2": RapidJSON starts the significand again from 0
            return float(("-0" if minus else "0") + self.b[after_special:i].decode()), i
        text = self.b[start:i]
        if use_double:
            return float(text), i
        return int(text), i


def parse(body: bytes) -> Any:
    """The body's root value as RapidJSON reads it with TF Serving's flags, or ParseError."""
    r = _Reader(body)
    i = 0  # EncodedInputStream<UTF8<>, MemoryStream> skips EF, BB, BF, each if it is next
    for bom in b"\xef\xbb\xbf":
        if r.peek(i) == bom:
            i += 1
    # The containers being read, each with the state to return to and, for an object, its key.
    stack: list[tuple[int, Any, str | None]] = []
    root: Any = None
    state = START
    i = _WS.match(body, i).end()  # type: ignore[union-attr]
    while r.peek(i) != 0:
        src = state
        dst = _G.get(src, {}).get(_TOKENS[r.peek(i)], ERROR)
        done = False
        value: Any = None
        if dst == ERROR:
            raise ParseError(_HANDLE_ERROR[src], i)
        if dst in (OBJ_INIT, ARR_INIT):
            back = (ELEMENT if src in (ARR_INIT, ELEM_DELIM)
                    else MEMBER_VALUE if src == KV_DELIM else src)
            if len(stack) >= MAX_DEPTH:
                raise ParseError(TOO_DEEP, i)
            stack.append((back, {} if dst == OBJ_INIT else [], None))
            state = dst
            i += 1
        elif dst == MEMBER_KEY:
            name, i = r.string(i)
            back, container, _ = stack[-1]
            stack[-1] = (back, container, name)
            state = dst
        elif dst in (KV_DELIM, MEMBER_DELIM, ELEM_DELIM):
            state = dst
            i += 1
        elif dst in (MEMBER_VALUE, ELEMENT, VALUE):
            value, i = r.value(i)
            state = FINISH if dst == VALUE else dst
            done = True
        else:  # OBJ_FINISH, ARR_FINISH
            if src == MEMBER_DELIM:
                raise ParseError(OBJECT_MISS_NAME, i)
            if src == ELEM_DELIM:
                raise ParseError(VALUE_INVALID, i)
            back, value, _ = stack.pop()
            state = FINISH if back == START else back
            done = True
            i += 1
        if done:
            if stack:
                _, container, key = stack[-1]
                if isinstance(container, list):
                    container.append(value)
                else:
                    container[key] = value
            else:
                root = value
        if state == FINISH:  # kParseStopWhenDoneFlag: what follows the root is not read
            return root
        i = _WS.match(body, i).end()  # type: ignore[union-attr]
        if state in (ARR_INIT, ELEM_DELIM) and r.peek(i) in _RUN_START:
            run = _RUN.match(body, i)
            if run is not None:
                stack[-1][1].extend(orjson.loads(b"[" + run.group().rstrip(b" \t\n\r")[:-1] + b"]"))
                state = ELEM_DELIM
                i = run.end()
    raise ParseError(_HANDLE_ERROR[state], i)
