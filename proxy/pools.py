"""Pools as an operator sees them: which pools the model map and the nodes name, which of them cannot serve
a request, and why a pool has no routable node.

A 503 that says only "no routable node" sends the operator hunting; Claude Code shows its message after
minutes of its own retries (`API Error: 503 …`), so the message itself names each node of the pool and
what is wrong with it ("mac1: connection refused at http://10.0.0.5:8080", "mac2: draining"), or that
the pool has no node at all and which model-map pattern sends requests there.

The functions here are pure, over `NodeLook`s (plain data); `looks()` takes them from the replica's view.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from proxy.cluster import Cluster
from proxy.errors import ClusterUnavailable
from state.health import NodeHealth
from state.types import ROUTABLE_STATES, NodeState

DEFAULT_POOL = "default"
MAX_NAMED = 6
"""Nodes named one by one in a 503; the others are counted (the message is read in a terminal)."""
MAX_REASON = 200
"""Characters of one node's last error in a 503 (a node's 5xx page can be long)."""


@dataclass(frozen=True, slots=True)
class NodeLook:
    """What the replica knows of one node, as far as routing to it goes."""

    id: str
    pool: str
    state: NodeState = NodeState.INITIALIZING
    draining: bool = False
    last_error: str = ""

    @property
    def routable(self) -> bool:
        return self.state in ROUTABLE_STATES and not self.draining


def looks(cluster: Cluster, records: Mapping[str, NodeHealth], tokens: int = 0) -> list[NodeLook]:
    """The replica's view of every node (with `tokens`: of those whose context window holds that many), in
    configured order."""
    return [
        NodeLook(
            id=node_id,
            pool=node.pool,
            state=cluster.states.get(node_id, NodeState.INITIALIZING),
            draining=node_id in cluster.draining,
            last_error=records[node_id].last_error if node_id in records else "",
        )
        for node_id, node in cluster.nodes.items()
        if cluster.holds(node, tokens)
    ]


def patterns_by_pool(models: Mapping[str, str]) -> dict[str, list[str]]:
    """Pool -> the model-map patterns that send requests there, in the map's order."""
    found: dict[str, list[str]] = {}
    for pattern, pool in models.items():
        found.setdefault(pool, []).append(pattern)
    return found


def referenced_pools(models: Mapping[str, str]) -> list[str]:
    """Pools requests can be sent to: every pool the model map names, and `default` (where unmatched models
    go) unless a catch-all `*` pattern leaves nothing unmatched."""
    pools = list(dict.fromkeys(models.values()))
    if "*" not in models and DEFAULT_POOL not in pools:
        pools.append(DEFAULT_POOL)
    return pools


def node_reason(node: NodeLook) -> str:
    """Why one node takes no request, in a few words: `draining`, its last error, or its state."""
    if node.draining:
        return "draining (mlxmux nodes undrain " + node.id + ")"
    error = without_node_id(node.id, node.last_error)
    if len(error) > MAX_REASON:
        error = error[: MAX_REASON - 1] + "…"
    if node.state == NodeState.INITIALIZING:
        return f"first probes failing: {error}" if error else "not probed yet (starting up)"
    return f"{node.state}: {error}" if error else str(node.state)


def without_node_id(node_id: str, error: str) -> str:
    """A node's error without the `node ID` it starts with, where the text around it names the node already."""
    for prefix in (f"node {node_id}: ", f"node {node_id} "):
        if error.startswith(prefix):
            return error[len(prefix) :]
    return error


def explain_unroutable(pool: str, nodes: Sequence[NodeLook], models: Mapping[str, str], tokens: int = 0) -> str:
    """The message of a 503 for `pool`: what is wrong with each of its nodes, or that it has none (with
    `tokens`: `nodes` are those whose window holds a prompt that long, and the others are up)."""
    members = [n for n in nodes if n.pool == pool]
    if tokens:
        named = "; ".join(f"{n.id}: {node_reason(n)}" for n in members[:MAX_NAMED])
        return (
            f"no routable node in pool {pool!r} holds a prompt of {tokens} tokens: the nodes whose context_window "
            f"does cannot take it now ({named}). Retry later, or /compact the conversation"
        )
    if not nodes:
        return (
            "no routable node: the gateway has no nodes configured "
            "(add them with --node, MLXMUX_NODES, the config file or `mlxmux nodes add`)"
        )
    if not members:
        patterns = patterns_by_pool(models).get(pool)
        why = f"the model map sends {', '.join(patterns)} there" if patterns else "requests no pattern matches go there"
        others = ", ".join(sorted({n.pool for n in nodes}))
        return (
            f"no routable node: pool {pool!r} has no nodes ({why}); add nodes with pool = {pool!r}, "
            f"or map those models to a pool that has nodes ({others})"
        )
    named = "; ".join(f"{n.id}: {node_reason(n)}" for n in members[:MAX_NAMED])
    more = f"; and {len(members) - MAX_NAMED} more" if len(members) > MAX_NAMED else ""
    return f"no routable node in pool {pool!r} ({named}{more}). Check the nodes with `mlxmux status`"


def unavailable(
    cluster: Cluster,
    records: Mapping[str, NodeHealth],
    pool: str,
    models: Mapping[str, str],
    retry_after: float,
    tokens: int = 0,
) -> ClusterUnavailable:
    """The 503 `cluster_unavailable` for a pool with no routable node (that holds `tokens`), saying why."""
    message = explain_unroutable(pool, looks(cluster, records, tokens), models, tokens)
    return ClusterUnavailable(message, retry_after=retry_after)


def pool_problems(nodes: Sequence[NodeLook], models: Mapping[str, str]) -> list[str]:
    """Pools requests are sent to that have no node at all: one line each, for the start-up log, /ready and
    `mlxmux status`. With no node anywhere, that one line."""
    if not nodes:
        return ["no nodes configured: every request will get 503 until nodes are added"]
    have = {n.pool for n in nodes}
    patterns = patterns_by_pool(models)
    problems = []
    for pool in referenced_pools(models):
        if pool in have:
            continue
        if pool in patterns:
            sent = ", ".join(patterns[pool])
            problems.append(
                f"pool {pool!r} has no nodes, but the model map sends {sent} there: "
                f"those requests get 503 until a node with pool = {pool!r} is added"
            )
        else:
            problems.append(
                f"pool {pool!r} has no nodes: requests for models no [models] pattern matches get 503 "
                f"(nodes are in {', '.join(sorted(have))})"
            )
    return problems


def pool_counts(nodes: Iterable[NodeLook], models: Mapping[str, str]) -> dict[str, dict[str, int]]:
    """Pool -> {"nodes": n, "routable": r}, for every pool that has nodes or receives requests."""
    counts = {pool: {"nodes": 0, "routable": 0} for pool in referenced_pools(models)}
    for n in nodes:
        entry = counts.setdefault(n.pool, {"nodes": 0, "routable": 0})
        entry["nodes"] += 1
        entry["routable"] += n.routable
    return counts
