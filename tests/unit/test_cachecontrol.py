"""tfwsgi.cachecontrol: Cache-Control → Policy, Outcome → Cache-Status."""

from __future__ import annotations

import pytest

from tfwsgi.cache import Outcome, Policy
from tfwsgi.cachecontrol import cache_status, request_policy


@pytest.mark.parametrize(("header", "policy"), [
    (None, Policy.NORMAL), ("", Policy.NORMAL), ("max-age=60", Policy.NORMAL),
    ("no-cache", Policy.REFRESH), ("No-Cache, max-age=5", Policy.REFRESH), ("max-age=0", Policy.REFRESH),
    ("no-store", Policy.BYPASS), ("no-cache, no-store", Policy.BYPASS),
])
def test_request_policy(header, policy):
    assert request_policy(header) is policy


def test_cache_status():
    assert cache_status(Outcome(hit=True)) == "tfwsgi; hit"
    assert cache_status(Outcome(fwd="miss", stored=True)) == "tfwsgi; fwd=miss; stored"
    assert cache_status(Outcome(fwd="miss", detail="cache-error")) == "tfwsgi; fwd=miss; detail=cache-error"
    assert cache_status(Outcome(fwd="miss", collapsed=True)) == "tfwsgi; fwd=miss; collapsed"
