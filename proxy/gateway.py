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
from collections.abc import Iterable, Sequence

from proxy.cluster import Cluster
from proxy.config import Settings
from proxy.discovery import DiscoveryRunner, make_discovery
from proxy.errors import ClusterUnavailable
from proxy.health import HealthMonitor
from proxy.membership import Membership
from state.errors import StateUnavailable
from state.memory import MemoryStore
from state.store import Store
from state.types import Decision, Lease, NodeView, Outcome, RouteRequest, Strategy

log = logging.getLogger("mlxmux.gateway")


class Gateway:
    def __init__(self, settings: Settings, store: Store, cluster: Cluster) -> None:
        self.settings = settings
        self.store = store
        self.cluster = cluster
        self.local_store: Store = MemoryStore()
        self.replica_id = f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.health = HealthMonitor(cluster, store, self.local_store, settings.health, self.replica_id)
        source = make_discovery(settings)
        runner = DiscoveryRunner(source, []) if source is not None else None
        self.membership = Membership(cluster, store, list(settings.nodes), runner)
        self.membership.discovery_interval_s = settings.discovery.interval_s
        self.inflight: set[Lease] = set()
        self.store_ok = True
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
            log.warning("shared store %s", "reachable again" if ok else "unreachable: routing locally")
        self.store_ok = ok

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
        try:
            decision = await self.store.route(request)
            self._mark_store(True)
        except StateUnavailable:
            self._mark_store(False)
            decision = await self.local_store.route(request)
        self.inflight.add(decision.lease)
        return decision

    async def finish(self, lease: Lease, outcome: Outcome) -> None:
        self.inflight.discard(lease)
        try:
            await self.store.finish(lease, outcome)
        except StateUnavailable:
            self._mark_store(False)
            with contextlib.suppress(StateUnavailable):
                await self.local_store.finish(lease, outcome)

    async def _renew_leases(self) -> None:
        ttl_ms = int(self.settings.routing.lease_ttl_s * 1000)
        while True:
            await asyncio.sleep(self.settings.routing.lease_ttl_s / 3)
            if not self.inflight:
                continue
            try:
                await self.store.renew(list(self.inflight), ttl_ms)
            except StateUnavailable:
                self._mark_store(False)

    async def _maintain(self) -> None:
        """Every health interval: the node set (registry, discovery), then a health round."""
        while True:
            await asyncio.sleep(self.settings.health.interval_s)
            try:
                await self.membership.sync()
                await self.health.round()
            except Exception:  # a bug here must not end health checking for the life of the process
                log.exception("health round failed")

    async def _refresh_latency(self) -> None:
        while True:
            try:
                views = await self.store.node_views(list(self.cluster.nodes))
                self.latency_order = latency_order(views)
            except StateUnavailable:
                self._mark_store(False)
            await asyncio.sleep(self.settings.health.interval_s)


def latency_order(views: Sequence[NodeView]) -> tuple[str, ...]:
    """Node ids for `latency-based`: nodes not measured yet first (so they get measured), then by
    shared p50 time to first token, fastest first."""
    unmeasured = [v.node_id for v in views if v.stats.ttft_p50_ms is None]
    measured = sorted((v for v in views if v.stats.ttft_p50_ms is not None), key=lambda v: v.stats.ttft_p50_ms or 0.0)
    return (*unmeasured, *(v.node_id for v in measured))
