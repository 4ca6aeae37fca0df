"""The routing policy: which candidate serves a request, decided from a snapshot. Pure, no I/O.

This is the single source of truth for routing. `MemoryStore` calls `choose_node` directly;
`state/lua/route.lua` mirrors it line for line so that Redis decides in one round trip, and a
randomized contract test (tests/contract/test_agreement.py) checks that both always agree.
Keep the two in step: the arithmetic below is done in the same order there, so both produce the
same IEEE doubles and break ties the same way.

cache-aware (the default)
    1. A session bound to a node sticks to it while the node is a candidate and has
       in-flight < max_concurrency * overload_factor (or every candidate is that loaded: moving
       would throw the cache away for nothing), and while the node still holds the conversation:
       when another candidate (not overloaded) holds at least a quarter of the prompt more than the
       bound node does (the bound node evicted it, state.cache_model), the session moves there
       (`rebind-evicted`). Else the session moves: `rebind-unavailable` or `rebind-overloaded`.
    2. Otherwise the candidate with the lowest cost wins, where for a prompt of T blocks

           cost = (T - matched) + T * (load * inflight / max_concurrency
                                       + crowding * max(0, sessions + 1 - capacity))
                  + spread * sessions

       `matched` is the run of leading blocks the node is believed to hold (the prefill it saves),
       `sessions` the active sessions bound to it (a turn within `session_active_ms`: a finished
       conversation stops counting long before its binding lapses), `capacity` the entries its cache
       holds (`cache_slots`, or less where its reports showed fewer). Both penalties are in units of the
       whole prompt: a node running at max_concurrency costs `load` prompts of prefill; every session
       beyond what its cache holds costs `crowding` prompts, since it will evict someone's conversation
       (on real nodes, with conversations taking turns at their own pace, a 4-on-3 cache lost few turns
       and a 6-on-3 one almost half: so the overflow of a full cluster is spread evenly); every bound
       session costs `spread` blocks, so a prefix every node could hold (the tools and system prompt)
       does not gather all new sessions on the first node that saw it. Nodes with
       in-flight >= max_concurrency * overload_factor are skipped unless all are.
       Ties go to the node with fewer bound sessions, then to the highest rendezvous rank of the
       session (or first block, or lease id) over node ids, so equal nodes share new sessions
       evenly and every replica picks the same one.
    The session (if any) is then bound to the chosen node.

round-robin, least-loaded, latency-based, random
    Per-request baselines for stateless setups and benchmarks: no session binding, no stickiness.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from hashlib import sha1

import msgspec

from state.types import Candidate, CostWeights, RouteRequest, Strategy


class NodeLoad(msgspec.Struct, frozen=True):
    """What the policy knows of one candidate at decision time."""

    inflight: int = 0
    """Live in-flight leases on the node, across all replicas."""
    sessions: int = 0
    """Live session bindings to the node."""
    matched_blocks: int = 0
    """Leading blocks of this request's prompt the node is believed to hold."""
    capacity: int = 0
    """Entries the node's cache holds as learned from its reports (0 = the candidate's cache_slots)."""


class Choice(msgspec.Struct, frozen=True):
    node_id: str
    reason: str
    matched_blocks: int
    bind: bool
    """True when the store must (re)bind the request's session to node_id."""


_NO_LOAD = NodeLoad()


def rendezvous_rank(key: str, node_id: str) -> int:
    """A node's rank for `key` (highest wins a tie): the first 48 bits of SHA-1(key LF node_id)."""
    return int(sha1(f"{key}\n{node_id}".encode()).hexdigest()[:12], 16)


def tie_key(request: RouteRequest) -> str:
    """What ties are hashed on: the session, else the prompt's first block, else the lease id."""
    if request.session:
        return request.session
    if request.blocks:
        return request.blocks[0]
    return request.lease_id


def is_overloaded(candidate: Candidate, load: NodeLoad, overload_factor: float) -> bool:
    return load.inflight >= candidate.max_concurrency * overload_factor


