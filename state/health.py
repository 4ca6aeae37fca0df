"""Node health as every replica shares it: the record, and its transitions (pure; no I/O).

One `NodeHealth` record per node lives in the store and is changed by compare-and-set
(`Store.cas_health`), so replicas never overwrite each other's findings. Two kinds of evidence
change it: active probes (`on_probe`) and the outcomes of real requests (`on_request`).

States (NodeState) and the circuit breaker:

    initializing --probe passes--------------------------------> healthy
    healthy      --a probe or request fails--------------------> degraded         (still routable)
    degraded     --pass_threshold probes pass / a request ok---> healthy
    any          --fail_threshold probes fail in a row,
                   request_fail_threshold requests fail in a row,
                   or one connect error on a real request------> unhealthy        breaker OPEN
    unhealthy    --down for offline_after_ms-------------------> offline          breaker OPEN
    unhealthy/offline --retry time reached, a trial probe------>                  breaker HALF_OPEN
    HALF_OPEN    --the trial passes----------------------------> healthy          breaker CLOSED
    HALF_OPEN    --the trial fails-----------------------------> unhealthy/offline, OPEN, backoff doubled

While the breaker is OPEN nobody probes the node until `retry_at_ms`; the wait starts at
`open_ms` and doubles per failed trial up to `max_backoff_ms`, with jitter so that a rack of Macs
coming back is not probed in lock step. `draining` is an operator's flag carried in the same
record: a draining node takes no new requests (its sessions move at their next turn), whatever its
health.
"""

from __future__ import annotations

import enum

import msgspec

from state.types import ROUTABLE_STATES, NodeState


