"""The session bindings one replica has seen, for degraded mode (proxy.gateway): while the shared store is
unreachable, a session keeps the node the store last bound it to."""

from __future__ import annotations

import collections
import time
from collections.abc import Callable


class BindingCache:
    """The session bindings one replica has seen, (pool, session) -> node id, for degraded mode: at most
    `size` (the least recently routed dropped first), each forgotten `ttl_s` after its session was last
    routed (the session TTL, as in the store). Memory: about 200 bytes an entry, 2 MB at 10 000."""

    def __init__(self, size: int, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.size = size
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: collections.OrderedDict[tuple[str, str], tuple[str, float]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, pool: str, session: str) -> str | None:
        entry = self._entries.get((pool, session))
        if entry is None:
            return None
        if entry[1] <= self._clock():
            del self._entries[(pool, session)]
            return None
        return entry[0]

    def put(self, pool: str, session: str, node_id: str) -> None:
        key = (pool, session)
        self._entries.pop(key, None)
        self._entries[key] = (node_id, self._clock() + self.ttl_s)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
