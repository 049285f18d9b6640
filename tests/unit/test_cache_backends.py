"""tfwsgi.cache.backends: the LRU, the memcached server list, and the classes Memcached injects."""

from __future__ import annotations

import time
from collections import Counter

import pytest
from pymemcache.client.rendezvous import RendezvousHash

from tfwsgi.cache import backends
from tfwsgi.errors import ConfigError
from tfwsgi.settings import from_env


def test_lru_is_bounded_in_bytes_and_evicts_least_recent():
    lru = backends.LocalLRU(max_bytes=300)
    for i in range(3):
        lru.set(f"k{i}", b"x" * 90, 0)
    lru.get("k0")  # k0 is now the most recent
    lru.set("k3", b"x" * 90, 0)
    assert lru.get("k1") is None and lru.get("k0") is not None and lru.get("k3") is not None
    assert lru._bytes <= 300
    lru.set("huge", b"x" * 1000, 0)
    assert lru.get("huge") is None


def test_lru_expiry_and_add():
    lru = backends.LocalLRU(1000)
    lru.set("k", b"v", 1)
    assert lru.get("k") == b"v"
    assert not lru.add("k", b"w", 1)
    lru._items["k"] = (b"v", time.monotonic() - 1)
    assert lru.get("k") is None
    assert lru.add("k", b"w", 0) and lru.get("k") == b"w"


def test_parse_servers():
    assert backends.parse_servers("127.0.0.1:11211, mc2:11212,[::1]:11213") == [
        ("127.0.0.1", 11211), ("mc2", 11212), ("::1", 11213)]
    for bad in ("", "host", "host:port", "h:70000"):
        with pytest.raises(ConfigError):
            backends.parse_servers(bad)


def test_rendezvous_hasher_spreads_keys_as_pymemcache_would_with_its_hash():
    nodes = ["a:1", "b:2", "c:3"]
    ours = backends.RendezvousHasher(list(nodes))
    reference = RendezvousHash(list(nodes), hash_function=backends._blake2b_32)
    picks = [ours.get_node(f"tfwsgi:{i:064x}") for i in range(300)]
    assert picks == [reference.get_node(f"tfwsgi:{i:064x}") for i in range(300)]
    assert min(Counter(picks).values()) > 60  # every node takes a fair share
    assert backends.RendezvousHasher(["only:1"]).get_node("anything") == "only:1"


def test_memcached_takes_its_hasher_and_client_classes():
    """The classes are injected, as pymemcache's HashClient takes them; nothing connects yet."""
    made = []

    class Recorded(backends.PerThreadClient):
        def __init__(self, server, **kwargs):
            made.append(server)
            super().__init__(server, **kwargs)

    mc = backends.Memcached([("127.0.0.1", 1), ("127.0.0.1", 2)], connect_timeout=0.1, timeout=0.1,
                            retry_attempts=2, retry_timeout=1, dead_timeout=5, client_class=Recorded)
    assert made == [("127.0.0.1", 1), ("127.0.0.1", 2)]
    assert isinstance(mc._client.hasher, backends.RendezvousHasher)
    default = backends.from_settings(from_env({"TFWSGI_MEMCACHED": "127.0.0.1:1"}))
    assert isinstance(default, backends.Memcached)
    assert all(isinstance(c, backends.PerThreadClient) for c in default._client.clients.values())
    assert isinstance(backends.from_settings(from_env({})), backends.LocalLRU)
