"""Plain data that crosses the store boundary: node specs, routing requests and decisions.

Pure: no I/O. These structs are what the policy reads and what both store backends return.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Annotated

import msgspec

from state.cache_model import CacheCounters, CacheReport
from state.inflight import RequestProgress

DEFAULT_SESSION_TTL_MS = 1_800_000
DEFAULT_LEASE_TTL_MS = 60_000
DEFAULT_PREFIX_TTL_MS = 3_600_000
DEFAULT_BLOCK_SIZE = 1024
DEFAULT_KEY_PREFIX = "mlxmux:"


class NodeState(enum.StrEnum):
    """Health of one node as every replica sees it (transitions: docs/health.md)."""

    INITIALIZING = "initializing"
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"
    OFFLINE = "offline"


ROUTABLE_STATES = frozenset({NodeState.HEALTHY, NodeState.DEGRADED})


class Strategy(enum.StrEnum):
    CACHE_AWARE = "cache-aware"
    ROUND_ROBIN = "round-robin"
    LEAST_LOADED = "least-loaded"
    LATENCY_BASED = "latency-based"
    RANDOM = "random"


class Candidate(msgspec.Struct, frozen=True):
    """A node the caller considers routable for this request, with what the policy needs to know of it."""

    node_id: str
    max_concurrency: int = 4
    cache_slots: int = 10
    """How many conversations the node's prompt cache holds (mlx_lm.server --prompt-cache-size)."""


