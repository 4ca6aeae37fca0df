"""Health of the nodes, shared by every replica: probes, request outcomes, drain, and the local view.

A probe is `GET /health` (mlx_lm.server, llama-server) and then `GET /v1/models`, which every node
type serves and which confirms the configured model is loaded. Each round (every
`health.interval_s`), a replica reads every node's shared record (`Store.health`, one round trip),
and probes the nodes it wins the probe lease of (`Store.claim_probe`: one replica per node per
interval, so adding replicas does not multiply probes) and whose breaker allows a probe. Results,
and the failures of real requests, change the shared record by compare-and-set through the pure
transitions of `state.health`; every replica copies the records into its `Cluster` view, which
the hot path reads without I/O.

Without the shared store (Redis down) the same runs against the replica's local memory store:
each replica then probes every node itself. The local store starts from the records this replica
last saw (drains included), and drains asked for meanwhile are written to the shared store when it
is back (`pending_drains`).

The store losing its data (a Redis restart without persistence, FLUSHALL) changes nothing a client
sees: a node whose shared record vanished keeps, in this replica's view, the record it last had (it
was healthy a second ago; probes decide from there, not from `initializing`, which is unroutable),
and the next round writes that record back, by compare-and-set on version 0, so only the first
replica to do it writes and the others read its record. The replicas also notice the loss itself
through the store's epoch (`Store.epoch`), and then re-assert the drains they last saw even where a
replica that knows nothing (one started after the loss) has already written a fresh record.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import secrets
import time
from collections.abc import Callable

import msgspec

from proxy.cluster import Cluster
from proxy.config import HealthConfig, redact_url
from proxy.errors import LoopDetected
from proxy.upstream import NodeFailure, node_error_message
from state.errors import StateUnavailable
from state.health import Breaker, HealthPolicy, NodeHealth, on_probe, on_request, probe_due, set_draining, start_trial
from state.store import Store

log = logging.getLogger("mlxmux.health")

CAS_ATTEMPTS = 8


def now_ms() -> int:
    """Wall-clock milliseconds: records are shared, so every replica must use the same clock."""
    return time.time_ns() // 1_000_000


def _models_listed(body: bytes) -> set[str] | None:
    """The model ids of a `/v1/models` answer, or None when the body is no model list at all (empty,
    cut, not JSON, another shape): that says nothing about the model. mlx_lm.server 0.32 sends 200
    headers and an empty body when `~/.cache/huggingface/hub` does not exist, while serving fine."""
    try:
        data = msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        return None
    return {str(m.get("id")) for m in data["data"] if isinstance(m, dict)}


def policy_of(config: HealthConfig) -> HealthPolicy:
    return HealthPolicy(
        fail_threshold=config.fail_threshold,
        pass_threshold=config.pass_threshold,
        request_fail_threshold=config.request_fail_threshold,
        open_ms=int(config.open_s * 1000),
        max_backoff_ms=int(config.max_backoff_s * 1000),
        offline_after_ms=int(config.offline_after_s * 1000),
    )


class HealthMonitor:
    def __init__(self, cluster: Cluster, store: Store, local: Store, config: HealthConfig, replica_id: str) -> None:
        self.cluster = cluster
        self.store = store
        self.local = local
        self.config = config
        self.policy = policy_of(config)
        self.replica_id = replica_id
        self.records: dict[str, NodeHealth] = {}
        """Every node's record as this replica last saw it; kept when the store loses it, and written back."""
        self.drains: dict[str, bool] = {}
        """The drain flag of each node as last read from the shared store (or set here): the operator's
        intent, re-asserted when the store lost its data."""
        self.pending_drains: dict[str, bool] = {}
        """Drains and undrains asked for while the shared store was unreachable, written when it is back."""
        self.epoch: str | None = None
        """The shared store's epoch as last seen; another one means the store lost its data since."""
        self.shared = True
        """False while the shared store is unreachable (health is then kept per replica)."""
        self.on_store_error: Callable[[], object] = lambda: None
        """Called for each failed shared-store operation (the gateway counts them in its metrics)."""

    # -- probes ----------------------------------------------------------------------------------

    async def probe(self, node_id: str) -> str | None:
        """None if the node answers both probes properly, else why not."""
        client = self.cluster.clients[node_id]
        node = self.cluster.nodes[node_id]
        try:
            status, body = await client.get("/health", timeout=self.config.timeout_s)
            if status == LoopDetected.status:  # the URL leads to a gateway, maybe this one (proxy.loop)
                words = node_error_message(status, body)
                return f"node {node_id}: {redact_url(node.url)} is an mlxmux gateway: {words}"
            # Nodes without /health (vLLM answers 200, LM Studio 404) are judged by /v1/models alone.
            if status >= 500:
                return f"/health answered {status}"
            status, body = await client.get("/v1/models", timeout=self.config.timeout_s)
        except NodeFailure as exc:
            return exc.message
        if status != 200:
            return f"/v1/models answered {status}"
        # Only a real list that lacks the model is a mismatch; an empty or unreadable 200 can't tell.
        listed = _models_listed(body)
        if node.model is not None and listed is not None and node.model not in listed:
            return f"model {node.model!r} is not served"
        return None

    async def round(self, *, everyone: bool = False) -> None:
        """One health round: read the shared records, probe what is ours to probe, publish, refresh.

        `everyone`: probe every node whose breaker allows it, leases or not (a replica starting up must
        not serve with an empty view while another replica's probe is still under way).
        """
        try:
            await self._round(self.store, everyone)
            self._set_shared(True)
        except StateUnavailable:
            await self._go_local()
            await self._round(self.local, everyone)

    async def _round(self, store: Store, everyone: bool = False) -> None:
        records = await (self._reassert() if store is self.store else store.health())
        now = now_ms()
        ttl_ms = max(1, int(self.config.interval_s * 1000) - 50)
        due = [n for n in list(self.cluster.nodes) if probe_due(records.get(n, NodeHealth()), now)]
        claimed = [n for n in due if everyone or await store.claim_probe(n, self.replica_id, ttl_ms)]
        await asyncio.gather(*(self._probe_and_record(store, n, records.get(n, NodeHealth())) for n in claimed))
        self._apply(await store.health())

    async def _reassert(self) -> dict[str, NodeHealth]:
        """Start of a shared round: write back what the store lost, and drains asked for while it was
        unreachable; then remember the drains it holds. Returns the shared records."""
        epoch = await self.store.epoch(secrets.token_hex(8))
        lost = self.epoch is not None and epoch != self.epoch
        if lost:
            log.warning("the shared store lost its data: writing back the drains and node health this replica knows")
        records = await self.store.health()
        written = []
        for node_id in list(self.cluster.nodes):
            drain = self.pending_drains.get(node_id)
            if drain is None and lost and self.drains.get(node_id):
                drain = True
            if drain is not None:
                await self._change(self.store, node_id, functools.partial(set_draining, draining=drain))
                self.pending_drains.pop(node_id, None)
            elif node_id not in records and self.records.get(node_id, NodeHealth()).version > 0:
                await self._change(self.store, node_id, lambda h: h)  # written back as last seen
            else:
                continue
            written.append(node_id)
        if written:
            log.info("node health re-asserted in the shared store for %s", ", ".join(written))
            records = await self.store.health()
        self.drains.update({node_id: record.draining for node_id, record in records.items()})
        self.epoch = epoch
        return records

    async def _go_local(self) -> None:
        """The shared store is unreachable: keep health in the local store, which starts from the records
        this replica last saw (not from nothing, where every node is `initializing` and drains are lost,
        nor from what it held in an earlier outage)."""
        if self.shared:
            held = await self.local.health()
            for node_id, record in self.records.items():
                old = held.get(node_id)
                version = old.version if old is not None else 0
                await self.local.cas_health(node_id, msgspec.structs.replace(record, version=version))
        self._set_shared(False)

    async def _probe_and_record(self, store: Store, node_id: str, record: NodeHealth) -> None:
        if record.breaker == Breaker.OPEN:
            await self._change(store, node_id, start_trial)
        error = await self.probe(node_id)
        if node_id in self.cluster.nodes:
            await self._change(store, node_id, lambda h: on_probe(h, error, self.policy, now_ms(), random.random()))

    # -- changing a record -----------------------------------------------------------------------

    async def _change(self, store: Store, node_id: str, change: Callable[[NodeHealth], NodeHealth]) -> NodeHealth:
        """Apply `change` to the node's shared record by compare-and-set, retrying on conflicts."""
        record = NodeHealth()
        for _ in range(CAS_ATTEMPTS):
            stored = (await store.health()).get(node_id)
            record = stored if stored is not None else self._remembered(node_id)
            new = change(record)
            if new == record and (stored is not None or record == NodeHealth()):
                break
            if node_id not in self.cluster.nodes:
                break  # removed meanwhile: write nothing back
            if await store.cas_health(node_id, new):
                record = msgspec.structs.replace(new, version=new.version + 1)
                self._log_change(node_id, self.records.get(node_id), record)
                break
        if record.version > 0 or node_id not in self.records:  # a failed write-back keeps the memory
            self.records[node_id] = record
        self._apply_one(node_id, record)
        return record

    def _remembered(self, node_id: str) -> NodeHealth:
        """The record to start from when the store has none: the one this replica last saw (the store lost
        it; version 0, so that only the first replica to write it back does), else a new node's."""
        known = self.records.get(node_id)
        if known is None or known.version == 0:
            return NodeHealth()
        return msgspec.structs.replace(known, version=0, draining=self.drains.get(node_id, known.draining))

    async def change(self, node_id: str, change: Callable[[NodeHealth], NodeHealth]) -> NodeHealth:
        try:
            record = await self._change(self.store, node_id, change)
            self._set_shared(True)
            return record
        except StateUnavailable:
            await self._go_local()
            return await self._change(self.local, node_id, change)

    async def report_request(self, node_id: str, failure: NodeFailure | None, ttft_ms: float = 0.0) -> None:
        """A real request ended on this node. Successes cost no I/O unless they heal a node (or were
        slower to the first token than `slow_first_token_s`, which degrades it). A failure the node did not
        cause (`NodeFailure.blames_node` false: its 4xx, the gateway's own errors, a full connection pool)
        changes nothing: it neither counts against the node nor, being no answer, heals it."""
        if node_id not in self.cluster.nodes:
            return
        if failure is not None and not failure.blames_node:
            return
        slow_s = self.config.slow_first_token_s
        if failure is None and slow_s > 0 and ttft_ms > slow_s * 1000:
            message = f"first token after {ttft_ms / 1000:.0f} s (slow_first_token_s is {slow_s:g})"
            await self.change(node_id, lambda h: on_request(h, "slow", message, self.policy, now_ms()))
            return
        current = self.records.get(node_id, NodeHealth())
        if failure is None and on_request(current, None, "", self.policy, 0) == current:
            return
        kind = failure.kind if failure is not None else None
        message = failure.message if failure is not None else ""
        await self.change(node_id, lambda h: on_request(h, kind, message, self.policy, now_ms(), random.random()))

    async def set_draining(self, node_id: str, draining: bool) -> NodeHealth:
        """Drain or undrain a node on every replica. With the shared store unreachable, this replica
        drains it now and writes the flag to the shared record when the store is back (`shared` False)."""
        self.drains[node_id] = draining
        record = await self.change(node_id, lambda h: set_draining(h, draining))
        if self.shared:
            self.pending_drains.pop(node_id, None)
        else:
            self.pending_drains[node_id] = draining
        return record

    # -- the local view ----------------------------------------------------------------------------

    def _apply(self, records: dict[str, NodeHealth]) -> None:
        for gone in [n for n in self.records if n not in self.cluster.nodes]:
            del self.records[gone]
            self.drains.pop(gone, None)
            self.pending_drains.pop(gone, None)
        for node_id in list(self.cluster.nodes):
            # A record the store lost keeps its last state here (the next round writes it back).
            record = records.get(node_id, self.records.get(node_id, NodeHealth()))
            self._log_change(node_id, self.records.get(node_id), record)
            self.records[node_id] = record
            self._apply_one(node_id, record)

    def _apply_one(self, node_id: str, record: NodeHealth) -> None:
        if node_id in self.cluster.nodes:
            self.cluster.states[node_id] = record.state
            if record.draining:
                self.cluster.draining.add(node_id)
            else:
                self.cluster.draining.discard(node_id)

    def _log_change(self, node_id: str, old: NodeHealth | None, new: NodeHealth) -> None:
        if old is None or old.state != new.state or old.draining != new.draining:
            before = "-" if old is None else f"{old.state}{' (draining)' if old.draining else ''}"
            why = f": {new.last_error}" if new.last_error and new.state != "healthy" else ""
            log.info("node %s: %s -> %s%s%s", node_id, before, new.state, " (draining)" if new.draining else "", why)

    def _set_shared(self, ok: bool) -> None:
        if not ok:
            self.on_store_error()
        if ok != self.shared:
            log.warning("node health %s", "shared again" if ok else "kept locally: the shared store is unreachable")
        self.shared = ok

    def last_error(self, node_id: str) -> str:
        return self.records.get(node_id, NodeHealth()).last_error
