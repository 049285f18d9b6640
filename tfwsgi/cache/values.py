"""Cached values: output tensors in a small versioned binary format (never pickle), optionally signed.

A value carries its key's digest; with a signing key (``TFWSGI_CACHE_HMAC_KEY`` or ``…_FILE``)
it also ends in an HMAC-SHA256 over that digest and every byte before it, checked before
anything is parsed. A value that does not parse, belongs to another key or lacks a valid
signature raises CorruptValue: the cache counts it, recomputes and overwrites it.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import struct
from collections.abc import Mapping

import numpy as np

from ..errors import ConfigError
from ..settings import Settings

Tensors = dict[str, np.ndarray]

_MAGIC = b"TFWC"
_FORMAT = 1  # unsigned
_SIGNED_FORMAT = 2  # the same, then the HMAC
_MAC_SIZE = 32
_HEAD = struct.Struct("<4sB32sI")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_NUMERIC_KINDS = "biuf"


@functools.lru_cache(maxsize=64)
def _dtype(spec: bytes) -> np.dtype:
    return np.dtype(spec.decode("ascii"))


class CorruptValue(ValueError):
    """A cached value that is not ours, is damaged, belongs to another key or is not signed by us."""


def _mac(hmac_key: bytes, key_digest: bytes, body: bytes | memoryview) -> bytes:
    mac = hmac.new(hmac_key, key_digest, hashlib.sha256)
    mac.update(body)
    return mac.digest()


def encode_value(key_digest: bytes, outputs: Mapping[str, np.ndarray],
                 hmac_key: bytes | None = None) -> bytes:
    """Output tensors as bytes: magic, format, digest, then each tensor's name, dtype, shape, data;
    with ``hmac_key``, then the HMAC of the digest and all of that."""
    fmt = _FORMAT if hmac_key is None else _SIGNED_FORMAT
    parts = [_HEAD.pack(_MAGIC, fmt, key_digest, len(outputs))]
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
    body = b"".join(parts)
    return body if hmac_key is None else body + _mac(hmac_key, key_digest, body)


def decode_value(data: bytes, key_digest: bytes, hmac_key: bytes | None = None) -> Tensors:
    """The tensors in a cached value, or CorruptValue if it is not exactly what this key stored
    (with ``hmac_key``: signed with that key, which is checked first)."""
    end, fmt = len(data), _FORMAT
    if hmac_key is not None:
        end, fmt = len(data) - _MAC_SIZE, _SIGNED_FORMAT
        if end < _HEAD.size or not hmac.compare_digest(
                _mac(hmac_key, key_digest, memoryview(data)[:end]), data[end:]):
            raise CorruptValue("signature does not match: not written with this server's key")
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


def signing_key(settings: Settings) -> bytes | None:
    """The secret that signs cached values: ``TFWSGI_CACHE_HMAC_KEY_FILE``'s contents (surrounding
    white space dropped) or ``TFWSGI_CACHE_HMAC_KEY``; both set must agree. None: unsigned."""
    from_env = settings.cache_hmac_key.encode("utf-8") or None
    path = settings.cache_hmac_key_file
    if not path:
        return from_env
    try:
        with open(path, "rb") as f:
            from_file = f.read().strip()
    except OSError as exc:
        raise ConfigError(f"TFWSGI_CACHE_HMAC_KEY_FILE: cannot read {path}: {exc}") from None
    if not from_file:
        raise ConfigError(f"TFWSGI_CACHE_HMAC_KEY_FILE: {path} is empty")
    if from_env is not None and not hmac.compare_digest(from_env, from_file):
        raise ConfigError("TFWSGI_CACHE_HMAC_KEY and TFWSGI_CACHE_HMAC_KEY_FILE are both set and "
                          "differ: set one (the file keeps the secret out of the environment)")
    return from_file
