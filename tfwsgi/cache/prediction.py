"""The prediction cache: look up, compute each missing prediction once, store; never fail a request.

Single flight in a worker (identical concurrent misses wait for one computation), and across
workers and hosts a short memcached lease (``add``) that one request holds while it computes.
What the request asks of the cache arrives as a Policy (the transport reads it from its
protocol); what the cache did leaves as an Outcome (the transport renders it).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..settings import Settings
from . import backends
from .backends import Backend, BackendError
from .keys import digest, validate_prefix
from .values import CorruptValue, Tensors, decode_value, encode_value, signing_key

log = logging.getLogger("tfwsgi")


class Policy(enum.Enum):
    """What one request asks of the cache."""

    NORMAL = "normal"  # answer from the cache, else compute and store
    REFRESH = "refresh"  # compute, then store (HTTP ``no-cache``)
    BYPASS = "bypass"  # neither read nor write (HTTP ``no-store``)


@dataclass
class Outcome:
    """What the cache did for one request, in RFC 9211's terms (``cachecontrol`` renders it)."""

    hit: bool = False
    fwd: str = ""  # miss | request | bypass
    stored: bool = False
    collapsed: bool = False
    detail: str = ""


def parse_model_ttls(text: str) -> dict[str, int | None]:
    """``model=seconds|off,…`` → {model: ttl, or None when caching is off for it}."""
    out: dict[str, int | None] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        value = value.strip().lower()
        if not sep or not name.strip():
            raise ConfigError(f"TFWSGI_CACHE_MODEL_TTL: {part!r} is not model=seconds or model=off")
        if value == "off":
            out[name.strip()] = None
        elif value.isdigit():
            out[name.strip()] = int(value)
        else:
            raise ConfigError(f"TFWSGI_CACHE_MODEL_TTL: {part!r}: seconds must be a whole number or off")
    return out


class _Flight:
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: Tensors | None = None
        self.error: BaseException | None = None


