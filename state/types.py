"""Plain data that crosses the store boundary: node specs, routing requests and decisions.

Pure: no I/O. These structs are what the policy reads and what both store backends return.
"""

from __future__ import annotations

import enum

import msgspec


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

    load: float = 1.0
    """Cost of a node running at max_concurrency, in units of this request's whole prompt."""
    crowding: float = 1.0
    """Cost per session beyond the node's cache_slots, in units of this request's whole prompt."""
    overload_factor: float = 2.0
    """A bound session moves when its node has in-flight >= max_concurrency * overload_factor."""


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
    lease_ttl_ms: int = 60_000
    session_ttl_ms: int = 1_800_000
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
    """Why: session, prefix, least-loaded, round-robin, latency, random, rebind-<why>."""
    matched_blocks: int
    total_blocks: int
    lease: Lease
    bound: bool
    """True when the session is (now) bound to node_id."""


class Outcome(msgspec.Struct, frozen=True):
    """How a request on a node ended; recorded only once its stream is fully consumed or failed."""

    ok: bool
    ttft_ms: float = 0.0
    total_ms: float = 0.0
    error_class: str = ""
    """connect, timeout, http_5xx, http_4xx, stream_cut, client_cancel, … (empty when ok)."""
    prompt_tokens: int = 0
    cached_tokens: int = 0


class NodeStats(msgspec.Struct, frozen=True):
    ok: int = 0
    errors: int = 0
    ttft_p50_ms: float | None = None
    total_p50_ms: float | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0


class NodeView(msgspec.Struct, frozen=True):
    """What the store knows of one node right now."""

    node_id: str
    inflight: int
    sessions: int
    stats: NodeStats


class SessionBinding(msgspec.Struct, frozen=True):
    pool: str
    session: str
    node_id: str
    ttl_ms: int
