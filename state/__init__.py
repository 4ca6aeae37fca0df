"""Routing knowledge: the routing policy, prompt-prefix hashing, and the shared store.

`open_store(url)` picks the backend by URL: `memory://` (one process) or `redis://`, `rediss://`,
`unix://` (every replica shares one Redis), `redis+sentinel://`, `rediss+sentinel://` (every replica
shares the primary a set of Redis Sentinels names). `state.redis_url` documents the forms.
"""

from __future__ import annotations

from typing import Any

from state.redis_url import check_store_url, scheme
from state.store import Store
from state.types import DEFAULT_KEY_PREFIX, RoutingLimits

__all__ = ["Store", "open_store"]


def open_store(url: str, *, prefix: str = DEFAULT_KEY_PREFIX, **limits: Any) -> Store:
    """A store for `url`; `limits` are fields of `state.types.RoutingLimits` (unknown names raise TypeError).

    Nothing connects yet: a Redis that cannot be reached shows as `StateUnavailable` on first use.
    """
    settings = RoutingLimits(key_prefix=prefix, **limits)
    check_store_url(url)  # ValueError: an unknown scheme, a malformed Sentinel URL, Redis Cluster
    if scheme(url) == "memory":
        from state.memory import MemoryStore

        return MemoryStore(settings)
    from state.redis_store import RedisStore

    return RedisStore.from_url(url, settings)
