"""What a 503 says about a pool with no routable node, and which pools receive requests but have no node."""

from __future__ import annotations

import pytest

from proxy.pools import NodeLook, explain_unroutable, node_reason, pool_counts, pool_problems, referenced_pools
from state.types import NodeState

HAIKU = {"claude-*haiku*": "small"}
REFUSED = "node mac1: connection refused at http://10.0.0.5:8080 (no server listening on that port)"


@pytest.mark.parametrize(
    ("node", "reason"),
    [
        (NodeLook("mac2", "default", NodeState.HEALTHY, draining=True), "draining (mlxmux nodes undrain mac2)"),
        (
            NodeLook("mac1", "default", NodeState.UNHEALTHY, last_error=REFUSED),
            "unhealthy: connection refused at http://10.0.0.5:8080 (no server listening on that port)",
        ),
        (NodeLook("mac3", "default", NodeState.OFFLINE, last_error="node mac3 timed out"), "offline: timed out"),
        (NodeLook("mac4", "default"), "not probed yet (starting up)"),
        (
            NodeLook("mac5", "default", last_error="model 'qwen' is not served"),
            "first probes failing: model 'qwen' is not served",
        ),
        (NodeLook("mac6", "default", NodeState.UNHEALTHY), "unhealthy"),
    ],
)
def test_node_reason(node: NodeLook, reason: str) -> None:
    assert node_reason(node) == reason


def test_a_long_node_error_is_cut() -> None:
    reason = node_reason(NodeLook("m", "default", NodeState.UNHEALTHY, last_error="x" * 5000))
    assert len(reason) < 250 and reason.endswith("…")


@pytest.mark.parametrize(
    ("pool", "nodes", "models", "message"),
    [
        (
            "default",
            [
                NodeLook("mac1", "default", NodeState.UNHEALTHY, last_error=REFUSED),
                NodeLook("mac2", "default", NodeState.HEALTHY, draining=True),
            ],
            {},
            "no routable node in pool 'default' (mac1: unhealthy: connection refused at http://10.0.0.5:8080 (no "
            "server listening on that port); mac2: draining (mlxmux nodes undrain mac2)). "
            "Check the nodes with `mlxmux status`",
        ),
        (
            "small",
            [NodeLook("mac1", "default", NodeState.HEALTHY)],
            HAIKU,
            "no routable node: pool 'small' has no nodes (the model map sends claude-*haiku* there); add nodes "
            "with pool = 'small', or map those models to a pool that has nodes (default)",
        ),
        (
            "default",
            [NodeLook("mac1", "big", NodeState.HEALTHY)],
            {},
            "no routable node: pool 'default' has no nodes (requests no pattern matches go there); add nodes "
            "with pool = 'default', or map those models to a pool that has nodes (big)",
        ),
        (
            "default",
            [],
            {},
            "no routable node: the gateway has no nodes configured (add them with --node, MLXMUX_NODES, the "
            "config file or `mlxmux nodes add`)",
        ),
    ],
)
def test_explain_unroutable(pool: str, nodes: list[NodeLook], models: dict[str, str], message: str) -> None:
    assert explain_unroutable(pool, nodes, models) == message


def test_many_nodes_are_counted_not_all_named() -> None:
    nodes = [NodeLook(f"m{i}", "default", NodeState.OFFLINE) for i in range(10)]
    message = explain_unroutable("default", nodes, {})
    assert "m5: offline" in message and "m6" not in message and "and 4 more" in message


@pytest.mark.parametrize(
    ("models", "pools"),
    [
        ({}, ["default"]),
        (HAIKU, ["small", "default"]),
        ({"*": "big"}, ["big"]),  # a catch-all leaves nothing for default
        ({"claude-*": "big", "*": "default"}, ["big", "default"]),
    ],
)
def test_referenced_pools(models: dict[str, str], pools: list[str]) -> None:
    assert referenced_pools(models) == pools


@pytest.mark.parametrize(
    ("nodes", "models", "problems"),
    [
        ([NodeLook("mac1", "default")], {}, []),
        ([NodeLook("mac1", "default"), NodeLook("mini", "small")], HAIKU, []),
        (
            [NodeLook("mac1", "default")],
            HAIKU,
            [
                "pool 'small' has no nodes, but the model map sends claude-*haiku* there: those requests get 503 "
                "until a node with pool = 'small' is added"
            ],
        ),
        (
            [NodeLook("mac1", "big")],
            {},
            ["pool 'default' has no nodes: requests for models no [models] pattern matches get 503 (nodes are in big)"],
        ),
        ([NodeLook("mac1", "big")], {"*": "big"}, []),
        ([], HAIKU, ["no nodes configured: every request will get 503 until nodes are added"]),
    ],
)
def test_pool_problems(nodes: list[NodeLook], models: dict[str, str], problems: list[str]) -> None:
    assert pool_problems(nodes, models) == problems


def test_pool_counts_include_empty_pools_the_map_names() -> None:
    nodes = [NodeLook("mac1", "default", NodeState.HEALTHY), NodeLook("mac2", "default", NodeState.UNHEALTHY)]
    assert pool_counts(nodes, HAIKU) == {"small": {"nodes": 0, "routable": 0}, "default": {"nodes": 2, "routable": 1}}
