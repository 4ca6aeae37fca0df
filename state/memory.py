"""`MemoryStore`: the store of a single process (the default without Redis).

Same behaviour as `RedisStore` (one contract test suite checks both). Every operation runs without
awaiting, so each one is atomic among the coroutines of the event loop. Memory is bounded: the model
of each node's cache (state.cache_model) holds at most its capacity in entries and
`max_blocks_per_node` blocks, and expired bindings, leases and idle node models are dropped as they
are met and by a sweep at most once a minute.
"""

from __future__ import annotations

import collections
import secrets
import time
from collections.abc import Callable, Mapping, Sequence

import msgspec

from state import keys
from state.cache_model import CacheCounters, CacheReport, NodeCache
from state.health import NodeHealth
from state.inflight import (
    GenerationBoard,
    GenerationRead,
    RequestProgress,
    Ticket,
    decode_progress,
    encode_progress,
    oldest_first,
)
from state.policy import NodeLoad, choose_node
from state.types import (
    Decision,
    Lease,
    NodeStats,
    NodeView,
    Outcome,
    RouteRequest,
    RoutingLimits,
    SessionBinding,
    Strategy,
    median,
)

SWEEP_INTERVAL_MS = 60_000


def _monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class _Stats:
    __slots__ = ("cached_tokens", "cancelled", "error_classes", "errors", "ok", "prompt_tokens", "totals", "ttfts")

    def __init__(self, samples: int) -> None:
        self.ok = 0
        self.errors = 0
        self.cancelled = 0
        self.error_classes: dict[str, int] = {}
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.ttfts: collections.deque[float] = collections.deque(maxlen=samples)
        self.totals: collections.deque[float] = collections.deque(maxlen=samples)

    def view(self) -> NodeStats:
        return NodeStats(
            ok=self.ok,
            errors=self.errors,
            cancelled=self.cancelled,
            error_classes=dict(self.error_classes),
            ttft_p50_ms=median(self.ttfts),
            total_p50_ms=median(self.totals),
            prompt_tokens=self.prompt_tokens,
            cached_tokens=self.cached_tokens,
        )


