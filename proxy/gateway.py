"""The gateway's shared runtime: settings, store, cluster view, health monitor, in-flight leases.

Built once per process in the app's lifespan. Routing goes to the shared store; if the store
is unreachable the request is routed with a process-local memory store instead (degraded
mode), so a Redis outage never fails a request.

Leases and slots cannot leak through a store outage: a store call that failed or timed out (it may
still run in Redis when a stalled Redis wakes) and a release skipped while the store circuit was open
are remembered by id and given back (`Store.release`) as soon as the store answers again, within
REPAIR_INTERVAL_S, and once more after a later call proved Redis had run everything sent before
(docs/health.md#what-a-redis-stall-or-outage-costs). Each replica also remembers the session bindings
the store gave it (`BindingCache`), so degraded mode keeps sessions on their node.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import random
import secrets
import socket
import time
from collections.abc import Iterable, Sequence

import msgspec

from proxy.bindings import BindingCache
from proxy.cluster import Cluster
from proxy.config import Settings
from proxy.discovery import DiscoveryRunner, make_discovery
from proxy.errors import ClusterUnavailable
from proxy.health import HealthMonitor
from proxy.joins import JoinHub
from proxy.membership import Membership
from proxy.metrics import Metrics
from proxy.pools import unavailable
from proxy.progress import REPORT_INTERVAL_S, ProgressBook
from proxy.translate import DEFAULT_BYTES_PER_TOKEN
from proxy.views import belief_warning, calibration, latency_order
from state.errors import StateUnavailable
from state.memory import MemoryStore
from state.policy import rendezvous_rank
from state.store import Store
from state.types import Decision, Lease, Outcome, RouteRequest, Strategy

log = logging.getLogger("mlxmux.gateway")

STORE_MIN_BACKOFF_S = 0.5
STORE_MAX_BACKOFF_S = 5.0
REPAIR_INTERVAL_S = 0.25
"""While releases are owed to the store: how often they are sent (also while it is unreachable)."""
MAX_REPAIRS = 20_000
"""Releases owed at most; beyond it the oldest are dropped (they are the first to lapse in the store anyway)."""
REPAIR_BATCH = 1000
"""Releases sent in one round trip."""
BINDING_CACHE_SIZE = 10_000
"""Session bindings each replica remembers for degraded mode (least recently used dropped first)."""

NODE_LEASE = "node"
KEY_SLOT = "key"


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
        """Team-key slots (key name, lease id) held by this replica's requests in flight, or asked for by a
        call that failed (it may have been taken all the same): renewed while the request runs, released by id."""
        self.repairs: collections.OrderedDict[tuple[str, str, str], tuple[float, float]] = collections.OrderedDict()
        """Releases owed to the store, oldest first: (NODE_LEASE, node id, lease id) or (KEY_SLOT, key name,
        lease id) -> (monotonic time it was owed, time the lease lapses in the store anyway)."""
        self._repair_due = asyncio.Event()
        self._answered_at = 0.0
        """Monotonic time at which the latest store call that was answered had been sent."""
        self.bindings = BindingCache(BINDING_CACHE_SIZE, settings.routing.session_ttl_s)
        self._slots_unenforced = False
        self.store_ok = True
        self._store_backoff = 0.0
        self._store_retry_at = 0.0
        self._local_leases: set[Lease] = set()
        self._belief_warned: set[str] = set()
        """Nodes whose contradicting reports were already logged (once per node and process)."""
        self.calibration: dict[str, float] = {}
        """Pool -> bytes of translated prompt per token, from its nodes' own prompt_tokens reports."""
        self.latency_order: tuple[str, ...] = ()
        """Node ids fastest first by shared p50 time to first token (for `latency-based`)."""
        self.joins = JoinHub(self)
        """Streamed answers this replica owns, which resent copies of their requests may join (proxy.joins)."""
        self.progress = ProgressBook()
        """What this replica's requests in flight are doing (proxy.progress), sent to the store once a second."""
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.membership.sync()
        await self.health.round(everyone=True)
        self._tasks.append(asyncio.create_task(self._maintain(), name="mlxmux-health"))
        self._tasks.append(asyncio.create_task(self._renew_leases(), name="mlxmux-leases"))
        self._tasks.append(asyncio.create_task(self._repair_loop(), name="mlxmux-repairs"))
        self._tasks.append(asyncio.create_task(self._report_progress(), name="mlxmux-progress"))

    async def stop(self) -> None:
        self.joins.close()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for _ in range(2):  # the second round settles what the first could not prove (see _settle)
            if not self.repairs:
                break
            await self._repair()
            if not self.store_ok:
                break  # unreachable: what is owed lapses in the store within the lease TTL
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

    def store_failed(self) -> None:
        """A call to the shared store outside this class failed: open the circuit around it."""
        self._mark_store(False)

    def store_circuit_open(self) -> bool:
        """True while the shared store is skipped after a failure (callers do without it meanwhile)."""
        return self._store_closed()

    def _answered(self, sent_at: float) -> None:
        """A store call sent at `sent_at` (monotonic) was answered."""
        self._answered_at = max(self._answered_at, sent_at)
        self._mark_store(True)

    async def _degraded_route(self, request: RouteRequest) -> Decision:
        """Routing without the shared store. A session goes to the node this replica last saw it bound to
        (`self.bindings`: the store's binding, or its own earlier degraded choice) while that node is a
        candidate; else to the candidate with the highest rendezvous hash of its id over the routable
        nodes — every replica computes the same, so sessions no replica knew stay put without shared
        state. Other requests use this replica's own memory store."""
        if request.session:
            key = request.session
            known = self.bindings.get(request.pool, key)
            best = next((c for c in request.candidates if c.node_id == known), None)
            reason = "degraded-binding"
            if best is None:
                best = max(request.candidates, key=lambda c: (rendezvous_rank(key, c.node_id), c.node_id))
                reason = "degraded-hash"
            pinned = msgspec.structs.replace(request, candidates=(best,), strategy=Strategy.ROUND_ROBIN)
            decision = await self.local_store.route(pinned)
            self.bindings.put(request.pool, key, decision.node_id)
            return msgspec.structs.replace(decision, reason=reason)
        return await self.local_store.route(request)

    async def route(
        self, pool: str, blocks: tuple[str, ...], session: str | None, exclude: Iterable[str], tokens: int = 0
    ) -> Decision:
        """Choose a node for one attempt among those whose context window holds `tokens` (the prompt's
        estimate); raises ClusterUnavailable when no node of the pool is routable."""
        candidates = self.cluster.candidates(pool, exclude, tokens)
        if not candidates:
            if tokens and self.cluster.candidates(pool, exclude):
                raise self.unavailable(pool, tokens)  # nodes are up, but none whose window holds the prompt
            raise self.unavailable(pool)
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
            sent = time.monotonic()
            try:
                decision = await self.store.route(request)
            except StateUnavailable:
                self._mark_store(False)
                self._owe_route(request)  # it may still run in Redis: its lease is given back wherever it lands
            except BaseException:
                self._owe_route(request)
                raise
            else:
                self._answered(sent)
                if decision.bound and session:
                    self.bindings.put(pool, session, decision.node_id)
        if decision is None:
            decision = await self._degraded_route(request)
            self._local_leases.add(decision.lease)
        self.inflight.add(decision.lease)
        return decision

    def unavailable(self, pool: str, tokens: int = 0) -> ClusterUnavailable:
        """The 503 for a pool with no routable node (with `tokens`: none whose context window holds a prompt of
        that many tokens), naming each node that could take it and what is wrong with it."""
        settings = self.settings
        return unavailable(
            self.cluster, self.health.records, pool, settings.models, settings.routing.retry_after_s, tokens
        )

    async def finish(self, lease: Lease, outcome: Outcome) -> None:
        self.inflight.discard(lease)
        if lease in self._local_leases:
            self._local_leases.discard(lease)
            await self.local_store.finish(lease, outcome)
            return
        if self._store_closed():
            self._owe(NODE_LEASE, lease.node_id, lease.lease_id)  # given back when the store answers again
            return
        sent = time.monotonic()
        try:
            await self.store.finish(lease, outcome)
        except StateUnavailable:
            self._mark_store(False)
            self._owe(NODE_LEASE, lease.node_id, lease.lease_id)
            with contextlib.suppress(StateUnavailable):
                await self.local_store.finish(lease, outcome)
        except BaseException:
            self._owe(NODE_LEASE, lease.node_id, lease.lease_id)
            raise
        else:
            self._answered(sent)

    async def acquire_slot(self, key_name: str, limit: int) -> tuple[str, str] | None:
        """Take one of a team key's `limit` slots (shared by all replicas): the slot to release, or None when
        the key is at its limit. Fails open: while the shared store is unreachable the request goes ahead
        (said once per outage in the log), since refusing would fail every request of the team. A slot
        whose acquisition failed is kept all the same (a stalled Redis may still take it when it wakes),
        so it is renewed while the request runs and released by id at its end."""
        slot = (key_name, secrets.token_hex(8))
        if not self._store_closed():
            owed = [k for k in self.repairs if k[0] == KEY_SLOT and k[1] == key_name] if self.repairs else []
            proven = self._answered_at
            sent = time.monotonic()
            try:
                taken = await self.store.acquire_slot(
                    *slot, limit, int(self.settings.routing.lease_ttl_s * 1000), release=[k[2] for k in owed]
                )
            except StateUnavailable:
                self._mark_store(False)
                self.slots.add(slot)
            except BaseException:
                self._owe(KEY_SLOT, *slot)
                raise
            else:
                self._answered(sent)
                self._settle(owed, proven)
                self._slots_unenforced = False
                if not taken:
                    return None
                self.slots.add(slot)
                return slot
        if not self._slots_unenforced:
            self._slots_unenforced = True
            log.warning("shared store unreachable: per-key concurrency limits are not enforced until it is back")
        return slot

    async def release_slot(self, slot: tuple[str, str]) -> None:
        if slot not in self.slots:
            return  # admitted while the store circuit was open: nothing was asked of the store
        self.slots.discard(slot)
        if self._store_closed():
            self._owe(KEY_SLOT, *slot)
            return
        sent = time.monotonic()
        try:
            await self.store.release_slot(*slot)
        except StateUnavailable:
            self._mark_store(False)
            self._owe(KEY_SLOT, *slot)
        except BaseException:
            self._owe(KEY_SLOT, *slot)
            raise
        else:
            self._answered(sent)

    # -- making good what the store may hold wrongly -------------------------------------------------

    def _owe(self, kind: str, name: str, lease_id: str) -> None:
        """Remember to give back a lease or slot the store may hold although nothing here does any more."""
        now = time.monotonic()
        key = (kind, name, lease_id)
        self.repairs.pop(key, None)
        self.repairs[key] = (now, now + self.settings.routing.lease_ttl_s)
        while len(self.repairs) > MAX_REPAIRS:
            self.repairs.popitem(last=False)
        self._repair_due.set()

    def _owe_route(self, request: RouteRequest) -> None:
        """A route call that failed may have taken its lease (request.lease_id) on any candidate."""
        for c in request.candidates:
            self._owe(NODE_LEASE, c.node_id, request.lease_id)

    def _settle(self, sent: Sequence[tuple[str, str, str]], proven: float) -> None:
        """Releases `sent` were answered. One is settled only if, when it was sent, a store call sent after it
        was owed had already been answered (`proven`): a Redis that stalled may run what was queued on
        several connections in any order when it wakes, but never a command sent after one of its answers
        before one that was waiting in its sockets then. The others are sent once more."""
        for key in sent:
            owed = self.repairs.get(key)
            if owed is not None and proven >= owed[0]:
                del self.repairs[key]

    async def _repair(self) -> None:
        """Send the releases owed (one round trip), dropping those whose lease has lapsed in the store anyway."""
        now = time.monotonic()
        while self.repairs and next(iter(self.repairs.values()))[1] <= now:  # oldest first: they lapse first
            self.repairs.popitem(last=False)
        batch = list(itertools.islice(self.repairs, REPAIR_BATCH))
        if not batch:
            return
        leases = [Lease(name, lease_id) for kind, name, lease_id in batch if kind == NODE_LEASE]
        slots = [(name, lease_id) for kind, name, lease_id in batch if kind == KEY_SLOT]
        proven = self._answered_at
        sent = time.monotonic()
        try:
            await self.store.release(leases, slots)
        except StateUnavailable:
            if self.store_ok:
                self._mark_store(False)  # while the circuit is open already, its backoff is the hot path's own
            return
        self._answered(sent)
        self._settle(batch, proven)

    async def _repair_loop(self) -> None:
        """Sends owed releases every REPAIR_INTERVAL_S until none is left, whatever the store circuit says
        (requests never wait for this), so they reach Redis at most that long after it answers again."""
        while True:
            await self._repair_due.wait()
            self._repair_due.clear()
            while self.repairs:
                try:
                    await self._repair()
                except Exception:  # a bug here must not stop the repairs for the life of the process
                    log.exception("giving back leases failed")
                if self.repairs:
                    await asyncio.sleep(REPAIR_INTERVAL_S)

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

    async def _report_progress(self) -> None:
        """Every REPORT_INTERVAL_S: what changed in the progress of requests older than that, one round trip
        (requests routed locally in degraded mode go to the local store). What the shared store could not
        take is sent again with the next round."""
        while True:
            await asyncio.sleep(REPORT_INTERVAL_S)
            due = self.progress.due(time.monotonic())
            local = [u for u in due if u[0] in self._local_leases]
            shared = [u for u in due if u[0] not in self._local_leases]
            try:
                if local:
                    await self.local_store.progress(local)
                if shared and self._store_closed():
                    self.progress.unsent(shared)
                elif shared:
                    await self.store.progress(shared)
            except StateUnavailable:
                self.progress.unsent(shared)
            except Exception:  # a bug here must not stop progress reports for the life of the process
                log.exception("reporting progress failed")

    async def _probe_store(self) -> None:
        """While in degraded mode: is the shared store back? (Requests find out too; this covers idle
        replicas, so /cluster and the logs say so without waiting for traffic.)"""
        sent = time.monotonic()
        try:
            await self.store.ping()
        except StateUnavailable:
            self._mark_store(False)
        else:
            self._answered(sent)

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
                    await self.refresh_views()
            except Exception:  # a bug here must not end health checking for the life of the process
                log.exception("health round failed")

    async def refresh_views(self) -> None:
        """What this replica derives from every node's shared outcome statistics, read once an interval:
        each pool's bytes per token (from the prompts its nodes reported), the latency order (for
        `latency-based`), and a warning for a node whose reports keep contradicting the cache model."""
        try:
            views = await self.store.node_views(list(self.cluster.nodes))
        except StateUnavailable:
            self._mark_store(False)
            return
        self.calibration = calibration(views, {n.id: n.pool for n in self.cluster.nodes.values()})
        if self.settings.routing.strategy == Strategy.LATENCY_BASED:
            self.latency_order = latency_order(views)
        for view in views:
            warning = belief_warning(view)
            if warning and view.node_id not in self._belief_warned:
                self._belief_warned.add(view.node_id)
                log.warning("node %s: %s", view.node_id, warning)

    def bytes_per_token(self, pool: str) -> float:
        return self.calibration.get(pool, DEFAULT_BYTES_PER_TOKEN)
