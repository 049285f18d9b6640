"""Cached values: output tensors in a small versioned binary format (never pickle).

A value carries its key's digest. A value that does not parse, or belongs to another key, raises
CorruptValue: the cache counts it, recomputes and overwrites it.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Mapping

import numpy as np

Tensors = dict[str, np.ndarray]

_MAGIC = b"TFWC"
_FORMAT = 1
_HEAD = struct.Struct("<4sB32sI")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_NUMERIC_KINDS = "biuf"


@functools.lru_cache(maxsize=64)
def _dtype(spec: bytes) -> np.dtype:
    return np.dtype(spec.decode("ascii"))


class CorruptValue(ValueError):
    """A cached value that is not ours, is damaged, or belongs to another key."""


def encode_value(key_digest: bytes, outputs: Mapping[str, np.ndarray]) -> bytes:
    """Output tensors as bytes: magic, format, digest, then each tensor's name, dtype, shape, data."""
    parts = [_HEAD.pack(_MAGIC, _FORMAT, key_digest, len(outputs))]
    for name in sorted(outputs):
        arr = np.asarray(outputs[name])
        kind = arr.dtype.kind
        if kind not in _NUMERIC_KINDS and kind != "O":
            raise CorruptValue(f"cannot cache dtype {arr.dtype}")
        name_b = name.encode("utf-8")
        dtype_b = arr.dtype.str.encode("ascii")
        parts.append(struct.pack("<H", len(name_b)) + name_b)
        parts.append(struct.pack("<B", len(dtype_b)) + dtype_b)
        parts.append(struct.pack(f"<B{arr.ndim}Q", arr.ndim, *arr.shape))
        if kind == "O":
            for item in arr.reshape(-1):
                b = item if isinstance(item, bytes) else str(item).encode("utf-8")
                parts.append(struct.pack("<I", len(b)) + b)
        else:
            data = np.ascontiguousarray(arr).tobytes()
            parts.append(struct.pack("<Q", len(data)) + data)
    return b"".join(parts)


def decode_value(data: bytes, key_digest: bytes) -> Tensors:
    """The tensors in a cached value, or CorruptValue if it is not exactly what this key stored."""
    end, fmt = len(data), _FORMAT
    try:
        out, pos = _parse(data, end, key_digest, fmt)
    except CorruptValue:
        raise
    except (struct.error, IndexError, UnicodeDecodeError, TypeError, ValueError) as exc:
        raise CorruptValue(str(exc) or type(exc).__name__) from None
    if pos != end:
        raise CorruptValue("trailing bytes")
    return out


def _parse(data: bytes, end: int, key_digest: bytes, fmt: int) -> tuple[Tensors, int]:
    """The tensors in ``data[:end]``, and where they stop."""
    magic, stored_fmt, stored, count = _HEAD.unpack_from(data, 0)
    if magic != _MAGIC or stored_fmt != fmt:
        raise CorruptValue("not a tfwsgi value")
    if stored != key_digest:
        raise CorruptValue("digest does not match the key")
    pos = _HEAD.size
    out: Tensors = {}
    for _ in range(count):
        (n,) = _U16.unpack_from(data, pos)
        name = data[pos + 2:pos + 2 + n].decode("utf-8")
        pos += 2 + n
        n = data[pos]
        dtype = _dtype(data[pos + 1:pos + 1 + n])
        pos += 1 + n
        if dtype.kind not in _NUMERIC_KINDS and dtype.kind != "O":
            raise CorruptValue(f"unexpected dtype {dtype}")
        ndim = data[pos]
        shape = struct.unpack_from(f"<{ndim}Q", data, pos + 1)
        pos += 1 + 8 * ndim
        size = 1
        for dim in shape:
            size *= dim
        if dtype.kind == "O":
            items = []
            for _ in range(size):
                (n,) = _U32.unpack_from(data, pos)
                if pos + 4 + n > end:
                    raise CorruptValue("truncated value")
                items.append(data[pos + 4:pos + 4 + n])
                pos += 4 + n
            arr = np.empty(size, dtype=object)
            arr[:] = items
            out[name] = arr.reshape(shape)
        else:
            (nbytes,) = _U64.unpack_from(data, pos)
            pos += 8
            if nbytes != size * dtype.itemsize or pos + nbytes > end:
                raise CorruptValue("data length does not match shape")
            out[name] = np.frombuffer(data, dtype=dtype, count=size, offset=pos).reshape(shape)
            pos += nbytes
    return out, pos
