"""The prediction cache: memcached shared by every worker and host (or an in-worker LRU), failing open.

``keys`` names a prediction (a SHA-256 digest), ``values`` writes and checks the stored bytes
(optionally signed), ``backends`` holds them (LocalLRU, Memcached) and ``prediction`` is the cache
(single flight, lease). It knows no HTTP: ``tfwsgi.cachecontrol`` maps headers to a Policy and an
Outcome to ``Cache-Status``.
"""

from __future__ import annotations

from .backends import Backend, BackendError, LocalLRU, Memcached, parse_servers
from .keys import digest, validate_prefix
from .prediction import Outcome, Policy, PredictionCache, parse_model_ttls
from .values import CorruptValue, Tensors, decode_value, encode_value, signing_key

__all__ = [
    "Backend", "BackendError", "CorruptValue", "LocalLRU", "Memcached", "Outcome", "Policy",
    "PredictionCache", "Tensors", "decode_value", "digest", "encode_value", "parse_model_ttls",
    "parse_servers", "signing_key", "validate_prefix",
]
