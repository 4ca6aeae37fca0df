"""Cluster routing over real processes: a real redis-server, three gateway replicas, sim nodes whose
prompt caches cannot hold every session, and a team of Claude-Code-shaped sessions, judged by the
nodes' own counters."""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import pytest
import redis

from tests.claude_code_request import claude_code_request
from tests.procs import Proc, gateway, sim_node
from tests.team import FAST_SIM, NodeReport, gateways, node_report, reset_nodes, run_team

pytestmark = pytest.mark.slow

SESSIONS, TURNS, CACHE = 12, 6, 5  # 12 sessions, 3 nodes x 5 cache entries: only a good placement fits them


@pytest.fixture(scope="module")
def sims() -> Iterator[list[Proc]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(sim_node("--prompt-cache-size", str(CACHE), *FAST_SIM)) for _ in range(3)]


def team_report(sims: list[Proc], redis_url: str | None, strategy: str, prefix: str) -> tuple[NodeReport, float]:
    """The nodes' own counters, and the cached share of turns 2 and later as the client saw it."""
    reset_nodes(sims)
    with gateways(sims, redis_url, strategy=strategy, count=3 if redis_url else 1, key_prefix=prefix) as replicas:
        result = asyncio.run(run_team([r.url for r in replicas], sessions=SESSIONS, turns=TURNS))
    assert result.errors == []
    assert result.requests == SESSIONS * TURNS
    report = node_report(sims)
    assert report.prompt_tokens == result.input_tokens  # the client saw what the nodes counted
    assert report.cached_tokens == result.cache_read_tokens
    return report, result.later_cached_share


def test_team_sessions_stay_on_one_node_and_hit_the_cache(sims: list[Proc], redis_url: str) -> None:
    # The best any placement can do: one node whose cache holds every conversation.
    with sim_node("--prompt-cache-size", "200", *FAST_SIM) as big:
        best, best_later = team_report([big], None, "cache-aware", "best:")
    aware, aware_later = team_report(sims, redis_url, "cache-aware", "aware:")
    rr, rr_later = team_report(sims, redis_url, "round-robin", "rr:")
    rand, rand_later = team_report(sims, redis_url, "random", "random:")
    print(
        f"\ncached share: best {best.cached_share:.3f}  cache-aware {aware.cached_share:.3f}  "
        f"round-robin {rr.cached_share:.3f}  random {rand.cached_share:.3f}"
        f"\nturns 2+: best {best_later:.3f}  cache-aware {aware_later:.3f}  round-robin {rr_later:.3f}  "
        f"random {rand_later:.3f}"
    )
    # Every session stayed on one node, though each turn went through another replica.
    assert len(aware.nodes_per_session) == SESSIONS
    assert aware.sessions_split == []
    # Sessions were spread, not piled on the node that first held the shared tools prefix.
    assert max(aware.requests_per_node.values()) <= 5 * TURNS
    # Near the best possible on the turns placement decides (first turns all start at once, so whether
    # they find the shared tools prefix depends on which finished first, on the bound's node too: the
    # whole-run bound swung from 0.78 to 0.87 between runs), far above the baselines (which scatter every
    # session).
    assert aware_later >= best_later - 0.04
    assert aware_later >= rr_later + 0.10
    assert aware_later >= rand_later + 0.10
    # Round-robin scatters sessions (not always every one: 12 sessions in lockstep on 3 nodes can hand a
    # session the same node turn after turn; one run kept 1 of 12 together).
    assert len(rr.sessions_split) >= SESSIONS // 2


def test_simultaneous_first_turns_of_one_session_land_on_one_node(sims: list[Proc], redis_url: str) -> None:
    # 15 at once: under the node's overload threshold (max_concurrency 8 x overload_factor 2), past
    # which a session is meant to move.
    reset_nodes(sims)
    session = "race-0000-4000-8000-000000000000"
    body = claude_code_request(session, 1, max_tokens=16, stream=False)
    with gateways(sims, redis_url, count=3, key_prefix="race:") as replicas:

        async def burst() -> list[int]:
            async with httpx.AsyncClient(timeout=60) as client:
                return [
                    r.status_code
                    for r in await asyncio.gather(
                        *(
                            client.post(
                                replicas[i % 3].url + "/v1/messages",
                                json=body,
                                headers={"x-claude-code-session-id": session, "anthropic-version": "2023-06-01"},
                            )
                            for i in range(15)
                        )
                    )
                ]

        assert asyncio.run(burst()) == [200] * 15
    report = node_report(sims)
    assert report.nodes_per_session.keys() == {session}
    assert len(report.nodes_per_session[session]) == 1, report.nodes_per_session
    assert sum(report.requests_per_node.values()) == 15
    # The one binding in Redis names that node (node ids are node0..2 in the order of `sims`).
    (node,) = report.nodes_per_session[session]
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        keys = list(r.scan_iter("race:session:*"))
        assert len(keys) == 1
        bound = r.get(keys[0])
    finally:
        r.close()
    assert httpx.get(sims[int(str(bound).removeprefix("node"))].url + "/_sim/stats", timeout=5).json()["id"] == node


def test_native_anthropic_node_is_passed_through_and_routed() -> None:
    with (
        sim_node("--anthropic", *FAST_SIM) as native,
        contextlib.ExitStack() as stack,
    ):
        config = stack.enter_context(
            _config(f'[[nodes]]\nid = "native"\nurl = "{native.url}"\nprotocol = "anthropic"\n')
        )
        gw = stack.enter_context(gateway(extra=["--config", config]))
        client = stack.enter_context(anthropic.Anthropic(base_url=gw.url, api_key="x", max_retries=0))
        body = claude_code_request("native-0000-4000-8000-000000000000", 2, max_tokens=32, stream=False)
        kwargs = {k: body[k] for k in ("model", "messages", "system", "tools", "max_tokens", "metadata")}
        message = client.messages.create(**kwargs)
        assert message.model == body["model"]  # the client's name, not the node's
        assert message.content and message.stop_reason in {"end_turn", "max_tokens"}
        with client.messages.stream(**kwargs) as stream:
            final = stream.get_final_message()
        assert final.usage.cache_read_input_tokens  # the second identical prompt hit the node's cache
        stats = httpx.get(native.url + "/_sim/stats", timeout=5).json()
        assert stats["messages_requests"] == stats["requests"] == 2
        nodes = httpx.get(gw.url + "/cluster", timeout=5).json()["nodes"]
        assert [(n["id"], n["state"]) for n in nodes] == [("native", "healthy")]
        # a native node counts tokens itself: count_tokens is its exact answer, not the gateway's estimate
        counted = client.messages.count_tokens(model=body["model"], messages=body["messages"], tools=body["tools"])
        direct = httpx.post(
            native.url + "/v1/messages/count_tokens",
            json={"messages": body["messages"], "tools": body["tools"]},
            timeout=5,
        ).json()["input_tokens"]
        assert counted.input_tokens == direct
        assert httpx.get(native.url + "/_sim/stats", timeout=5).json()["requests"] == 2  # counting is no request


@contextlib.contextmanager
def _config(text: str) -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="mlxmux-cfg-") as d:
        path = Path(d) / "mlxmux.toml"
        path.write_text(text)
        yield str(path)
