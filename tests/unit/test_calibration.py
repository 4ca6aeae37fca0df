"""Token counts follow the pool's own bytes per token, learned from its nodes' prompt_tokens reports."""

from __future__ import annotations

import json

import pytest

from proxy.translate import estimate_tokens, prompt_bytes
from proxy.views import MIN_CALIBRATION_TOKENS, belief_warning, calibration
from proxy.wire.anthropic import decode_messages_request
from state.cache_model import CacheCounters
from state.types import NodeStats, NodeView
from tests.claude_code_request import claude_code_request


def view(node: str, prompt_bytes: int, prompt_tokens: int) -> NodeView:
    cache = CacheCounters(prompt_bytes=prompt_bytes, prompt_tokens=prompt_tokens)
    return NodeView(node_id=node, inflight=0, sessions=0, stats=NodeStats(), cache=cache)


def test_each_pool_gets_the_ratio_of_its_own_nodes() -> None:
    views = [view("a", 30_000, 10_000), view("b", 10_000, 2_000), view("c", 2_000, 1_000), view("d", 900, 300)]
    pools = {"a": "big", "b": "big", "c": "small", "d": "tiny"}
    ratios = calibration(views, pools)
    assert ratios["big"] == pytest.approx(40_000 / 12_000)
    assert ratios["small"] == pytest.approx(2.0)
    assert "tiny" not in ratios  # fewer than MIN_CALIBRATION_TOKENS reported: the default stands
    assert MIN_CALIBRATION_TOKENS > 300


def test_the_estimate_uses_the_calibrated_ratio() -> None:
    req = decode_messages_request(json.dumps(claude_code_request("s", 2)).encode())
    size = prompt_bytes(req)
    assert estimate_tokens(req) == -(-size // 4)
    assert estimate_tokens(req, 2.5) == -(-size * 2 // 5)
    # what the real node counted for the same prompt is what the calibrated estimate gives back
    ratio = calibration([view("a", size, 12_345)], {"a": "p"})["p"]
    assert estimate_tokens(req, ratio) == 12_345


def test_a_node_whose_answers_keep_contradicting_the_router_is_named() -> None:
    def with_cache(**counters: int) -> NodeView:
        return NodeView(node_id="mac1", inflight=0, sessions=0, stats=NodeStats(), cache=CacheCounters(**counters))

    assert belief_warning(with_cache(reports=10, misses=10)) is None  # too few answers to judge
    healthy = with_cache(reports=40, misses=4, prompt_tokens=1000, predicted_tokens=800, reported_tokens=750)
    assert belief_warning(healthy) is None
    missed = belief_warning(with_cache(reports=40, misses=30))
    assert missed is not None and "30 of 40" in missed and "cache_slots" in missed
    blind = belief_warning(
        with_cache(reports=40, misses=0, prompt_tokens=1000, predicted_tokens=800, reported_tokens=300)
    )
    assert blind is not None and "80%" in blind and "30%" in blind and "prompt_order" in blind
