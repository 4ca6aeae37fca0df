"""The gateway's shared runtime: settings, store, cluster view, health monitor, in-flight leases.

Built once per process in the app's lifespan. Routing goes to the shared store; if the store
is unreachable the request is routed with a process-local memory store instead (degraded
mode), so a Redis outage never fails a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Iterable, Mapping, Sequence

import msgspec

from proxy.cluster import Cluster
from proxy.config import Settings
from proxy.discovery import DiscoveryRunner, make_discovery
from proxy.errors import ClusterUnavailable
from proxy.health import HealthMonitor
from proxy.membership import Membership
from proxy.metrics import Metrics
from proxy.translate import DEFAULT_BYTES_PER_TOKEN
from state.errors import StateUnavailable
from state.memory import MemoryStore
from state.policy import rendezvous_rank
from state.store import Store
from state.types import Decision, Lease, NodeView, Outcome, RouteRequest, Strategy

log = logging.getLogger("mlxmux.gateway")

STORE_MIN_BACKOFF_S = 0.5
STORE_MAX_BACKOFF_S = 5.0


class Gateway:
    def __init__(self, settings: Settings, store: Store, cluster: Cluster) -> None:
        self.settings = settings
        self.store = store
        self.cluster = cluster
        self.local_store: Store = MemoryStore()
        self.replica_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.metrics = Metrics()
        self.health = HealthMonitor(cluster, store, self.local_store, settings.health, self.replica_id)
        self.health.on_store_error = self.metrics.store_errors.inc
        source = make_discovery(settings)
        runner = DiscoveryRunner(source, []) if source is not None else None
        self.membership = Membership(cluster, store, list(settings.nodes), runner)
        self.membership.discovery_interval_s = settings.discovery.interval_s
        self.inflight: set[Lease] = set()
        self.slots: set[tuple[str, str]] = set()
        """Team-key slots (key name, lease id) held by this replica's requests in flight."""
        self._slots_unenforced = False
        self.store_ok = True
        self._store_backoff = 0.0
        self._store_retry_at = 0.0
        self._local_leases: set[Lease] = set()
        self.calibration: dict[str, float] = {}
        """Pool -> bytes of translated prompt per token, from its nodes' own prompt_tokens reports."""
        self.latency_order: tuple[str, ...] = ()
        """Node ids fastest first by shared p50 time to first token (for `latency-based`)."""
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.membership.sync()
        await self.health.round(everyone=True)
        self._tasks.append(asyncio.create_task(self._maintain(), name="mlxmux-health"))
        self._tasks.append(asyncio.create_task(self._renew_leases(), name="mlxmux-leases"))
        if self.settings.routing.strategy == Strategy.LATENCY_BASED:
            self._tasks.append(asyncio.create_task(self._refresh_latency(), name="mlxmux-latency"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.cluster.aclose()
        await self.store.close()
        await self.local_store.close()

    def _mark_store(self, ok: bool) -> None:
        if ok != self.store_ok:
            log.warning(
                "shared store %s",
                "reachable again: shared routing resumed" if ok else "unreachable: degraded mode (routing locally)",
            )
        self.store_ok = ok
        if ok:
            self._store_backoff = 0.0
            self._store_retry_at = 0.0
        else:
            self.metrics.store_errors.inc()
            # The circuit around the store: skip it until the retry time, so a dead Redis costs the hot
            # path nothing and is not hammered; the retry time backs off to STORE_MAX_BACKOFF_S.
            self._store_backoff = min(STORE_MAX_BACKOFF_S, max(STORE_MIN_BACKOFF_S, self._store_backoff * 2))
            self._store_retry_at = time.monotonic() + self._store_backoff

    def _store_closed(self) -> bool:
        """True while the circuit around the shared store is open (recent failure, retry not yet due)."""
        return not self.store_ok and time.monotonic() < self._store_retry_at

    async def _degraded_route(self, request: RouteRequest) -> Decision:
        """Routing without the shared store. A session goes to the candidate with the highest rendezvous
        hash of its id over the routable nodes — every replica computes the same, so sessions stay put
        without shared state; other requests use this replica's own memory store."""
        if request.session:
            key = request.session
            best = max(request.candidates, key=lambda c: (rendezvous_rank(key, c.node_id), c.node_id))
            pinned = msgspec.structs.replace(request, candidates=(best,), strategy=Strategy.ROUND_ROBIN)
            decision = await self.local_store.route(pinned)
            return msgspec.structs.replace(decision, reason="degraded-hash")
        return await self.local_store.route(request)

    async def route(self, pool: str, blocks: tuple[str, ...], session: str | None, exclude: Iterable[str]) -> Decision:
        """Choose a node for one attempt; raises ClusterUnavailable when no node of the pool is routable."""
        candidates = self.cluster.candidates(pool, exclude)
        if not candidates:
            raise ClusterUnavailable(
                f"no routable node in pool {pool!r} (see GET /cluster)", retry_after=self.settings.routing.retry_after_s
            )
        r = self.settings.routing
        request = RouteRequest(
            pool=pool,
            candidates=candidates,
            blocks=blocks,
            session=session,
            strategy=r.strategy,
            weights=r.weights,
            lease_id=secrets.token_hex(8),
            lease_ttl_ms=int(r.lease_ttl_s * 1000),
            session_ttl_ms=int(r.session_ttl_s * 1000),
            random_pick=random.random(),
            latency_order=self.latency_order,
        )
        decision: Decision | None = None
        if not self._store_closed():
            try:
                decision = await self.store.route(request)
                self._mark_store(True)
            except StateUnavailable:
                self._mark_store(False)
        if decision is None:
            decision = await self._degraded_route(request)
            self._local_leases.add(decision.lease)
        self.inflight.add(decision.lease)
        return decision

    async def finish(self, lease: Lease, outcome: Outcome) -> None:
        self.inflight.discard(lease)
        if lease in self._local_leases:
            self._local_leases.discard(lease)
            await self.local_store.finish(lease, outcome)
            return
        if self._store_closed():
            return  # the lease expires on its own in the shared store
        try:
            await self.store.finish(lease, outcome)
        except StateUnavailable:
            self._mark_store(False)
            with contextlib.suppress(StateUnavailable):
                await self.local_store.finish(lease, outcome)

    async def acquire_slot(self, key_name: str, limit: int) -> tuple[str, str] | None:
        """Take one of a team key's `limit` slots (shared by all replicas): the slot to release, or None when
        the key is at its limit. Fails open: while the shared store is unreachable the request goes ahead
        (said once per outage in the log), since refusing would fail every request of the team."""
        slot = (key_name, secrets.token_hex(8))
        if not self._store_closed():
            try:
                taken = await self.store.acquire_slot(*slot, limit, int(self.settings.routing.lease_ttl_s * 1000))
                self._mark_store(True)
                self._slots_unenforced = False
                if not taken:
                    return None
                self.slots.add(slot)
                return slot
            except StateUnavailable:
                self._mark_store(False)
        if not self._slots_unenforced:
            self._slots_unenforced = True
            log.warning("shared store unreachable: per-key concurrency limits are not enforced until it is back")
        return slot

    async def release_slot(self, slot: tuple[str, str]) -> None:
        if slot not in self.slots:
            return  # taken while the store was unreachable: nothing to give back
        self.slots.discard(slot)
        if self._store_closed():
            return  # it expires on its own within the lease TTL
        try:
            await self.store.release_slot(*slot)
        except StateUnavailable:
            self._mark_store(False)

    async def _renew_leases(self) -> None:
        ttl_ms = int(self.settings.routing.lease_ttl_s * 1000)
        while True:
            await asyncio.sleep(self.settings.routing.lease_ttl_s / 3)
            local = [lease for lease in self.inflight if lease in self._local_leases]
            shared = [lease for lease in self.inflight if lease not in self._local_leases]
            if local:
                await self.local_store.renew(local, ttl_ms)
            if self.slots and not self._store_closed():
                with contextlib.suppress(StateUnavailable):
                    await self.store.renew_slots(list(self.slots), ttl_ms)
            if not shared or self._store_closed():
                continue
            try:
                await self.store.renew(shared, ttl_ms)
            except StateUnavailable:
                self._mark_store(False)

    async def _probe_store(self) -> None:
        """While in degraded mode: is the shared store back? (Requests find out too; this covers idle
        replicas, so /cluster and the logs say so without waiting for traffic.)"""
        try:
            await self.store.ping()
            self._mark_store(True)
        except StateUnavailable:
            self._mark_store(False)

    async def _maintain(self) -> None:
        """Every health interval: the node set (registry, discovery), a health round, the token calibration."""
        while True:
            await asyncio.sleep(self.settings.health.interval_s)
            try:
                if not self.store_ok and not self._store_closed():
                    await self._probe_store()
                await self.membership.sync()
                await self.health.round()
                if not self._store_closed():
                    await self.calibrate()
            except Exception:  # a bug here must not end health checking for the life of the process
                log.exception("health round failed")

    async def calibrate(self) -> None:
        """Bytes per token of each pool, from the prompts its nodes reported (shared: every replica agrees)."""
        try:
            views = await self.store.node_views(list(self.cluster.nodes))
        except StateUnavailable:
            self._mark_store(False)
            return
        self.calibration = calibration(views, {n.id: n.pool for n in self.cluster.nodes.values()})

    def bytes_per_token(self, pool: str) -> float:
        return self.calibration.get(pool, DEFAULT_BYTES_PER_TOKEN)

    async def _refresh_latency(self) -> None:
        while True:
            try:
                views = await self.store.node_views(list(self.cluster.nodes))
                self.latency_order = latency_order(views)
            except StateUnavailable:
                self._mark_store(False)
            await asyncio.sleep(self.settings.health.interval_s)


MIN_CALIBRATION_TOKENS = 1000
"""Reported prompt tokens a pool needs before its own ratio replaces the default."""


def calibration(views: Sequence[NodeView], pools: Mapping[str, str]) -> dict[str, float]:
    """Pool -> bytes per token over its nodes' reported prompts (pools with too few reports left out)."""
    sums: dict[str, tuple[int, int]] = {}
    for v in views:
        pool = pools.get(v.node_id)
        if pool is not None:
            b, t = sums.get(pool, (0, 0))
            sums[pool] = (b + v.cache.prompt_bytes, t + v.cache.prompt_tokens)
    return {pool: b / t for pool, (b, t) in sums.items() if t >= MIN_CALIBRATION_TOKENS and b > 0}


def latency_order(views: Sequence[NodeView]) -> tuple[str, ...]:
    """Node ids for `latency-based`: nodes not measured yet first (so they get measured), then by
    shared p50 time to first token, fastest first."""
    unmeasured = [v.node_id for v in views if v.stats.ttft_p50_ms is None]
    measured = sorted((v for v in views if v.stats.ttft_p50_ms is not None), key=lambda v: v.stats.ttft_p50_ms or 0.0)
    return (*unmeasured, *(v.node_id for v in measured))