class MemoryStore:
    """Routing knowledge of one process. `clock` returns milliseconds (monotonic by default)."""

    def __init__(self, limits: RoutingLimits | None = None, *, clock: Callable[[], int] = _monotonic_ms) -> None:
        self.limits = limits or RoutingLimits()
        self._clock = clock
        self._bindings: dict[tuple[str, str], tuple[str, int]] = {}
        """(pool, session) -> (node id, expiry ms)"""
        self._node_sessions: dict[str, dict[tuple[str, str], int]] = {}
        """node id -> (pool, session) -> binding expiry ms"""
        self._leases: dict[str, dict[str, int]] = {}
        """node id -> lease id -> expiry ms"""
        self._caches: dict[str, NodeCache] = {}
        """node id -> the router's model of its prompt cache"""
        self._rr: dict[str, int] = {}
        self._stats: dict[str, _Stats] = {}
        self._health: dict[str, NodeHealth] = {}
        self._probes: dict[str, tuple[str, int]] = {}
        self._registry: dict[str, bytes] = {}
        self._epoch: str | None = None
        self._slots: dict[str, dict[str, int]] = {}
        """team key name -> lease id -> expiry ms"""
        self._requests: dict[str, dict[str, str]] = {}
        """node id -> lease id -> progress record (state.inflight.encode_progress)"""
        self._generations = GenerationBoard()
        self._last_sweep = clock()

    # -- the hot path --------------------------------------------------------------------------

    async def route(self, request: RouteRequest) -> Decision:
        now = self._clock()
        self._maybe_sweep(now)
        blocks = request.blocks[: self.limits.max_request_blocks]
        active_after = now + request.session_ttl_ms - self.limits.session_active_ms
        loads: dict[str, NodeLoad] = {}
        for c in request.candidates:
            cache = self._live_cache(c.node_id, now)
            loads[c.node_id] = NodeLoad(
                self._live_leases(c.node_id, now),
                self._live_sessions(c.node_id, now, active_after),
                cache.matched(blocks) if cache is not None else 0,
                cache.effective_capacity(c.cache_slots) if cache is not None else 0,
            )

        binding: str | None = None
        key = (request.pool, request.session or "")
        if request.session and request.strategy is Strategy.CACHE_AWARE:
            entry = self._bindings.get(key)
            if entry is not None and entry[1] > now:
                binding = entry[0]
        turn = 0
        if request.strategy is Strategy.ROUND_ROBIN:
            turn = self._rr.get(request.pool, 0)
            self._rr[request.pool] = turn + 1

        if len(blocks) != len(request.blocks):
            request = msgspec.structs.replace(request, blocks=blocks)
        choice = choose_node(request, loads, binding, turn=turn)
        node = choice.node_id
        if choice.bind:
            if binding is not None and binding != node:
                self._node_sessions.get(binding, {}).pop(key, None)
            expiry = now + request.session_ttl_ms
            self._bindings[key] = (node, expiry)
            self._node_sessions.setdefault(node, {})[key] = expiry
        lease_id = request.lease_id or secrets.token_hex(8)
        self._leases.setdefault(node, {})[lease_id] = now + request.lease_ttl_ms
        cache = self._cache(node)
        predicted = cache.confirmed_match(blocks) if blocks else 0
        tick = cache.predict(blocks, now, self.limits.max_blocks_per_node) if blocks else 0
        return Decision(
            node_id=node,
            reason=choice.reason,
            matched_blocks=choice.matched_blocks,
            total_blocks=len(request.blocks),
            lease=Lease(node, lease_id),
            bound=choice.bind,
            cache_tick=tick,
            predicted_blocks=predicted,
        )

    async def finish(self, lease: Lease, outcome: Outcome) -> None:
        self._leases.get(lease.node_id, {}).pop(lease.lease_id, None)
        self._requests.get(lease.node_id, {}).pop(lease.lease_id, None)
        stats = self._stats.get(lease.node_id)
        if stats is None:
            stats = self._stats[lease.node_id] = _Stats(self.limits.latency_samples)
        if outcome.ok:
            stats.ok += 1
            stats.ttfts.appendleft(float(outcome.ttft_ms))
            stats.totals.appendleft(float(outcome.total_ms))
        else:
            error_class = outcome.error_class or "unknown"
            stats.error_classes[error_class] = stats.error_classes.get(error_class, 0) + 1
            if error_class == keys.CLIENT_CANCEL:
                stats.cancelled += 1
            else:
                stats.errors += 1
        stats.prompt_tokens += outcome.prompt_tokens
        stats.cached_tokens += outcome.cached_tokens
        if outcome.report is not None:
            self._learn(lease.node_id, outcome.ok, outcome.report)

    def _learn(self, node_id: str, ok: bool, report: CacheReport) -> None:
        limits = self.limits
        if len(report.blocks) > limits.max_request_blocks:
            report = msgspec.structs.replace(report, blocks=report.blocks[: limits.max_request_blocks])
        if ok and report.reported and report.prompt_tokens > 0:
            self._cache(node_id).report(report, self._clock(), limits.block_size, limits.max_blocks_per_node)
        elif not ok and node_id in self._caches:
            self._caches[node_id].drop_pending(report.blocks)

    async def renew(self, leases: Sequence[Lease], ttl_ms: int) -> None:
        expiry = self._clock() + ttl_ms
        for lease in leases:
            held = self._leases.get(lease.node_id)
            if held is not None and lease.lease_id in held:
                held[lease.lease_id] = expiry

    async def acquire_slot(
        self, key_name: str, lease_id: str, limit: int, ttl_ms: int, release: Sequence[str] = ()
    ) -> bool:
        now = self._clock()
        held = self._slots.setdefault(key_name, {})
        for expired in [lease for lease, expiry in held.items() if expiry <= now]:
            del held[expired]
        for given_back in release:
            held.pop(given_back, None)
        if lease_id not in held and len(held) >= limit:
            return False
        held[lease_id] = now + ttl_ms
        return True

    async def release_slot(self, key_name: str, lease_id: str) -> None:
        held = self._slots.get(key_name)
        if held is not None:
            held.pop(lease_id, None)
            if not held:
                del self._slots[key_name]

    async def release(self, leases: Sequence[Lease], slots: Sequence[tuple[str, str]] = ()) -> None:
        for lease in leases:
            self._leases.get(lease.node_id, {}).pop(lease.lease_id, None)
        for slot in slots:
            await self.release_slot(*slot)

    async def renew_slots(self, slots: Sequence[tuple[str, str]], ttl_ms: int) -> None:
        expiry = self._clock() + ttl_ms
        for key_name, lease_id in slots:
            held = self._slots.get(key_name)
            if held is not None and lease_id in held:
                held[lease_id] = expiry

    # -- what is in flight (state.inflight) ---------------------------------------------------

    async def progress(self, updates: Sequence[tuple[Lease, RequestProgress]]) -> None:
        now = self._clock()
        for lease, p in updates:
            if self._leases.get(lease.node_id, {}).get(lease.lease_id, now) > now:
                self._requests.setdefault(lease.node_id, {})[lease.lease_id] = encode_progress(p, now - p.age_ms)

    async def open_generation(self, key: str, owner: str, waiter: str, ttl_ms: int) -> Ticket:
        return self._generations.open(key, owner, waiter, ttl_ms, self._clock())

    async def tick_generation(
        self, key: str, owner: str, ttl_ms: int, grace_ms: int, events: Sequence[str] = (), end: str | None = None
    ) -> int:
        return self._generations.tick(key, owner, ttl_ms, events, end, grace_ms, self._clock())

    async def read_generation(self, key: str, waiter: str, after: int, ttl_ms: int) -> GenerationRead:
        return self._generations.read(key, waiter, after, ttl_ms, self._clock())

    async def leave_generation(self, key: str, waiter: str) -> None:
        self._generations.leave(key, waiter)

    def _live_requests(self, node_id: str, now: int) -> tuple[RequestProgress, ...]:
        """The progress records of the node's live leases (the others are dropped)."""
        records = self._requests.get(node_id)
        if not records:
            return ()
        leases = self._leases.get(node_id, {})
        for lease_id in [lease for lease in records if leases.get(lease, now) <= now]:
            del records[lease_id]
        return oldest_first(decode_progress(lease, value, now) for lease, value in records.items())

    # -- maintenance ---------------------------------------------------------------------------

    async def forget_prefix(self, node_id: str, blocks: Sequence[str]) -> None:
        cache = self._caches.get(node_id)
        if cache is not None:
            cache.forget(blocks)

    async def unbind(self, pool: str, session: str) -> None:
        entry = self._bindings.pop((pool, session), None)
        if entry is not None:
            self._node_sessions.get(entry[0], {}).pop((pool, session), None)

    async def remove_node(self, node_id: str) -> None:
        for key in self._node_sessions.pop(node_id, {}):
            entry = self._bindings.get(key)
            if entry is not None and entry[0] == node_id:
                del self._bindings[key]
        self._caches.pop(node_id, None)
        self._leases.pop(node_id, None)
        self._stats.pop(node_id, None)
        self._health.pop(node_id, None)
        self._requests.pop(node_id, None)

    async def health(self) -> dict[str, NodeHealth]:
        return dict(self._health)

    async def cas_health(self, node_id: str, health: NodeHealth) -> bool:
        current = self._health.get(node_id)
        if (current.version if current is not None else 0) != health.version:
            return False
        self._health[node_id] = msgspec.structs.replace(health, version=health.version + 1)
        return True

    async def claim_probe(self, node_id: str, owner: str, ttl_ms: int) -> bool:
        now = self._clock()
        holder = self._probes.get(node_id)
        if holder is not None and holder[1] > now and holder[0] != owner:
            return False
        if holder is None or holder[1] <= now:
            self._probes[node_id] = (owner, now + max(1, ttl_ms))
        return True

    async def registry(self) -> dict[str, bytes]:
        return dict(self._registry)

    async def register_node(self, node_id: str, data: bytes) -> None:
        self._registry[node_id] = data

    async def restore_registry(self, entries: Mapping[str, bytes]) -> None:
        for node_id, data in entries.items():
            self._registry.setdefault(node_id, data)

    async def epoch(self, candidate: str) -> str:
        if self._epoch is None:
            self._epoch = candidate
        return self._epoch

    async def node_views(self, node_ids: Sequence[str]) -> list[NodeView]:
        now = self._clock()
        active_after = now + self.limits.session_ttl_ms - self.limits.session_active_ms
        views = []
        for node_id in node_ids:
            stats = self._stats.get(node_id)
            cache = self._caches.get(node_id)
            views.append(
                NodeView(
                    node_id=node_id,
                    inflight=self._live_leases(node_id, now),
                    sessions=self._live_sessions(node_id, now, active_after),
                    stats=stats.view() if stats is not None else NodeStats(),
                    cache=cache.counters() if cache is not None else CacheCounters(),
                    requests=self._live_requests(node_id, now),
                )
            )
        return views

    async def sessions(self, limit: int = 1000) -> list[SessionBinding]:
        now = self._clock()
        live = [
            SessionBinding(pool=pool, session=session, node_id=node, ttl_ms=expiry - now)
            for (pool, session), (node, expiry) in self._bindings.items()
            if expiry > now
        ]
        return live[:limit]

    async def ping(self) -> None:
        return None

    async def check(self) -> None:
        return None

    async def close(self) -> None:
        return None

    # -- internals -----------------------------------------------------------------------------

    def _live_leases(self, node_id: str, now: int) -> int:
        held = self._leases.get(node_id)
        if not held:
            return 0
        for lease_id in [lease for lease, expiry in held.items() if expiry <= now]:
            del held[lease_id]
        return len(held)

    def _live_sessions(self, node_id: str, now: int, active_after: int | None = None) -> int:
        """Live bindings to the node; with `active_after`, only those whose expiry is later (a recent turn)."""
        bound = self._node_sessions.get(node_id)
        if not bound:
            return 0
        for key in [key for key, expiry in bound.items() if expiry <= now]:
            del bound[key]
            entry = self._bindings.get(key)
            if entry is not None and entry[0] == node_id and entry[1] <= now:
                del self._bindings[key]
        if active_after is None:
            return len(bound)
        return sum(1 for expiry in bound.values() if expiry > active_after)

    def _live_cache(self, node_id: str, now: int) -> NodeCache | None:
        """The node's cache model, unless it lapsed (no routing or report for the prefix TTL)."""
        cache = self._caches.get(node_id)
        if cache is not None and cache.touched <= now - self.limits.prefix_ttl_ms:
            del self._caches[node_id]
            return None
        return cache

    def _cache(self, node_id: str) -> NodeCache:
        cache = self._caches.get(node_id)
        if cache is None:
            cache = self._caches[node_id] = NodeCache()
        return cache

    def _maybe_sweep(self, now: int) -> None:
        """Drop everything expired, including what belongs to nodes no longer routed to."""
        if now - self._last_sweep < SWEEP_INTERVAL_MS:
            return
        self._last_sweep = now
        for node_id in list(self._leases):
            if not self._live_leases(node_id, now):
                del self._leases[node_id]
        for node_id in list(self._node_sessions):
            if not self._live_sessions(node_id, now):
                del self._node_sessions[node_id]
        for key in [key for key, (_, expiry) in self._bindings.items() if expiry <= now]:
            del self._bindings[key]
        for node_id, cache in list(self._caches.items()):
            if cache.touched <= now - self.limits.prefix_ttl_ms:
                del self._caches[node_id]
        for node_id in list(self._requests):
            if not self._live_requests(node_id, now):
                del self._requests[node_id]
        self._generations.sweep(now)
