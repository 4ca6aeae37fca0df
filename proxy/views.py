"""What a replica derives from every node's shared outcome statistics, read once a health interval
(`Gateway.refresh_views`): each pool's bytes per token (for token estimates and context windows), the
latency order (for `latency-based`), and whether a node's answers keep contradicting the router's model of
its cache. Pure."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from state.types import NodeView

BELIEF_MIN_REPORTS = 20
"""Answers a node needs before the router judges its belief about the node's cache (`belief_warning`)."""


def belief_warning(view: NodeView) -> str | None:
    """Why routing to this node is flying blind, when its answers keep contradicting the router's model of
    its cache: most answers missed what the router expected (wrong cache_slots, prompt_order, or other
    clients on the node), or the node reuses far less than expected."""
    c = view.cache
    if c.reports < BELIEF_MIN_REPORTS:
        return None
    if c.misses * 2 > c.reports:
        return (
            f"{c.misses} of {c.reports} answers reused less than the router expected: check that cache_slots "
            "matches its --prompt-cache-size, that prompt_order matches its chat template, and that nothing "
            "else sends it requests (docs/routing.md)"
        )
    if c.prompt_tokens and c.predicted_tokens - c.reported_tokens > 0.2 * c.prompt_tokens:
        return (
            f"the router expected {c.predicted_tokens / c.prompt_tokens:.0%} of its prompt tokens cached, it "
            f"reported {c.reported_tokens / c.prompt_tokens:.0%}: check prompt_order and cache_slots (docs/routing.md)"
        )
    return None


MIN_CALIBRATION_TOKENS = 1000
"""Reported prompt tokens a pool needs before its own ratio replaces the default."""


def calibration(views: Sequence[NodeView], pools: Mapping[str, str]) -> dict[str, float]:
    """Pool -> bytes per token over its nodes' reported prompts (pools with too few reports left out)."""
    sums: dict[str, tuple[int, int]] = {}
    for v in views:
        pool = pools.get(v.node_id)
        if pool is not None:
            b, t = sums.get(pool, (0, 0))
            sums[pool] = (b + v.cache.prompt_bytes, t + v.cache.prompt_tokens)
    return {pool: b / t for pool, (b, t) in sums.items() if t >= MIN_CALIBRATION_TOKENS and b > 0}


def latency_order(views: Sequence[NodeView]) -> tuple[str, ...]:
    """Node ids for `latency-based`: nodes not measured yet first (so they get measured), then by
    shared p50 time to first token, fastest first."""
    unmeasured = [v.node_id for v in views if v.stats.ttft_p50_ms is None]
    measured = sorted((v for v in views if v.stats.ttft_p50_ms is not None), key=lambda v: v.stats.ttft_p50_ms or 0.0)
    return (*unmeasured, *(v.node_id for v in measured))
