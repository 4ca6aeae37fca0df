"""Redis fails over under a team of sessions, over real processes: a primary, a replica and three sentinels
(`redis-server --sentinel`), three sim nodes, three `mlxmux serve` replicas given the `redis+sentinel://` URL,
and Claude-Code-shaped sessions through the official SDK, each turn through the next replica.

The primary is killed mid-traffic. The sentinels promote the replica; every gateway replica routes through
it again (docs/operations.md#redis-with-sentinel states the bound); no turn fails, since degraded mode
covers the gap; every session stays on its node; and the state on the new primary is whole: the bindings
point where the sessions were served, no lease is left behind, the data was not lost (same epoch), and the
routing scripts, which a replica never holds, were loaded there by the gateways."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import anthropic
import httpx
import pytest

from state.keys import escape_pool
from state.redis_store import _script_source
from tests.claude_code_request import claude_code_request, sdk_kwargs
from tests.procs import Proc, SentinelSet, redis_sentinels, sim_node
from tests.team import FAST_SIM, add_turn, gateways

pytestmark = [pytest.mark.slow, pytest.mark.redis]

SESSIONS = 6
BEFORE, AFTER = 3, 2
"""Turns every session makes before the kill (so each gateway replica has routed it once and remembers its
binding for degraded mode), and after every replica routes through the new primary again."""
PREFIX = "failover:"
PASSWORD = "failover-pw"
SHARED_ROUTE = "mlxmux_requests_total"
FOLLOW_LIMIT_S = 60.0
"""Generous: the documented bound is STORE_MAX_BACKOFF_S (5 s) plus one health interval (here 1 s) after
the sentinels name the new primary; this only catches a replica that never follows."""


@dataclass
class Traffic:
    """Turns of every session, as the client saw them."""

    turns: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    after: Counter[str] = field(default_factory=Counter)
    """Turns made after `resumed` was set."""
    resumed: asyncio.Event = field(default_factory=asyncio.Event)


def session_id(s: int) -> str:
    return f"fo-{s:03d}-0000-4000-8000-000000000000"


async def converse(urls: list[str], s: int, traffic: Traffic) -> None:
    """One session: a turn at a time, each through the next replica, until it has made AFTER turns past
    `traffic.resumed`."""
    sid = session_id(s)
    clients = [anthropic.AsyncAnthropic(base_url=u, api_key="team", max_retries=0, timeout=60) for u in urls]
    body = claude_code_request(sid, 1, max_tokens=32)
    history: list[dict[str, object]] = []
    try:
        t = 0
        while traffic.after[sid] < AFTER:
            t += 1
            resumed = traffic.resumed.is_set()
            add_turn(history, sid, t, file_lines=10)
            body["messages"] = history
            try:
                async with clients[(s + t) % len(clients)].messages.stream(**sdk_kwargs(body, sid)) as stream:
                    final = await stream.get_final_message()
                content = [b.model_dump(exclude_none=True) for b in final.content]
                history.append({"role": "assistant", "content": content})
            except anthropic.APIError as exc:
                traffic.errors.append(f"{sid} turn {t}: {exc!r}")
                history.append({"role": "assistant", "content": "(interrupted)"})
            traffic.turns[sid] += 1
            if resumed:
                traffic.after[sid] += 1
            await asyncio.sleep(0.1)  # a moment between turns, as a tool run takes
    finally:
        for c in clients:
            await c.close()


async def wait_for(check, what: str, timeout: float = 60.0) -> float:
    """Poll `check` (blocking, run in a thread) until true; returns the monotonic time it first was."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.05)
    return time.monotonic()


def store_reachable(replica: Proc) -> bool:
    return bool(httpx.get(replica.url + "/cluster", timeout=5).json()["store_reachable"])


def metric(replicas: list[Proc], name: str, **labels: str) -> float:
    """The sum over replicas of one Prometheus sample (`name{labels}`)."""
    want = {f'{k}="{v}"' for k, v in labels.items()}
    total = 0.0
    for replica in replicas:
        for line in httpx.get(replica.url + "/metrics", timeout=5).text.splitlines():
            head, _, value = line.rpartition(" ")
            sample, _, label_text = head.partition("{")
            if sample == name and want <= set(re.findall(r'\w+="[^"]*"', label_text)):
                total += float(value)
    return total


@pytest.fixture
def team() -> Iterator[tuple[SentinelSet, list[Proc], list[Proc]]]:
    with contextlib.ExitStack() as stack:
        sentinels = stack.enter_context(redis_sentinels(password=PASSWORD))
        sims = [stack.enter_context(sim_node("--prompt-cache-size", "5", *FAST_SIM)) for _ in range(3)]
        replicas = stack.enter_context(gateways(sims, sentinels.url(), count=3, key_prefix=PREFIX))
        yield sentinels, sims, replicas