def cost(candidate: Candidate, load: NodeLoad, total_blocks: int, weights: CostWeights) -> float:
    """The cache-aware cost of sending a prompt of `total_blocks` blocks to a node (module docstring)."""
    capacity = load.capacity or candidate.cache_slots
    crowd = max(0, load.sessions + 1 - capacity)
    max_concurrency = max(1, candidate.max_concurrency)
    return (
        (total_blocks - load.matched_blocks)
        + total_blocks * (weights.load * load.inflight / max_concurrency + weights.crowding * crowd)
        + weights.spread * load.sessions
    )


def choose_node(
    request: RouteRequest,
    loads: Mapping[str, NodeLoad],
    binding: str | None,
    *,
    turn: int = 0,
    ranks: Sequence[int] | None = None,
) -> Choice:
    """Choose the candidate that serves `request`.

    `loads` maps candidate ids to their load (missing = idle, nothing cached); `binding` is the node the
    request's session is bound to (ignored unless the strategy is cache-aware); `turn` is the pool's
    round-robin counter before this request; `ranks` are the candidates' rendezvous ranks for
    `tie_key(request)` (computed when not given).
    """
    candidates = request.candidates
    if not candidates:
        raise ValueError("no candidates")
    if ranks is None:
        key = tie_key(request)
        ranks = [rendezvous_rank(key, c.node_id) for c in candidates]
    load_of = [loads.get(c.node_id, _NO_LOAD) for c in candidates]
    factor = request.weights.overload_factor
    overloaded = [is_overloaded(c, ld, factor) for c, ld in zip(candidates, load_of, strict=True)]
    n = len(candidates)

    def choice(i: int, reason: str, bind: bool = False) -> Choice:
        return Choice(candidates[i].node_id, reason, load_of[i].matched_blocks, bind)

    strategy = request.strategy
    if strategy is Strategy.ROUND_ROBIN:
        return choice(turn % n, "round-robin")
    if strategy is Strategy.RANDOM:
        return choice(min(int(request.random_pick * n), n - 1), "random")
    if strategy is Strategy.LEAST_LOADED:
        best = min(
            range(n),
            key=lambda i: (
                load_of[i].inflight / max(1, candidates[i].max_concurrency),
                load_of[i].sessions,
                -ranks[i],
                i,
            ),
        )
        return choice(best, "least-loaded")
    if strategy is Strategy.LATENCY_BASED:
        index = {c.node_id: i for i, c in enumerate(candidates)}
        order = list(dict.fromkeys(index[node] for node in request.latency_order if node in index))
        order += [i for i in range(n) if i not in order]
        return choice(next((i for i in order if not overloaded[i]), order[0]), "latency")

    # cache-aware
    bind = bool(request.session)
    reason = ""
    if bind and binding is not None:
        bound = next((i for i, c in enumerate(candidates) if c.node_id == binding), None)
        if bound is None:
            reason = "rebind-unavailable"
        elif overloaded[bound] and not all(overloaded):
            reason = "rebind-overloaded"
        else:
            holds = load_of[bound].matched_blocks + max(1, len(request.blocks) // 4)
            if not any(load_of[i].matched_blocks >= holds and not overloaded[i] for i in range(n)):
                return choice(bound, "session", bind=True)
            reason = "rebind-evicted"
    eligible = [i for i in range(n) if not overloaded[i]] or list(range(n))
    total = len(request.blocks)
    w = request.weights
    best = min(
        eligible,
        key=lambda i: (cost(candidates[i], load_of[i], total, w), load_of[i].sessions, -ranks[i], i),
    )
    if reason == "rebind-evicted" and candidates[best].node_id == binding:
        reason = "session"  # the holder costs more than staying (busy, crowded): stay
    if not reason:
        reason = "prefix" if load_of[best].matched_blocks > 0 else "cold"
    return choice(best, reason, bind=bind)
