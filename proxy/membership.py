"""Which nodes this replica routes to: the config file, nodes added or removed at run time, discovery.

The set is rebuilt every health interval from three sources, merged by id and by URL (first wins):

1. the shared registry (`Store.registry`): nodes an operator added with `mlxmux nodes add` (or the
   admin API), and removal marks for nodes removed with `mlxmux nodes remove`, on every replica;
2. the static nodes of the config file and `--node`, unless the registry marks them removed;
3. nodes found by discovery (`proxy.discovery`: DNS or Kubernetes), polled by each replica.

Added nodes start `initializing` and take no traffic until a health probe (`GET /health`, then
`GET /v1/models`) has passed. A node that leaves the set is dropped from the local view, and its
bindings, prefix entries and health record are dropped from the store, so its sessions move at
their next turn.

Operator intent survives the store losing its data (a Redis restart without persistence, FLUSHALL):
each replica remembers the registry it last saw, and every sync writes back the entries the store no
longer has (`Store.restore_registry`, HSETNX: an entry present, perhaps newer, is never overwritten).
A change made while the store is unreachable is applied on this replica at once and written to the
shared registry when the store is back (`pending`).
"""

from __future__ import annotations

import contextlib
import logging
import time

import msgspec

from proxy.cluster import Cluster
from proxy.config import NodeConfig
from proxy.discovery import DiscoveryRunner, merge
from state.errors import StateUnavailable
from state.store import Store

log = logging.getLogger("mlxmux.nodes")


class RegistryEntry(msgspec.Struct, omit_defaults=True):
    """One node's entry in the shared registry (`{prefix}registry`)."""

    node: NodeConfig | None = None
    removed: bool = False


_entry = msgspec.json.Decoder(RegistryEntry)


def encode_entry(entry: RegistryEntry) -> bytes:
    return msgspec.json.encode(entry)


def desired_nodes(
    static: list[NodeConfig], registry: dict[str, RegistryEntry], discovered: list[NodeConfig]
) -> list[NodeConfig]:
    """The node set, pure: registry additions, then static nodes not removed, then discovered ones."""
    removed = {node_id for node_id, e in registry.items() if e.removed}
    added = [e.node for e in registry.values() if e.node is not None and not e.removed]
    kept = [n for n in static if n.id not in removed]
    return merge([*added, *kept, *(n for n in discovered if n.id not in removed)])


class Membership:
    def __init__(self, cluster: Cluster, store: Store, static: list[NodeConfig], discovery: DiscoveryRunner | None):
        self.cluster = cluster
        self.store = store
        self.static = static
        self.discovery = discovery
        self.registry: dict[str, RegistryEntry] = {}
        """The registry as this replica last saw it (or wrote it): the operator's intent, written back to
        the store when the store lost it."""
        self.pending: dict[str, RegistryEntry] = {}
        """Registry changes made while the shared store was unreachable, written when it is back."""
        self.discovery_interval_s = 10.0
        self._next_discovery = 0.0

    async def sync(self) -> None:
        """Bring the local node set in line with the sources; drop what left from the store."""
        try:
            await self._write_pending()
            raw = await self.store.registry()
            lost = {node_id: entry for node_id, entry in self.registry.items() if node_id not in raw}
            if lost:
                await self.store.restore_registry({node_id: encode_entry(e) for node_id, e in lost.items()})
                log.warning(
                    "the shared registry lost %d entries (%s): written back as this replica last saw them",
                    len(lost),
                    ", ".join(sorted(lost)),
                )
                raw = await self.store.registry()
            self.registry = _decode(raw)
        except StateUnavailable:
            pass  # keep the last registry seen
        discovered: list[NodeConfig] = []
        if self.discovery is not None:
            if time.monotonic() >= self._next_discovery:
                self._next_discovery = time.monotonic() + self.discovery_interval_s
                await self.discovery.refresh()
            discovered = self.discovery.nodes
        await self.apply(desired_nodes(self.static, self.registry, discovered))

    async def apply(self, nodes: list[NodeConfig]) -> None:
        wanted = {n.id: n for n in nodes}
        for node_id, current in list(self.cluster.nodes.items()):
            if node_id not in wanted or wanted[node_id] != current:
                await self.cluster.remove(node_id)
                if node_id not in wanted:
                    log.info("node %s removed (%s)", node_id, current.url)
                    with contextlib.suppress(StateUnavailable):
                        await self.store.remove_node(node_id)
        for node_id, node in wanted.items():
            if node_id not in self.cluster.nodes:
                self.cluster.add(node)
                log.info("node %s added (%s): initializing until a probe passes", node_id, node.url)

    async def add(self, node: NodeConfig) -> bool:
        """Add (or replace) a node on every replica. False if the shared store is unreachable: the node is
        added here now, and on the other replicas once the store is back and this replica has written it."""
        return await self._register(node.id, RegistryEntry(node=node))

    async def remove(self, node_id: str) -> bool:
        """Remove a node on every replica, with its bindings and prefix entries (False: as for `add`)."""
        return await self._register(node_id, RegistryEntry(removed=True))

    async def _register(self, node_id: str, entry: RegistryEntry) -> bool:
        self.registry[node_id] = entry
        self.pending[node_id] = entry
        try:
            await self._write_pending()
            shared = True
        except StateUnavailable:
            log.warning(
                "shared store unreachable: node %s changed on this replica only, for now; the change goes to the"
                " shared registry when the store is back",
                node_id,
            )
            shared = False
        await self.sync()
        return shared

    async def _write_pending(self) -> None:
        """Write the changes made while the store was unreachable (HSET: the operator's latest word wins)."""
        for node_id, entry in list(self.pending.items()):
            await self.store.register_node(node_id, encode_entry(entry))
            if entry.removed:
                await self.store.remove_node(node_id)
            if self.pending.get(node_id) == entry:
                del self.pending[node_id]


def _decode(raw: dict[str, bytes]) -> dict[str, RegistryEntry]:
    registry = {}
    for node_id, data in raw.items():
        try:
            registry[node_id] = _entry.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("ignoring a registry entry for %s that is not valid", node_id)
    return registry