class Breaker(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


class HealthPolicy(msgspec.Struct, frozen=True, kw_only=True):
    fail_threshold: int = 2
    """Failed probes in a row that open the breaker."""
    pass_threshold: int = 1
    """Passed probes in a row that make a degraded (or recovering) node healthy."""
    request_fail_threshold: int = 3
    """Failed real requests in a row (5xx, timeouts, broken streams) that open the breaker."""
    open_ms: int = 5_000
    """First wait before a down node is probed again; doubles per failed trial."""
    max_backoff_ms: int = 60_000
    """Longest wait between trials of a down node."""
    offline_after_ms: int = 60_000
    """A node down this long is `offline` (it is still tried, at the backoff pace)."""


class NodeHealth(msgspec.Struct, frozen=True, kw_only=True):
    state: NodeState = NodeState.INITIALIZING
    breaker: Breaker = Breaker.CLOSED
    passes: int = 0
    """Consecutive passed probes."""
    fails: int = 0
    """Consecutive failed probes."""
    request_fails: int = 0
    """Consecutive failed real requests."""
    backoff_ms: int = 0
    retry_at_ms: int = 0
    """While OPEN: no probe before this time."""
    down_since_ms: int = 0
    last_error: str = ""
    changed_ms: int = 0
    """When `state` last changed."""
    draining: bool = False
    version: int = 0
    """Bumped by every write (compare-and-set)."""

    @property
    def routable(self) -> bool:
        return self.state in ROUTABLE_STATES and not self.draining


def _open(h: NodeHealth, error: str, policy: HealthPolicy, now_ms: int, jitter: float) -> NodeHealth:
    """Open (or re-open) the breaker: the node is down until a trial probe passes."""
    backoff = policy.open_ms if h.breaker == Breaker.CLOSED else min(policy.max_backoff_ms, max(1, h.backoff_ms) * 2)
    down_since = h.down_since_ms or now_ms
    state = NodeState.OFFLINE if now_ms - down_since >= policy.offline_after_ms else NodeState.UNHEALTHY
    return msgspec.structs.replace(
        h,
        state=state,
        breaker=Breaker.OPEN,
        backoff_ms=backoff,
        retry_at_ms=now_ms + int(backoff * (0.8 + 0.4 * jitter)),
        down_since_ms=down_since,
        last_error=error,
        changed_ms=now_ms if state != h.state else h.changed_ms,
    )


def _healthy(h: NodeHealth, now_ms: int) -> NodeHealth:
    return msgspec.structs.replace(
        h,
        state=NodeState.HEALTHY,
        breaker=Breaker.CLOSED,
        fails=0,
        request_fails=0,
        backoff_ms=0,
        retry_at_ms=0,
        down_since_ms=0,
        last_error="",
        changed_ms=now_ms if h.state != NodeState.HEALTHY else h.changed_ms,
    )


def probe_due(h: NodeHealth, now_ms: int) -> bool:
    """Whether a probe may run now: always, unless the breaker is open and its wait has not passed."""
    return h.breaker != Breaker.OPEN or now_ms >= h.retry_at_ms


def start_trial(h: NodeHealth) -> NodeHealth:
    """The breaker's trial probe is starting (only when `probe_due` for an open breaker)."""
    return msgspec.structs.replace(h, breaker=Breaker.HALF_OPEN) if h.breaker == Breaker.OPEN else h


def on_probe(h: NodeHealth, error: str | None, policy: HealthPolicy, now_ms: int, jitter: float = 0.5) -> NodeHealth:
    """The record after a probe: `error` None means it passed. `jitter` in [0, 1) spreads retries."""
    if error is None:
        passes = h.passes + 1
        h = msgspec.structs.replace(h, passes=passes, fails=0)
        if h.breaker != Breaker.CLOSED or h.state in (NodeState.INITIALIZING, NodeState.UNHEALTHY, NodeState.OFFLINE):
            return _healthy(h, now_ms)
        if h.state == NodeState.DEGRADED and passes >= policy.pass_threshold and h.request_fails == 0:
            return _healthy(h, now_ms)
        return h
    h = msgspec.structs.replace(h, passes=0, fails=h.fails + 1, last_error=error)
    if h.breaker != Breaker.CLOSED or h.fails >= policy.fail_threshold:
        return _open(h, error, policy, now_ms, jitter)
    if h.state == NodeState.HEALTHY:
        return msgspec.structs.replace(h, state=NodeState.DEGRADED, changed_ms=now_ms)
    return h


def on_request(
    h: NodeHealth, error_class: str | None, error: str, policy: HealthPolicy, now_ms: int, jitter: float = 0.5
) -> NodeHealth:
    """The record after a real request on the node: `error_class` None means it succeeded.

    `connect` (the node refused or is unreachable) opens the breaker at once; other failures
    (`timeout`, `http_5xx`, `stream_cut`, `protocol`) degrade the node and open the breaker after
    `request_fail_threshold` in a row. `slow` (a success whose first token came later than the
    configured limit) only degrades it. A success clears the streak and heals a degraded node.
    """
    if h.breaker != Breaker.CLOSED:
        return h  # out of rotation: the probes decide when it is back
    if error_class is None:
        if h.request_fails == 0 and h.state != NodeState.DEGRADED:
            return h
        h = msgspec.structs.replace(h, request_fails=0)
        if h.state == NodeState.DEGRADED and h.fails == 0:
            return _healthy(h, now_ms)
        return h
    if error_class == "slow":
        if h.state != NodeState.HEALTHY:
            return h
        return msgspec.structs.replace(h, state=NodeState.DEGRADED, changed_ms=now_ms, last_error=error)
    h = msgspec.structs.replace(h, request_fails=h.request_fails + 1, last_error=error)
    if error_class == "connect" or h.request_fails >= policy.request_fail_threshold:
        return _open(h, error, policy, now_ms, jitter)
    if h.state == NodeState.HEALTHY:
        return msgspec.structs.replace(h, state=NodeState.DEGRADED, changed_ms=now_ms)
    return h


def set_draining(h: NodeHealth, draining: bool) -> NodeHealth:
    return msgspec.structs.replace(h, draining=draining)


def cluster_status(records: list[NodeHealth]) -> str:
    """starting, healthy, degraded, critical or offline, from the nodes' records."""
    if not records:
        return "offline"
    routable = sum(r.routable for r in records)
    if routable == 0:
        return "starting" if any(r.state == NodeState.INITIALIZING for r in records) else "offline"
    if all(r.state == NodeState.HEALTHY and not r.draining for r in records):
        return "healthy"
    if routable * 2 < len(records):
        return "critical"
    return "degraded"
