"""Dense numeric predict bodies, decoded by simdjson straight into numpy.

Most predict bodies are one dense array of numbers (``{"instances": [[0.1, …], …]}``). orjson
makes a Python float of every number and numpy then walks those lists twice (its type discovery,
then the copy): 2.1 ms for a 32×784 body, more than the model takes. simdjson parses the text into
its tape and copies the numbers out as doubles without a Python object per number: 0.5 ms.

This path takes only bodies it can prove are such an array, and decodes them exactly as the
general path (``codec``) would. Anything else — an object per instance, b64, strings, booleans,
NaN, ragged or mixed-depth lists, invalid JSON — gives None and goes the general way, which
words every error as TF Serving does.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import simdjson

from .codec import _MAX_RANK, COLUMNAR, ROW

# simdjson parsers are not thread-safe and keep the buffers of the largest body they parsed
# (about 1.2 bytes per body byte), so a worker has a fixed few, made when first needed, and a
# thread that finds them all busy waits for one (a parse takes well under a millisecond) rather
# than making more: memory stays bounded however many request threads parse at once.
_POOL_SIZE = 2
_pool: queue.SimpleQueue[simdjson.Parser] = queue.SimpleQueue()
_made = 0
_making = threading.Lock()

# Below this innermost dimension the general path is as fast, and checking the shape here (one
# step per list) costs more than it saves.
MIN_INNER = 16
_MAX_LISTS = 1 << 16
_EXACT = float(2**53)


@dataclass
class Dense:
    """A predict body holding one dense array of numbers, as float64."""

    signature_name: str
    fmt: str  # codec.ROW ("instances") or codec.COLUMNAR ("inputs")
    array: np.ndarray

    def inputs(self, signature_inputs: Mapping[str, np.dtype]) -> dict[str, np.ndarray] | None:
        """The decoded inputs for a signature with one floating-point input, else None (then the
        general path decides: several inputs want objects; integers must not be rounded)."""
        if not decodes(signature_inputs):
            return None
        ((name, dtype),) = signature_inputs.items()
        if dtype.itemsize >= 4:  # |x| < 2**53 (parse): within float32's range, nothing overflows
            return {name: self.array.astype(dtype, copy=False)}
        with np.errstate(over="ignore"):  # past the type's range: ±inf, as TF Serving's cast gives
            return {name: self.array.astype(dtype, copy=False)}


def decodes(signature_inputs: Mapping[str, np.dtype]) -> bool:
    """Whether this path can decode inputs for the signature: exactly one, floating-point."""
    return len(signature_inputs) == 1 and next(iter(signature_inputs.values())).kind == "f"


def parse(body: bytes) -> Dense | None:
    """The body as a Dense array, or None when only the general path can decode it."""
    parser = _take()
    try:
        return _parse(parser, body)
    finally:
        _pool.put(parser)


def _take() -> simdjson.Parser:
    global _made
    try:
        return _pool.get_nowait()
    except queue.Empty:
        pass
    with _making:
        if _made < _POOL_SIZE:
            _made += 1
            return simdjson.Parser()
    return _pool.get()


def _parse(parser: simdjson.Parser, body: bytes) -> Dense | None:
    # Every simdjson proxy made here dies with this frame: the parser refuses to parse again
    # while one lives.
    try:
        doc = parser.parse(body)
    except Exception:  # invalid, too deep, numbers simdjson will not read (1e400): the general
        return None    # path says what is wrong, in TF Serving's words
    if not isinstance(doc, simdjson.Object):
        return None
    keys = list(doc.keys())
    if len(keys) != len(set(keys)):
        return None  # duplicate keys: orjson keeps the last one; let it
    signature_name = doc["signature_name"] if "signature_name" in keys else ""
    # A "[" in it would upset the count of lists below.
    if not isinstance(signature_name, str) or "[" in signature_name:
        return None
    rest = [k for k in keys if k != "signature_name"]
    if len(rest) != 1 or rest[0] not in ("instances", "inputs"):
        return None
    array = doc[rest[0]]
    if not isinstance(array, simdjson.Array):
        return None
    shape = _shape(array)
    if shape is None or not _rectangular(array, shape, body):
        return None
    try:
        flat = np.frombuffer(array.as_buffer(of_type="d"), dtype=np.float64)
    except (TypeError, ValueError):  # a string, boolean, null or object among the numbers
        return None
    if flat.size != math.prod(shape):
        return None
    # Integers past 2**53 are not exact as doubles; the general path converts them from int64.
    if flat.size and (float(flat.max()) >= _EXACT or float(flat.min()) <= -_EXACT):
        return None
    return Dense(signature_name, ROW if rest[0] == "instances" else COLUMNAR, flat.reshape(shape))


def _shape(value: object) -> list[int] | None:
    """The shape along the first element of every level, or None if it is not one this path takes."""
    shape: list[int] = []
    while isinstance(value, simdjson.Array):
        n = len(value)
        if n == 0 or len(shape) == _MAX_RANK:
            return None
        shape.append(n)
        value = value[0]
    if not shape or shape[-1] < MIN_INNER:
        return None
    return shape


def _rectangular(array: simdjson.Array, shape: list[int], body: bytes) -> bool:
    """Every list has its level's length, and there are no other lists (say ``[1, [2]]`` among
    the numbers, which simdjson's flattening copy would not tell from ``[1, 2]``)."""
    lists = sum(math.prod(shape[:depth]) for depth in range(len(shape)))
    if lists > _MAX_LISTS:
        return False
    # The body's keys are known and its one string has no "[": every "[" opens a list.
    if body.count(b"[") != lists:
        return False
    level: list[object] = [array]
    for depth, n in enumerate(shape):
        below: list[object] = []
        for lst in level:
            if not isinstance(lst, simdjson.Array) or len(lst) != n:
                return False
            if depth + 1 < len(shape):
                below.extend(lst)
        level = below
    return True