class PredictionCache:
    """Looks predictions up, computes each missing one once, and stores it; never fails a request."""

    def __init__(self, settings: Settings, backend: Backend | None = None) -> None:
        from .. import metrics  # not at import: the metrics directory is set up first

        self._metrics = metrics
        self.enabled = settings.cache_enabled
        self.ttl = settings.cache_ttl_seconds
        self.model_ttls = parse_model_ttls(settings.cache_model_ttl)
        self.prefix = validate_prefix(settings.cache_key_prefix)
        self.max_item = settings.memcached_max_item_bytes
        self.lease_ms = settings.cache_lease_ms
        self.hmac_key = signing_key(settings)
        self.backend = backend if backend is not None else backends.from_settings(settings)
        self._flights: dict[bytes, _Flight] = {}
        self._lookups: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def _ttl_for(self, model: str) -> int | None:
        if not self.enabled:
            return None
        return self.model_ttls.get(model, self.ttl)

    def get_or_compute(self, model: str, version: int, signature: str, method: str,
                       inputs: Mapping[str, np.ndarray], compute: Callable[[], Tensors],
                       policy: Policy = Policy.NORMAL) -> tuple[Tensors, Outcome]:
        ttl = self._ttl_for(model)
        if ttl is None or policy is Policy.BYPASS:
            self._count(model, "bypass")
            return compute(), Outcome(fwd="bypass")
        key_digest = digest(model, version, signature, method, inputs)
        key = self.prefix + key_digest.hex()
        if policy is Policy.REFRESH:
            outcome = Outcome(fwd="request")
            self._count(model, "refresh")
        else:
            outcome = Outcome(fwd="miss")
            found = self._get(model, key, key_digest, outcome)
            if found is not None:
                return found, outcome

        # Single flight in this worker: one computes, the others wait for its answer.
        with self._lock:
            flight = self._flights.get(key_digest)
            leader = flight is None
            if leader:
                flight = self._flights[key_digest] = _Flight()
        assert flight is not None
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise flight.error
            assert flight.result is not None
            self._count(model, "collapsed")
            outcome.collapsed = True
            return flight.result, outcome
        try:
            result = self._compute_once(model, key, key_digest, ttl, compute, outcome, policy)
            flight.result = result
            return result, outcome
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                self._flights.pop(key_digest, None)
            flight.done.set()

    def _compute_once(self, model: str, key: str, key_digest: bytes, ttl: int,
                      compute: Callable[[], Tensors], outcome: Outcome, policy: Policy) -> Tensors:
        """Across workers and hosts: take a short lease (memcached ``add``) or wait for its holder."""
        lease_key = key + ":lease"
        leased = False
        if self.lease_ms > 0 and self.backend.shared and policy is Policy.NORMAL and not outcome.detail:
            try:
                # memcached counts expiry in whole seconds from its own clock tick, so a TTL
                # of 1 may end at once: keep the lease a second longer than anyone waits on it.
                leased = self.backend.add(lease_key, b"1", -(-self.lease_ms // 1000) + 1)
            except BackendError:
                leased = True  # no cache to coordinate through: just compute
            if not leased:
                found = self._wait_for_holder(model, key, lease_key, key_digest)
                if found is not None:
                    self._count(model, "collapsed")
                    outcome.collapsed = True
                    return found
        result = compute()
        self._store(model, key, key_digest, result, ttl, outcome)
        if leased:
            with contextlib.suppress(BackendError):
                self.backend.delete(lease_key)
        return result

    def _wait_for_holder(self, model: str, key: str, lease_key: str, key_digest: bytes) -> Tensors | None:
        """Another request holds the lease: poll for its answer while its lease is visible.

        A failing server answers every get and add with a default (a miss, "not added"), so
        the lease itself must be seen; if it is not, or goes without an answer, compute."""
        deadline = time.monotonic() + self.lease_ms / 1000.0
        while time.monotonic() < deadline:
            probe = Outcome()
            found = self._get(model, key, key_digest, probe, count_miss=False)
            if found is not None or probe.detail:
                return found
            try:
                if self.backend.get(lease_key) is None:  # released (or never seen): last look
                    return self._get(model, key, key_digest, Outcome(), count_miss=False)
            except BackendError:
                return None
            time.sleep(0.005)
        return None

    def _get(self, model: str, key: str, key_digest: bytes, outcome: Outcome,
             count_miss: bool = True) -> Tensors | None:
        try:
            data = self.backend.get(key)
        except BackendError as exc:
            log.warning("tfwsgi: cache get failed (serving without cache): %s", exc)
            outcome.detail = "cache-error"
            self._count(model, "error")
            return None
        if data is None:
            if count_miss:
                self._count(model, "miss")
            return None
        try:
            found = decode_value(data, key_digest, self.hmac_key)
        except CorruptValue as exc:
            log.warning("tfwsgi: cache value under %s rejected (%s): recomputing", key, exc)
            outcome.detail = "corrupt-value"
            self._count(model, "corrupt")
            return None
        outcome.hit = True
        self._count(model, "hit")
        return found

    def _store(self, model: str, key: str, key_digest: bytes, result: Tensors, ttl: int,
               outcome: Outcome) -> None:
        if outcome.detail == "cache-error":
            return  # it just failed: do not wait for it twice
        try:
            value = encode_value(key_digest, result, self.hmac_key)
        except CorruptValue:
            self._metrics.CACHE_STORES.labels(model, "uncacheable").inc()
            return
        if len(value) + len(key) > self.max_item:
            self._metrics.CACHE_STORES.labels(model, "too_large").inc()
            outcome.detail = outcome.detail or "too-large"
            return
        try:
            self.backend.set(key, value, ttl)
        except BackendError as exc:
            log.warning("tfwsgi: cache set failed: %s", exc)
            self._metrics.CACHE_STORES.labels(model, "error").inc()
            outcome.detail = outcome.detail or "cache-error"
            return
        self._metrics.CACHE_STORES.labels(model, "stored").inc()
        outcome.stored = True

    def _count(self, model: str, result: str) -> None:
        child = self._lookups.get((model, result))
        if child is None:
            child = self._lookups[(model, result)] = self._metrics.CACHE_LOOKUPS.labels(model, result)
        child.inc()