class CostWeights(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Knobs of the cache-aware cost function (docs/routing.md explains each)."""

    load: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    """Cost of a node running at max_concurrency, in units of this request's whole prompt."""
    crowding: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    """Cost per session beyond the node's cache_slots, in units of this request's whole prompt."""
    overload_factor: Annotated[float, msgspec.Meta(gt=0)] = 2.0
    """A bound session moves when its node has in-flight >= max_concurrency * overload_factor."""
    spread: Annotated[float, msgspec.Meta(ge=0)] = 32.0
    """Cost per session already bound to the node, in prompt blocks: the prefill a new session will pay
    to start on a less busy node instead (32 blocks of 1 KiB is about 8k tokens)."""


class RouteRequest(msgspec.Struct, frozen=True):
    """Everything one routing decision needs, in plain data."""

    pool: str
    """Model pool the request belongs to (bindings and round-robin counters are per pool)."""
    candidates: tuple[Candidate, ...]
    """Routable nodes of the pool, in configured order. Never empty."""
    blocks: tuple[str, ...] = ()
    """Chained block hashes of the prompt (state.prefix.block_hashes)."""
    session: str | None = None
    """Binding key (session id, plus agent id for subagents); None = no binding."""
    strategy: Strategy = Strategy.CACHE_AWARE
    weights: CostWeights = CostWeights()
    lease_id: str = ""
    """Id of the in-flight lease to take; the store makes one up when empty."""
    lease_ttl_ms: int = DEFAULT_LEASE_TTL_MS
    session_ttl_ms: int = DEFAULT_SESSION_TTL_MS
    latency_order: tuple[str, ...] = ()
    """For latency-based: candidate ids fastest first (from outcome stats)."""
    random_pick: float = 0.0
    """For random: a number in [0, 1) drawn by the caller, so backends choose identically."""


class Lease(msgspec.Struct, frozen=True):
    """One in-flight request on one node; expires on its own if the holder dies."""

    node_id: str
    lease_id: str


class Decision(msgspec.Struct, frozen=True):
    node_id: str
    reason: str
    """Why (docs/routing.md): cache-aware gives `session` (binding honoured), `prefix` (best cost, holds part of
    the prompt), `cold` (best cost, no node holds any of it), `rebind-unavailable` / `rebind-overloaded` (binding
    moved); the other strategies give `round-robin`, `least-loaded`, `latency`, `random`."""
    matched_blocks: int
    total_blocks: int
    lease: Lease
    bound: bool
    """True when the session is (now) bound to node_id."""
    cache_tick: int = 0
    """The chosen node's cache-model tick at routing (goes back with the answer's CacheReport)."""
    predicted_blocks: int = 0
    """Leading blocks the chosen node's confirmed entries held at routing: what the router expects it to
    reuse (pending entries of requests in flight attract siblings but are not on the node yet)."""


class Outcome(msgspec.Struct, frozen=True):
    """How a request on a node ended; recorded only once its stream is fully consumed or failed."""

    ok: bool
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    error_class: str = ""
    """connect, timeout, http_5xx, http_4xx, stream_cut, client_cancel, … (empty when ok)."""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    report: CacheReport | None = None
    """The prompt and the node's usage report, for the router's model of its cache (None: nothing to learn)."""


class NodeStats(msgspec.Struct, frozen=True):
    """Outcomes recorded on one node by every replica (p50s over the most recent successes)."""

    ok: int = 0
    errors: int = 0
    """Failed requests, not counting `client_cancel` (the client went away: not the node's fault)."""
    cancelled: int = 0
    """Requests the client abandoned (`client_cancel`)."""
    error_classes: dict[str, int] = msgspec.field(default_factory=dict)
    """Failures by error class, `client_cancel` included."""
    ttft_p50_ms: float | None = None
    total_p50_ms: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0


class NodeView(msgspec.Struct, frozen=True):
    """What the store knows of one node right now."""

    node_id: str
    inflight: int
    sessions: int
    """Active sessions bound to the node (a turn within `session_active_ms`)."""
    stats: NodeStats
    cache: CacheCounters = CacheCounters()
    """The router's model of the node's cache and how well it matched the node's reports."""
    requests: tuple[RequestProgress, ...] = ()
    """What its requests in flight are doing, oldest first (those that reported progress: state.inflight)."""


class SessionBinding(msgspec.Struct, frozen=True):
    pool: str
    session: str
    node_id: str
    ttl_ms: int


class RoutingLimits(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """Store-wide knobs with their defaults (`state.open_store(url, **limits)`).

    Session and lease TTLs travel with each `RouteRequest` / `Store.renew` call; the two fields here are
    the defaults a caller should put there.
    """

    session_ttl_ms: int = DEFAULT_SESSION_TTL_MS
    """An idle session binding lapses after this long (refreshed by every routed request of the session)."""
    lease_ttl_ms: int = DEFAULT_LEASE_TTL_MS
    """An in-flight lease lapses this long after it was taken or last renewed (renew every third of it)."""
    prefix_ttl_ms: int = DEFAULT_PREFIX_TTL_MS
    """A prefix-index entry (node holds block) lapses when not routed to for this long."""
    session_active_ms: int = 600_000
    """A bound session counts against its node's cache (crowding, spread) while its last turn is this recent."""
    max_blocks_per_node: int = 4096
    """Distinct blocks the model of one node's cache may hold; beyond it the least recently used entries go
    (entries are also capped by the node's cache_slots)."""
    max_request_blocks: int = 1024
    """Blocks one request may read and write (a longer prompt is matched and recorded on its first ones), so
    one huge prompt costs the routing script a bounded time and cannot crowd out other conversations."""
    block_size: int = DEFAULT_BLOCK_SIZE
    """Bytes of prompt per hashed block (state.prefix.block_hashes)."""
    key_prefix: str = DEFAULT_KEY_PREFIX
    """Prefix of every Redis key (docs/redis-keys.md)."""
    latency_samples: int = 100
    """Recent time-to-first-token and total-time samples kept per node for the p50s."""
    redis_timeout_ms: int = 1000
    """Connect and read timeout for Redis: past it the store raises StateUnavailable (callers route locally)."""

    def __post_init__(self) -> None:
        for name in (
            "session_ttl_ms",
            "lease_ttl_ms",
            "prefix_ttl_ms",
            "max_blocks_per_node",
            "block_size",
            "session_active_ms",
            "max_request_blocks",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.latency_samples < 1 or self.redis_timeout_ms < 1:
            raise ValueError("latency_samples and redis_timeout_ms must be at least 1")


def median(samples: Sequence[float]) -> float | None:
    """The p50 of recent samples (None when there are none)."""
    if not samples:
        return None
    ordered = sorted(samples)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
