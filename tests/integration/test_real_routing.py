"""Routing from what a real mlx_lm.server holds: the router's model of the node's cache follows the
`cached_tokens` the node reports (state/cache_model.py), over real processes and sockets.

One real node with `--prompt-cache-size 2`, configured in the gateway as holding 3 (as an operator might
get it wrong), and three conversations: the third evicts the first. The router, which believes the
node holds all three, must learn otherwise from the node's answer to the first one's next turn (a miss),
learn the node's real capacity, and from then on expect what the node really reuses.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest

from tests.integration.test_real_node import GREEDY, MODEL, RealNode, access_lines, cluster, gateway_for, real_nodes
from tests.procs import Proc
from tests.realnode import sample_text

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_node(tiny_model: Path) -> Iterator[list[RealNode]]:
    with real_nodes(tiny_model, ("mac1", True, ("--prompt-cache-size", "2"))) as started:
        yield started


@pytest.fixture(scope="module")
def small_gw(tiny_model: Path, small_node: list[RealNode]) -> Iterator[Proc]:
    with gateway_for(tiny_model, small_node, node_config="cache_slots = 3\n") as g:
        yield g


class Conversation:
    def __init__(self, name: str, seed: int) -> None:
        self.headers = {"x-claude-code-session-id": f"real-routing-{name}"}
        self.system = f"You are agent {name}.\n" + sample_text(2500, seed=seed)
        self.messages: list[dict[str, Any]] = []
        self.seed = seed

    def turn(self, client: anthropic.Anthropic) -> anthropic.types.Usage:
        self.messages.append({"role": "user", "content": sample_text(150, seed=self.seed * 100 + len(self.messages))})
        with client.messages.stream(
            model=MODEL, max_tokens=4, **GREEDY, system=self.system, messages=self.messages, extra_headers=self.headers
        ) as stream:
            final = stream.get_final_message()
        reply = "".join(b.text for b in final.content if b.type == "text") or "ok"
        self.messages.append({"role": "assistant", "content": reply})
        return final.usage


def belief(gw: Proc) -> dict[str, Any]:
    (node,) = cluster(gw)["nodes"]
    return dict(node["cache"])


def test_the_router_learns_what_the_node_evicted(small_gw: Proc) -> None:
    with anthropic.Anthropic(base_url=small_gw.url, api_key="k", max_retries=0, timeout=60) as client:
        a, b, c = Conversation("a", 1), Conversation("b", 2), Conversation("c", 3)
        for conv in (a, b, c):
            conv.turn(client)
        before = belief(small_gw)
        assert before["misses"] == 0
        # a's entry was the oldest of three on a node that keeps two: the node evicted it
        usage = a.turn(client)
        after = belief(small_gw)
        assert (usage.cache_read_input_tokens or 0) < 100  # the node's own word: it held (almost) nothing
        assert after["misses"] == 1
        predicted = after["predicted_tokens"] - before["predicted_tokens"]
        assert predicted > 500  # the router had expected a's first turn to be there
        assert (after["capacity"], after["cache_slots"]) == (2, 3)  # learned: the node holds two entries
        assert after["entries"] <= 2
        # from now on the router expects what the node really reuses
        before = after
        usage = a.turn(client)
        after = belief(small_gw)
        reported = usage.cache_read_input_tokens or 0
        predicted = after["predicted_tokens"] - before["predicted_tokens"]
        assert after["misses"] == 1
        assert reported > 500
        assert abs(predicted - reported) <= max(8, reported // 20), (predicted, reported)
    lines = access_lines(small_gw)
    assert [line["status"] for line in lines] == [200] * 5
    assert {line["reason"] for line in lines[3:]} == {"session"}
