"""Routing knowledge: the routing policy, prompt-prefix hashing, and the shared store.

`open_store(url)` picks the backend by URL: `memory://` (one process) or `redis://`, `rediss://`,
`unix://` (every replica shares one Redis).
"""

from __future__ import annotations

from typing import Any

from state.store import Store
from state.types import DEFAULT_KEY_PREFIX, RoutingLimits

__all__ = ["Store", "open_store"]


def open_store(url: str, *, prefix: str = DEFAULT_KEY_PREFIX, **limits: Any) -> Store:
    """A store for `url`; `limits` are fields of `state.types.RoutingLimits` (unknown names raise TypeError).

    Nothing connects yet: a Redis that cannot be reached shows as `StateUnavailable` on first use.
    """
    settings = RoutingLimits(key_prefix=prefix, **limits)
    scheme = url.partition("://")[0].lower()
    if scheme == "memory":
        from state.memory import MemoryStore

        return MemoryStore(settings)
    if scheme in ("redis", "rediss", "unix"):
        from state.redis_store import RedisStore

        return RedisStore.from_url(url, settings)
    raise ValueError(f"unsupported store URL {url!r}: use memory://, redis://, rediss:// or unix://")
