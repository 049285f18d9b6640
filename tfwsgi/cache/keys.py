"""Cache keys: the SHA-256 digest that names one prediction, and the deployment's key prefix.

The digest covers model name, *resolved* version, signature, method and the decoded input
tensors (name, dtype, shape, bytes; sorted by name), so row and columnar requests for the same
tensors share an entry and a new version can never be answered from an old one.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping

import numpy as np

from ..errors import ConfigError

_KEY_DOMAIN = b"tfwsgi-prediction-cache-v1\x00"


def digest(model: str, version: int, signature: str, method: str, inputs: Mapping[str, np.ndarray],
           output_filter: str = "") -> bytes:
    """The 32-byte SHA-256 that names one prediction. Every field is framed by its length, so no
    two different requests can run together into the same bytes."""
    head = [t.encode("utf-8") for t in (model, str(version), signature, method, output_filter)]
    parts: list[bytes] = [_KEY_DOMAIN, struct.pack("<5Q", *map(len, head)), *head]
    for name in sorted(inputs):
        arr = inputs[name]
        name_b, dtype_b = name.encode("utf-8"), arr.dtype.str.encode("ascii")
        if arr.dtype.kind == "O":
            items = [x if isinstance(x, bytes) else str(x).encode("utf-8") for x in arr.reshape(-1)]
            data = struct.pack(f"<{len(items)}Q", *map(len, items)) + b"".join(items)
        else:
            data = arr.tobytes()  # C order, whatever the layout
        parts += [struct.pack(f"<4Q{arr.ndim}Q", len(name_b), len(dtype_b), arr.ndim, len(data), *arr.shape),
                  name_b, dtype_b, data]
    return hashlib.sha256(b"".join(parts)).digest()


def validate_prefix(prefix: str) -> str:
    """The key prefix, if memcached can take it: 150 printable characters at most, no spaces."""
    if len(prefix) > 150 or any(c.isspace() or ord(c) < 33 or ord(c) == 127 for c in prefix):
        raise ConfigError(
            "TFWSGI_CACHE_KEY_PREFIX must be at most 150 printable characters without spaces")
    return prefix
