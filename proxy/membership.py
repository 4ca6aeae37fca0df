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
        self.discovery_interval_s = 10.0
        self._next_discovery = 0.0

    async def sync(self) -> None:
        """Bring the local node set in line with the sources; drop what left from the store."""
        try:
            raw = await self.store.registry()
            registry = {}
            for node_id, data in raw.items():
                try:
                    registry[node_id] = _entry.decode(data)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    log.warning("ignoring a registry entry for %s that is not valid", node_id)
            self.registry = registry
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

    async def add(self, node: NodeConfig) -> None:
        """Add (or replace) a node on every replica."""
        await self.store.register_node(node.id, encode_entry(RegistryEntry(node=node)))
        self.registry[node.id] = RegistryEntry(node=node)
        await self.sync()

    async def remove(self, node_id: str) -> None:
        """Remove a node on every replica, with its bindings and prefix entries."""
        await self.store.register_node(node_id, encode_entry(RegistryEntry(removed=True)))
        self.registry[node_id] = RegistryEntry(removed=True)
        await self.store.remove_node(node_id)
        await self.sync()
