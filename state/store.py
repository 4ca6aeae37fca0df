"""The store interface: small atomic operations on shared routing knowledge.

Two backends behave the same: `state.memory.MemoryStore` (one process, the default) and
`state.redis_store.RedisStore` (every replica shares one Redis). The policy
(`state.policy`) decides from a snapshot; the store applies the decision atomically.
Backends raise `state.errors.StateUnavailable` when their storage cannot be reached.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from state.health import NodeHealth
from state.inflight import GenerationRead, RequestProgress, Ticket
from state.types import Decision, Lease, NodeView, Outcome, RouteRequest, SessionBinding


class Store(Protocol):
    async def route(self, request: RouteRequest) -> Decision:
        """Choose a node for one request and apply the choice atomically (one Redis round trip).

        In one step: read the candidates' live in-flight leases, bound sessions and matched leading
        blocks; for `cache-aware`, honour a live session binding whose node is still a candidate and
        not far over capacity (refreshing its TTL); otherwise choose by `request.strategy`
        (`state.policy.choose_node`, the single definition of the policy); bind the session to the
        chosen node (cache-aware only; first writer wins, since the whole step is atomic); take an
        in-flight lease (`request.lease_id`, or a new id) on it; and record the prompt's blocks as held
        by it, so that sibling requests routed right after land there too. Raises ValueError when
        `request.candidates` is empty.
        """
        ...

    async def finish(self, lease: Lease, outcome: Outcome) -> None:
        """Release an in-flight lease and record the request's outcome on its node (one round trip).

        Successes add their time to first token and total time to the node's recent samples; failures
        count by `error_class` (`client_cancel` apart, as `cancelled`); token totals add up either way.
        Releasing a lease twice, or one that expired, is harmless.
        """
        ...

    async def renew(self, leases: Sequence[Lease], ttl_ms: int) -> None:
        """Push back the expiry of leases still in flight to now + ttl_ms (a replica's heartbeat).

        Leases already released or expired and trimmed are not brought back.
        """
        ...

    async def acquire_slot(
        self, key_name: str, lease_id: str, limit: int, ttl_ms: int, release: Sequence[str] = ()
    ) -> bool:
        """Take one of a team key's `limit` concurrent-request slots, shared by every replica (fair share).

        Atomically: drop the key's expired slots and the ids in `release` (the caller's slots of this key
        whose release it could not send earlier); if fewer than `limit` are live, hold `lease_id` until
        now + ttl_ms and return True, else return False. Acquiring a lease id already held only pushes
        back its expiry (True).
        """
        ...

    async def release_slot(self, key_name: str, lease_id: str) -> None:
        """Give a slot back. Releasing one twice, or one that expired, is harmless."""
        ...

    async def release(self, leases: Sequence[Lease], slots: Sequence[tuple[str, str]] = ()) -> None:
        """Give back in-flight leases and team-key slots (key name, lease id) by id, recording no outcome,
        in one round trip: how a replica makes good a call that timed out (it may still have run) or a
        release it skipped while the store was unreachable. Ids not held (never taken, released,
        expired) are ignored."""
        ...

    async def renew_slots(self, slots: Sequence[tuple[str, str]], ttl_ms: int) -> None:
        """Push back the expiry of held slots, given as (key name, lease id), to now + ttl_ms (a replica's
        heartbeat). Slots already released or expired and trimmed are not brought back."""
        ...

    async def progress(self, updates: Sequence[tuple[Lease, RequestProgress]]) -> None:
        """Record what requests in flight are doing (`NodeView.requests`), each only while its lease is live;
        `age_ms` is the request's age now. Finishing (or losing) the lease drops its record."""
        ...

    async def open_generation(self, key: str, owner: str, waiter: str, ttl_ms: int) -> Ticket:
        """Own a new generation named `key` (as `owner`), or, while a live one has that key, wait for it
        (as `waiter`, until now + ttl_ms unless renewed by reading); one that ended is left alone
        (state.inflight)."""
        ...

    async def tick_generation(
        self, key: str, owner: str, ttl_ms: int, grace_ms: int, events: Sequence[str] = (), end: str | None = None
    ) -> int:
        """The owner's heartbeat: append `events`, end the generation with the `end` record if given (it then
        stays readable for grace_ms), else keep it live for ttl_ms more. Returns how many waiters are
        live, or -1 if the generation is not the owner's any more (it lapsed)."""
        ...

    async def read_generation(self, key: str, waiter: str, after: int, ttl_ms: int) -> GenerationRead:
        """The events after the first `after`, the state and the end record; renews the waiter while live."""
        ...

    async def leave_generation(self, key: str, waiter: str) -> None:
        """The waiter stops waiting (its client went away)."""
        ...

    async def forget_prefix(self, node_id: str, blocks: Sequence[str]) -> None:
        """Drop blocks from a node's prefix index entry (the node showed it no longer holds them)."""
        ...

    async def unbind(self, pool: str, session: str) -> None:
        """Remove one session binding."""
        ...

    async def remove_node(self, node_id: str) -> None:
        """Drop everything known of a node: its bindings, prefix entries, leases, stats and health record
        (not its registry entry)."""
        ...

    async def health(self) -> dict[str, NodeHealth]:
        """Every node's shared health record, by node id (nodes never recorded are absent)."""
        ...

    async def cas_health(self, node_id: str, health: NodeHealth) -> bool:
        """Store `health` as the node's record, with version `health.version + 1`, if the stored record
        still has `health.version` (0 = none yet). False if another writer got there first."""
        ...

    async def claim_probe(self, node_id: str, owner: str, ttl_ms: int) -> bool:
        """True for the one caller that gets to probe the node in the next `ttl_ms` (owner = replica id;
        the owner itself is granted it again)."""
        ...

    async def registry(self) -> dict[str, bytes]:
        """Nodes added or removed at run time, by node id (opaque JSON written by `register_node`)."""
        ...

    async def register_node(self, node_id: str, data: bytes) -> None:
        """Record (or replace) a registry entry."""
        ...

    async def restore_registry(self, entries: Mapping[str, bytes]) -> None:
        """Write back registry entries that are missing, leaving those present as they are (HSETNX each):
        a replica re-asserting the node changes it last saw, after the store lost its data."""
        ...

    async def epoch(self, candidate: str) -> str:
        """The store's epoch: a token set once, by the first caller that finds none (to `candidate`), and
        returned to every caller after. It changes only when the store lost its data (a Redis restart
        without persistence, FLUSHALL), which is how replicas notice that they must re-assert what they know."""
        ...

    async def node_views(self, node_ids: Sequence[str]) -> list[NodeView]:
        """Load, bound sessions and outcome statistics of the given nodes, in the same order."""
        ...

    async def sessions(self, limit: int = 1000) -> list[SessionBinding]:
        """Live session bindings (at most `limit`; an operator's view, not for the hot path)."""
        ...

    async def ping(self) -> None:
        """Return if the backend is reachable, else raise StateUnavailable."""
        ...

    async def check(self) -> None:
        """Raise StoreUnsupported if the backend can never hold the shared state (a Redis Cluster node),
        StateUnavailable if it cannot be reached now; return otherwise (a replica asks once, at start)."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...
