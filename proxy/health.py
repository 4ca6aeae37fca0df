"""Active health probes of nodes, keeping `Cluster.states` and the shared store current.

A probe is `GET /health` (mlx_lm.server, llama-server) and then `GET /v1/models`, which every
node type serves and which confirms the configured model is loaded. Thresholds come from
`HealthConfig`: `fail_threshold` failed probes in a row make a node unhealthy, `pass_threshold`
passes make it healthy again. A failed connect on a real request marks the node unhealthy at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import msgspec

from proxy.cluster import Cluster
from proxy.config import HealthConfig
from proxy.upstream import NodeFailure
from state.errors import StateUnavailable
from state.store import Store
from state.types import NodeState

log = logging.getLogger("mlxmux.health")


def next_state(state: NodeState, passes: int, fails: int, config: HealthConfig) -> NodeState:
    """Pure transition after a probe: `passes`/`fails` are the current consecutive counts."""
    if passes >= config.pass_threshold:
        return NodeState.HEALTHY
    if fails >= config.fail_threshold:
        return NodeState.UNHEALTHY
    if fails > 0 and state == NodeState.HEALTHY:
        return NodeState.DEGRADED
    return state


def _models_listed(body: bytes) -> set[str]:
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return set()
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        return set()
    return {str(m.get("id")) for m in data["data"] if isinstance(m, dict)}


class HealthMonitor:
    def __init__(self, cluster: Cluster, store: Store, config: HealthConfig) -> None:
        self.cluster = cluster
        self.store = store
        self.config = config
        self._passes: dict[str, int] = {}
        self._fails: dict[str, int] = {}
        self.last_error: dict[str, str] = {}

    async def probe(self, node_id: str) -> str | None:
        """None if the node answers both probes properly, else why not."""
        client = self.cluster.clients[node_id]
        node = self.cluster.nodes[node_id]
        try:
            status, _ = await client.get("/health", timeout=self.config.timeout_s)
            # Nodes without /health (vLLM answers 200, LM Studio 404) are judged by /v1/models alone.
            if status >= 500:
                return f"/health answered {status}"
            status, body = await client.get("/v1/models", timeout=self.config.timeout_s)
        except NodeFailure as exc:
            return exc.message
        if status != 200:
            return f"/v1/models answered {status}"
        if node.model is not None and node.model not in _models_listed(body):
            return f"model {node.model!r} is not served"
        return None

    async def _set(self, node_id: str, state: NodeState) -> None:
        old = self.cluster.states.get(node_id)
        if old == state:
            return
        self.cluster.states[node_id] = state
        log.info("node %s: %s -> %s", node_id, old, state)
        with contextlib.suppress(StateUnavailable):
            await self.store.set_node_state(node_id, state)

    async def check(self, node_id: str) -> None:
        error = await self.probe(node_id)
        if node_id not in self.cluster.nodes:
            return
        if error is None:
            self._passes[node_id] = self._passes.get(node_id, 0) + 1
            self._fails[node_id] = 0
            self.last_error.pop(node_id, None)
        else:
            self._fails[node_id] = self._fails.get(node_id, 0) + 1
            self._passes[node_id] = 0
            self.last_error[node_id] = error
        state = self.cluster.states.get(node_id, NodeState.INITIALIZING)
        await self._set(node_id, next_state(state, self._passes[node_id], self._fails[node_id], self.config))

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(n) for n in list(self.cluster.nodes)))

    async def report_failure(self, node_id: str, failure: NodeFailure) -> None:
        """A real request failed on this node: unreachable nodes leave rotation at once."""
        if failure.kind == "connect" and node_id in self.cluster.nodes:
            self._passes[node_id] = 0
            self._fails[node_id] = max(self._fails.get(node_id, 0), self.config.fail_threshold)
            self.last_error[node_id] = failure.message
            await self._set(node_id, NodeState.UNHEALTHY)

    async def run(self) -> None:
        while True:
            try:
                await self.check_all()
            except Exception:  # a probe bug must not end probing for the life of the process
                log.exception("health check round failed")
            await asyncio.sleep(self.config.interval_s)
