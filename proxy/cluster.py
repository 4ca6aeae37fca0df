"""This replica's view of its nodes: configs, HTTP clients and the last known health states.

The hot path reads only this local view (no I/O); `proxy.health` keeps the states fresh from
probes and from the shared store, so every replica converges on the same picture.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import httpx

from proxy.config import NodeConfig, TimeoutConfig
from proxy.upstream import NodeClient
from state.health import NodeHealth, cluster_status
from state.types import ROUTABLE_STATES, Candidate, NodeState


class Cluster:
    def __init__(
        self,
        nodes: Iterable[NodeConfig],
        timeouts: TimeoutConfig,
        transport: httpx.AsyncBaseTransport | None = None,
        pool_windows: Mapping[str, int] | None = None,
    ) -> None:
        self.timeouts = timeouts
        self._transport = transport
        self.pool_windows = dict(pool_windows or {})
        """Pool -> context window of its nodes that set none of their own (`[pools.NAME] context_window`)."""
        self.nodes: dict[str, NodeConfig] = {}
        self.clients: dict[str, NodeClient] = {}
        self.states: dict[str, NodeState] = {}
        self.draining: set[str] = set()
        for node in nodes:
            self.add(node)

    def add(self, node: NodeConfig) -> None:
        self.nodes[node.id] = node
        self.clients[node.id] = NodeClient(node, self.timeouts, self._transport)
        self.states.setdefault(node.id, NodeState.INITIALIZING)

    async def remove(self, node_id: str) -> None:
        self.nodes.pop(node_id, None)
        self.states.pop(node_id, None)
        self.draining.discard(node_id)
        client = self.clients.pop(node_id, None)
        if client is not None:
            await client.aclose()

    def prompt_order(self, pool: str) -> str:
        """How the pool's nodes render system prompt and tools (the first node's setting; one pool, one model)."""
        return next((n.prompt_order for n in self.nodes.values() if n.pool == pool), "system-first")

    def pools(self) -> list[str]:
        return sorted({n.pool for n in self.nodes.values()})

    def window(self, node: NodeConfig) -> int | None:
        """The node's context window in tokens (its own, else its pool's); None = not declared."""
        return node.context_window or self.pool_windows.get(node.pool)

    def holds(self, node: NodeConfig, tokens: int) -> bool:
        """The node's context window holds a prompt of `tokens` tokens (a node that declares none holds any)."""
        window = self.window(node)
        return window is None or tokens <= window

    def max_window(self, pool: str) -> int | None:
        """The largest context window among the pool's nodes, or None when any node declares none (or the
        pool has no nodes): a prompt over it fits no node of the pool."""
        windows = [self.window(n) for n in self.nodes.values() if n.pool == pool]
        if not windows or None in windows:
            return None
        return max(w for w in windows if w is not None)

    def candidates(self, pool: str, exclude: Iterable[str] = (), tokens: int = 0) -> tuple[Candidate, ...]:
        """Routable nodes of a pool in configured order: healthy or degraded, not draining, and holding a
        prompt of `tokens` tokens (a node that declares no context window holds any).

        A node is never used before a probe has passed (`initializing`): the gateway probes every node
        before it starts serving, and nodes added later are validated the same way.
        """
        excluded = self.draining.union(exclude)
        return tuple(
            Candidate(n.id, n.max_concurrency, n.cache_slots)
            for n in self.nodes.values()
            if n.pool == pool
            and n.id not in excluded
            and self.states.get(n.id) in ROUTABLE_STATES
            and self.holds(n, tokens)
        )

    def status(self) -> str:
        """Cluster status derived from node states: starting, healthy, degraded, critical, offline."""
        return cluster_status(
            [
                NodeHealth(state=self.states.get(n, NodeState.INITIALIZING), draining=n in self.draining)
                for n in self.nodes
            ]
        )

    async def aclose(self) -> None:
        for client in self.clients.values():
            await client.aclose()