def test_killing_the_redis_primary_fails_no_turn_and_moves_no_session(
    team: tuple[SentinelSet, list[Proc], list[Proc]],
) -> None:
    sentinels, sims, replicas = team
    old, new = sentinels.primary, sentinels.replicas[0]
    route_sha = hashlib.sha1(_script_source("route").encode()).hexdigest()
    traffic = Traffic()
    times: dict[str, float] = {}
    epoch: list[str] = []
    shared_routes: list[float] = []
    """Per gateway replica, the requests it had routed by a binding read from the store when all had followed."""

    async def operator() -> None:
        await wait_for(lambda: all(traffic.turns[session_id(s)] >= BEFORE for s in range(SESSIONS)), "first turns")
        with contextlib.closing(sentinels.server(old.port)) as r:
            epoch.append(r.get(PREFIX + "epoch"))
        with contextlib.closing(sentinels.server(new.port)) as r:
            assert r.script_exists(route_sha) == [False]  # a replica never holds the primary's scripts
        times["kill"] = time.monotonic()
        await asyncio.to_thread(old.kill)  # SIGKILL, mid-traffic
        times["promoted"] = await wait_for(lambda: sentinels.primary_port() == new.port, "promotion")
        for i, replica in enumerate(replicas):
            times[f"follow{i}"] = await wait_for(lambda r=replica: store_reachable(r), "follow", FOLLOW_LIMIT_S)
        shared_routes.extend([await asyncio.to_thread(metric, [r], SHARED_ROUTE, reason="session") for r in replicas])
        traffic.resumed.set()

    async def run() -> None:
        urls = [r.url for r in replicas]
        await asyncio.gather(operator(), *(converse(urls, s, traffic) for s in range(SESSIONS)))

    asyncio.run(run())
    promoted = times["promoted"] - times["kill"]
    follow = max(times[f"follow{i}"] for i in range(len(replicas))) - times["promoted"]
    degraded = metric(replicas, SHARED_ROUTE, reason="degraded-binding")
    print(
        f"\npromoted {promoted:.2f}s after the kill; every gateway replica shared again {follow:.2f}s later; "
        f"{sum(traffic.turns.values())} turns, {degraded:.0f} routed in degraded mode"
    )

    # No turn failed, and every session made its turns after the failover too.
    assert traffic.errors == []
    assert all(traffic.after[session_id(s)] == AFTER for s in range(SESSIONS))
    # The outage was real and degraded mode carried it: sessions routed by the bindings each replica had seen,
    # none by the fallback hash (which could have moved them).
    assert degraded > 0
    assert metric(replicas, SHARED_ROUTE, reason="degraded-hash") == 0
    # Every gateway replica routed by the new primary's bindings after the failover.
    after = [metric([r], SHARED_ROUTE, reason="session") for r in replicas]
    assert all(a > b for a, b in zip(after, shared_routes, strict=True)), (shared_routes, after)
    assert metric(replicas, "mlxmux_store_shared") == len(replicas)
    logs = [r.output() for r in replicas]
    assert any("degraded mode" in log for log in logs)
    assert all("the shared store lost its data" not in log for log in logs)

    # Every session was served by one node alone, and its binding on the new primary names that node.
    served: dict[str, set[str]] = {}
    for i, sim in enumerate(sims):
        for sid in httpx.get(sim.url + "/_sim/stats", timeout=5).json()["per_conversation"]:
            served.setdefault(sid, set()).add(f"node{i}")
    assert set(served) == {session_id(s) for s in range(SESSIONS)}
    assert {sid: len(nodes) for sid, nodes in served.items() if len(nodes) > 1} == {}
    with contextlib.closing(sentinels.server(new.port)) as r:
        assert r.info("replication")["role"] == "master"
        assert r.script_exists(route_sha) == [True]  # loaded on the new primary by the NOSCRIPT path
        assert [r.get(PREFIX + "epoch")] == epoch  # the data survived: no replica re-asserted anything
        for sid, nodes in served.items():
            assert {r.get(f"{PREFIX}session:{escape_pool('default')}:{sid}")} == nodes, sid
        health = r.hgetall(PREFIX + "node-health")
        assert sorted(health) == ["node0", "node1", "node2"]
        assert all('"state":"healthy"' in record for record in health.values()), health

        def no_live_leases() -> bool:
            now_ms = int(float(r.time()[0]) * 1000)
            return all(r.zcount(f"{PREFIX}node:node{i}:leases", f"({now_ms}", "+inf") == 0 for i in range(3))

        # Leases taken on the old primary whose release failed are given back by id on the new one.
        asyncio.run(wait_for(no_live_leases, "leases released", timeout=30))
