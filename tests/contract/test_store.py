"""One test class, run against MemoryStore and RedisStore on a real redis-server: both must behave the same."""

from __future__ import annotations

import asyncio
import collections

import msgspec
import pytest

from state.cache_model import CacheReport
from state.health import NodeHealth
from state.memory import MemoryStore
from state.redis_store import RedisStore
from state.store import Store
from state.types import (
    Candidate,
    CostWeights,
    Decision,
    Lease,
    NodeState,
    Outcome,
    RouteRequest,
    Strategy,
)
from tests.contract.conftest import StoreFactory

pytestmark = pytest.mark.anyio

NODES = (Candidate("mac1"), Candidate("mac2"), Candidate("mac3"))
TOOLS = tuple(f"tools-{i}" for i in range(8))


def prompt(name: str, n: int, *, tools: bool = True) -> tuple[str, ...]:
    """Block hashes of a prompt: the shared tools blocks, then n blocks of its own."""
    own = tuple(f"{name}-{i}" for i in range(n))
    return (TOOLS + own) if tools else own


def req(
    blocks: tuple[str, ...] = (),
    session: str | None = None,
    *,
    candidates: tuple[Candidate, ...] = NODES,
    strategy: Strategy = Strategy.CACHE_AWARE,
    **kw: object,
) -> RouteRequest:
    return RouteRequest(
        pool="qwen",
        candidates=candidates,
        blocks=blocks,
        session=session,
        strategy=strategy,
        **kw,  # type: ignore[arg-type]
    )


async def view(store: Store, node: str) -> tuple[int, int]:
    (v,) = await store.node_views([node])
    return v.inflight, v.sessions


class TestStore:
    # -- session bindings ------------------------------------------------------------------------

    async def test_binding_is_honoured_and_refreshed_on_use(self, store: Store) -> None:
        first = await store.route(req(prompt("s", 2), "s", session_ttl_ms=600))
        assert first.bound and first.reason in ("prefix", "cold")
        for _ in range(3):  # 3 x 0.25 s > the 0.6 s TTL, but each use refreshes it
            await asyncio.sleep(0.25)
            again = await store.route(req(prompt("other", 3, tools=False), "s", session_ttl_ms=600))
            assert (again.node_id, again.reason, again.bound) == (first.node_id, "session", True)
        (binding,) = await store.sessions()
        assert (binding.pool, binding.session, binding.node_id) == ("qwen", "s", first.node_id)
        assert 0 < binding.ttl_ms <= 600
        await asyncio.sleep(0.7)  # idle for longer than the TTL: the binding lapses
        assert await store.sessions() == []
        assert await view(store, first.node_id) == (4, 0)
        later = await store.route(req(prompt("unrelated", 2, tools=False), "s"))
        assert later.reason != "session"

    async def test_rebind_when_the_node_is_no_longer_a_candidate(self, store: Store) -> None:
        first = await store.route(req(prompt("s", 2), "s"))
        others = tuple(c for c in NODES if c.node_id != first.node_id)
        moved = await store.route(req(prompt("s", 3), "s", candidates=others))
        assert moved.reason == "rebind-unavailable" and moved.bound
        assert moved.node_id != first.node_id
        back = await store.route(req(prompt("s", 4), "s"))  # the old node is back: the session stays moved
        assert (back.node_id, back.reason) == (moved.node_id, "session")
        assert await view(store, first.node_id) == (1, 0)
        assert await view(store, moved.node_id) == (2, 1)

    async def test_rebind_only_when_far_over_capacity(self, store: Store) -> None:
        nodes = tuple(Candidate(c.node_id, max_concurrency=1) for c in NODES)
        weights = CostWeights(overload_factor=2.0)
        first = await store.route(req(prompt("s", 2), "s", candidates=nodes, weights=weights))
        second = await store.route(req(prompt("s", 3), "s", candidates=nodes, weights=weights))
        assert (second.node_id, second.reason) == (first.node_id, "session")  # 1 in flight < 1 x 2
        third = await store.route(req(prompt("s", 4), "s", candidates=nodes, weights=weights))
        assert third.reason == "rebind-overloaded" and third.node_id != first.node_id
        assert (await view(store, first.node_id))[1] == 0

    async def test_no_rebind_when_every_node_is_overloaded(self, store: Store) -> None:
        (only,) = NODES[:1]
        one = (Candidate(only.node_id, max_concurrency=1),)
        decisions = [await store.route(req(prompt("s", 2), "s", candidates=one)) for _ in range(4)]
        assert [d.reason for d in decisions[1:]] == ["session"] * 3

    async def test_first_writer_wins_under_a_burst(self, make_stores: StoreFactory) -> None:
        replicas = await make_stores(5)
        roomy = tuple(Candidate(c.node_id, max_concurrency=1000) for c in NODES)
        for trial in range(3):
            session = f"burst-{trial}"
            decisions = await asyncio.gather(
                *(replicas[i % 5].route(req(prompt(session, 2), session, candidates=roomy)) for i in range(50))
            )
            assert len({d.node_id for d in decisions}) == 1
            assert all(d.bound for d in decisions)
            assert sum(d.reason == "session" for d in decisions) == 49
            assert len({d.lease.lease_id for d in decisions}) == 50
            views = await replicas[0].node_views([c.node_id for c in NODES])
            assert sum(v.sessions for v in views) == trial + 1

    async def test_no_session_no_binding(self, store: Store) -> None:
        decisions = [await store.route(req(prompt(f"p{i}", 2))) for i in range(5)]
        assert not any(d.bound for d in decisions)
        assert await store.sessions() == []

    async def test_unbind(self, store: Store) -> None:
        first = await store.route(req(prompt("s", 2), "s"))
        await store.unbind("qwen", "s")
        assert await store.sessions() == []
        assert (await view(store, first.node_id))[1] == 0
        await store.unbind("qwen", "never-bound")

    async def test_pools_with_colons_keep_their_bindings_apart(self, store: Store) -> None:
        await store.route(RouteRequest(pool="qwen3:30b", candidates=NODES[:1], session="x"))
        await store.route(RouteRequest(pool="qwen3", candidates=NODES[1:2], session="30b:x"))
        listed = sorted((b.pool, b.session, b.node_id) for b in await store.sessions())
        assert listed == [("qwen3", "30b:x", "mac2"), ("qwen3:30b", "x", "mac1")]

    # -- leases ------------------------------------------------------------------------------------

    async def test_leases_are_counted_and_released(self, store: Store) -> None:
        one = NODES[:1]
        decisions = [await store.route(req(candidates=one, lease_id=f"l{i}")) for i in range(3)]
        assert [d.lease for d in decisions] == [Lease("mac1", f"l{i}") for i in range(3)]
        assert await view(store, "mac1") == (3, 0)
        await store.finish(decisions[0].lease, Outcome(ok=True))
        await store.finish(decisions[0].lease, Outcome(ok=True))  # twice: no harm
        assert await view(store, "mac1") == (2, 0)

    async def test_expired_leases_are_not_counted_and_renew_keeps_them(self, store: Store) -> None:
        one = NODES[:1]
        kept = await store.route(req(candidates=one, lease_ttl_ms=300))
        await store.route(req(candidates=one, lease_ttl_ms=300))
        assert await view(store, "mac1") == (2, 0)
        await asyncio.sleep(0.15)
        await store.renew([kept.lease], 1000)
        await asyncio.sleep(0.3)
        assert await view(store, "mac1") == (1, 0)  # the other replica "died": its lease lapsed
        await store.finish(kept.lease, Outcome(ok=True))
        await store.renew([kept.lease], 1000)  # renewing a released lease does not bring it back
        assert await view(store, "mac1") == (0, 0)

    async def test_a_store_makes_up_lease_ids(self, store: Store) -> None:
        a = await store.route(req(candidates=NODES[:1]))
        b = await store.route(req(candidates=NODES[:1]))
        assert a.lease.lease_id and a.lease.lease_id != b.lease.lease_id

    # -- team-key slots (fair share) -----------------------------------------------------------------

    async def test_slots_are_limited_across_replicas_and_released(self, make_stores: StoreFactory) -> None:
        a, b = await make_stores(2)
        assert await a.acquire_slot("alice", "a1", 2, 10_000)
        assert await b.acquire_slot("alice", "b1", 2, 10_000)
        assert not await a.acquire_slot("alice", "a2", 2, 10_000)  # 2 in flight, wherever they run
        assert await a.acquire_slot("alice", "a1", 2, 10_000)  # a held lease id is only renewed
        assert await b.acquire_slot("bob", "b2", 2, 10_000)  # per key
        await b.release_slot("alice", "a1")
        await b.release_slot("alice", "a1")  # twice: no harm
        await a.release_slot("carol", "never-held")
        assert await a.acquire_slot("alice", "a2", 2, 10_000)
        assert not await b.acquire_slot("alice", "b3", 2, 10_000)

    async def test_slots_of_a_dead_replica_expire_and_renew_keeps_them(self, store: Store) -> None:
        assert await store.acquire_slot("alice", "kept", 2, 300)
        assert await store.acquire_slot("alice", "dead", 2, 300)
        await asyncio.sleep(0.15)
        await store.renew_slots([("alice", "kept"), ("bob", "never-held")], 1000)
        assert not await store.acquire_slot("alice", "new", 2, 300)
        await asyncio.sleep(0.3)  # "dead" was not renewed: its slot lapsed
        assert await store.acquire_slot("alice", "new", 2, 300)
        assert not await store.acquire_slot("alice", "third", 2, 300)  # "kept" still holds one
        await store.release_slot("alice", "kept")
        await store.renew_slots([("alice", "kept")], 1000)  # a released slot is not brought back
        assert await store.acquire_slot("alice", "third", 2, 300)
        await store.renew_slots([], 1000)

    # -- prefix affinity ---------------------------------------------------------------------------

    async def test_prefix_affinity_without_a_session(self, store: Store) -> None:
        placed = {}
        for i in range(6):  # sessions spread the conversations over the nodes
            d = await store.route(req(prompt(f"conv{i}", 4, tools=False), f"s{i}"))
            placed[i] = d.node_id
        assert len(set(placed.values())) > 1
        for i, node in placed.items():  # the next turn, sent with no session id, finds its node
            d = await store.route(req(prompt(f"conv{i}", 6, tools=False)))
            assert (d.node_id, d.reason, d.matched_blocks, d.total_blocks, d.bound) == (node, "prefix", 4, 6, False)

    async def test_predicted_placement_gathers_a_burst_of_siblings(self, make_stores: StoreFactory) -> None:
        replicas = await make_stores(3)
        parent = prompt("parent", 20)
        first = await replicas[0].route(req(parent))
        siblings = [await replicas[i % 3].route(req((*parent, f"child{i}"))) for i in range(3)]
        assert {d.node_id for d in siblings} == {first.node_id}
        assert all(d.matched_blocks == len(parent) for d in siblings)

    async def test_forget_prefix(self, store: Store) -> None:
        first = await store.route(req(prompt("a", 4, tools=False)))
        await store.forget_prefix(first.node_id, prompt("a", 4, tools=False)[2:])
        again = await store.route(req(prompt("a", 4, tools=False)))
        assert again.matched_blocks == 2
        await store.forget_prefix(first.node_id, [])

    async def test_prefix_entries_expire(self, make_stores: StoreFactory) -> None:
        (store,) = await make_stores(prefix_ttl_ms=300)
        await store.route(req(prompt("a", 4)))
        await asyncio.sleep(0.4)
        again = await store.route(req(prompt("a", 4)))
        assert (again.reason, again.matched_blocks) == ("cold", 0)

    async def test_crowding_spreads_sessions_that_share_the_tools_prefix(self, store: Store) -> None:
        nodes = tuple(Candidate(c.node_id, cache_slots=2) for c in NODES)
        placed = []
        for i in range(6):
            d = await store.route(req(prompt(f"s{i}", 2), f"s{i}", candidates=nodes, weights=CostWeights(spread=0)))
            await store.finish(d.lease, Outcome(ok=True))
            placed.append(d.node_id)
        assert placed[0] == placed[1]  # the tools prefix draws the second session to the first's node...
        assert collections.Counter(placed) == {n.node_id: 2 for n in nodes}  # ...until its cache is full
        assert [v.sessions for v in await store.node_views([n.node_id for n in nodes])] == [2, 2, 2]

    async def test_prefix_index_is_bounded_per_node(self, make_stores: StoreFactory) -> None:
        (store,) = await make_stores(max_blocks_per_node=50)
        one = (Candidate("mac1", cache_slots=100),)
        for i in range(30):  # 30 prompts x 20 blocks = 600 blocks for a 50-block model
            await store.route(req(prompt(f"p{i}", 20, tools=False), candidates=one))
            assert await held_blocks(store, "mac1") <= 50
        assert await held_blocks(store, "mac1") == 40  # whole entries go, least recently used first
        newest = await store.route(req(prompt("p29", 20, tools=False), candidates=one))
        oldest = await store.route(req(prompt("p0", 20, tools=False), candidates=one))
        assert newest.matched_blocks == 20
        assert oldest.matched_blocks == 0

    async def test_entries_are_capped_by_cache_slots(self, store: Store) -> None:
        one = (Candidate("mac1", cache_slots=3),)
        for i in range(5):
            p = prompt(f"p{i}", 4)
            d = await store.route(req(p, candidates=one))
            await answer(store, d, p, cached=8 * TOKENS_PER_BLOCK * (i > 0), slots=3)
        (v,) = await store.node_views(["mac1"])
        assert v.cache.entries == 3
        assert (await store.route(req(prompt("p1", 4), candidates=one))).matched_blocks == 8  # the tools only
        assert (await store.route(req(prompt("p4", 4), candidates=one))).matched_blocks == 12

    async def test_a_huge_prompt_is_matched_and_recorded_on_its_first_blocks(self, make_stores: StoreFactory) -> None:
        (store,) = await make_stores(max_request_blocks=16)
        d = await store.route(req(prompt("huge", 5000), "s"))
        assert (d.matched_blocks, d.total_blocks) == (0, 16)
        again = await store.route(req(prompt("huge", 6000), "s"))
        assert (again.reason, again.matched_blocks, again.total_blocks) == ("session", 16, 16)
        assert await held_blocks(store, d.node_id) == 16

    # -- the baselines -----------------------------------------------------------------------------

    async def test_round_robin_cycles_across_calls_and_replicas(self, make_stores: StoreFactory) -> None:
        replicas = await make_stores(3)
        nodes = [
            (await replicas[i % 3].route(req(prompt("same", 4), "same", strategy=Strategy.ROUND_ROBIN))).node_id
            for i in range(7)
        ]
        assert nodes == ["mac1", "mac2", "mac3", "mac1", "mac2", "mac3", "mac1"]
        other_pool = await replicas[0].route(
            RouteRequest(pool="other", candidates=NODES, strategy=Strategy.ROUND_ROBIN)
        )
        assert other_pool.node_id == "mac1"  # counters are per pool
        assert await replicas[0].sessions() == []  # baselines never bind

    async def test_least_loaded(self, store: Store) -> None:
        nodes = (Candidate("mac1"), Candidate("mac2", max_concurrency=8), Candidate("mac3"))
        for node, n in (("mac1", 2), ("mac2", 3), ("mac3", 3)):
            for _ in range(n):
                await store.route(req(candidates=tuple(c for c in nodes if c.node_id == node)))
        d = await store.route(req(prompt("x", 4), candidates=nodes, strategy=Strategy.LEAST_LOADED))
        assert (d.node_id, d.reason) == ("mac2", "least-loaded")  # 3 of 8 beats 2 of 4

    async def test_latency_and_random(self, store: Store) -> None:
        fast = await store.route(req(strategy=Strategy.LATENCY_BASED, latency_order=("mac3", "mac1")))
        assert (fast.node_id, fast.reason) == ("mac3", "latency")
        picks = [(await store.route(req(strategy=Strategy.RANDOM, random_pick=p))).node_id for p in (0.1, 0.5, 0.9)]
        assert picks == ["mac1", "mac2", "mac3"]

    # -- outcomes, nodes ---------------------------------------------------------------------------

    async def test_outcomes_show_in_node_views(self, make_stores: StoreFactory) -> None:
        replicas = await make_stores(2, latency_samples=3)
        one = NODES[:1]
        outcomes = [
            Outcome(ok=True, ttft_ms=900.0, total_ms=9000.0, prompt_tokens=1000, cached_tokens=0),
            Outcome(ok=True, ttft_ms=100.0, total_ms=1000.0, prompt_tokens=1000, cached_tokens=900),
            Outcome(ok=True, ttft_ms=300.0, total_ms=3000.0, prompt_tokens=1000, cached_tokens=950),
            Outcome(ok=True, ttft_ms=200.5, total_ms=2000.0, prompt_tokens=1000, cached_tokens=990),
            Outcome(ok=False, error_class="timeout", prompt_tokens=10),
            Outcome(ok=False, error_class="timeout"),
            Outcome(ok=False, error_class="http_5xx"),
            Outcome(ok=False, error_class="client_cancel"),
        ]
        for i, outcome in enumerate(outcomes):
            d = await replicas[i % 2].route(req(candidates=one))
            await replicas[(i + 1) % 2].finish(d.lease, outcome)
        (v,) = await replicas[0].node_views(["mac1"])
        assert (v.node_id, v.inflight, v.sessions) == ("mac1", 0, 0)
        s = v.stats
        assert (s.ok, s.errors, s.cancelled) == (4, 3, 1)
        assert s.error_classes == {"timeout": 2, "http_5xx": 1, "client_cancel": 1}
        assert s.ttft_p50_ms == 200.5  # of the 3 most recent: 100, 300, 200.5
        assert s.total_p50_ms == 2000.0
        assert (s.prompt_tokens, s.cached_tokens) == (4010, 2840)
        (fresh,) = await replicas[1].node_views(["never-seen"])
        assert (fresh.inflight, fresh.sessions, fresh.stats.ok, fresh.stats.ttft_p50_ms) == (0, 0, 0, None)
        assert await replicas[0].node_views([]) == []

    async def test_health_records_are_compare_and_set(self, make_stores: StoreFactory) -> None:
        a, b = await make_stores(2)
        assert await a.health() == {}
        healthy = NodeHealth(state=NodeState.HEALTHY)
        assert await a.cas_health("mac1", healthy)  # version 0 = no record yet
        assert not await b.cas_health("mac1", healthy)  # b read "no record" too: it lost
        (seen,) = (await b.health()).values()
        assert (seen.state, seen.version) == (NodeState.HEALTHY, 1)
        assert await b.cas_health("mac1", msgspec.structs.replace(seen, state=NodeState.DEGRADED, draining=True))
        assert not await a.cas_health("mac1", msgspec.structs.replace(seen, state=NodeState.UNHEALTHY))
        await a.cas_health("mac2", NodeHealth(state=NodeState.UNHEALTHY, last_error="refused"))
        records = await a.health()
        assert {n: (r.state, r.draining, r.version) for n, r in records.items()} == {
            "mac1": (NodeState.DEGRADED, True, 2),
            "mac2": (NodeState.UNHEALTHY, False, 1),
        }
        assert records["mac2"].last_error == "refused"

    async def test_concurrent_health_writers_lose_nothing(self, make_stores: StoreFactory) -> None:
        """Replicas counting failures at once through read-modify-CAS loops: every increment lands."""
        stores = await make_stores(3)

        async def bump(store: Store) -> None:
            while True:
                current = (await store.health()).get("mac1", NodeHealth())
                if await store.cas_health("mac1", msgspec.structs.replace(current, fails=current.fails + 1)):
                    return

        await asyncio.gather(*(bump(stores[i % 3]) for i in range(30)))
        assert (await stores[0].health())["mac1"].fails == 30

    async def test_probe_lease_goes_to_one_replica_per_interval(self, make_stores: StoreFactory) -> None:
        a, b = await make_stores(2)
        assert await a.claim_probe("mac1", "replica-a", 300)
        assert await a.claim_probe("mac1", "replica-a", 300)  # the holder keeps it
        assert not await b.claim_probe("mac1", "replica-b", 300)
        assert await b.claim_probe("mac2", "replica-b", 300)  # per node
        await asyncio.sleep(0.4)
        assert await b.claim_probe("mac1", "replica-b", 300)  # expired: someone else probes
        assert not await a.claim_probe("mac1", "replica-a", 300)

    async def test_registry(self, make_stores: StoreFactory) -> None:
        a, b = await make_stores(2)
        assert await a.registry() == {}
        await a.register_node("mac9", b'{"url": "http://mac9:8080"}')
        await b.register_node("mac1", b'{"removed": true}')
        assert await b.registry() == {"mac9": b'{"url": "http://mac9:8080"}', "mac1": b'{"removed": true}'}

    async def test_restore_registry_writes_only_what_is_missing(self, make_stores: StoreFactory) -> None:
        a, b = await make_stores(2)
        await a.restore_registry({})
        await a.register_node("mac1", b'{"removed": true}')  # newer than what b remembers
        await b.restore_registry({"mac1": b'{"node": {"url": "http://old"}}', "mac2": b'{"removed": true}'})
        assert await a.registry() == {"mac1": b'{"removed": true}', "mac2": b'{"removed": true}'}

    async def test_epoch_is_set_once_and_the_same_for_everyone(self, make_stores: StoreFactory) -> None:
        a, b = await make_stores(2)
        assert await a.epoch("first") == "first"
        assert await b.epoch("second") == "first"
        assert await a.epoch("third") == "first"

    async def test_remove_node_drops_everything_known_of_it(self, store: Store) -> None:
        target = NODES[0]
        for i in range(3):
            await store.route(req(prompt(f"s{i}", 3), f"s{i}", candidates=(target,)))
        kept = await store.route(req(prompt("keep", 3), "keep", candidates=NODES[1:2]))
        await store.cas_health(target.node_id, NodeHealth(state=NodeState.HEALTHY))
        d = await store.route(req(candidates=(target,)))
        await store.finish(d.lease, Outcome(ok=True, ttft_ms=5.0, total_ms=6.0))

        await store.remove_node(target.node_id)
        assert [(b.session, b.node_id) for b in await store.sessions()] == [("keep", kept.node_id)]
        (v,) = await store.node_views([target.node_id])
        assert (v.inflight, v.sessions, v.stats.ok) == (0, 0, 0)
        assert await store.health() == {}
        assert await held_blocks(store, target.node_id) == 0
        again = await store.route(req(prompt("s0", 3), candidates=(target,)))
        assert (again.reason, again.matched_blocks) == ("cold", 0)
        await store.remove_node("never-seen")

    async def test_ping(self, store: Store) -> None:
        await store.ping()


TOKENS_PER_BLOCK = 256


async def answer(
    store: Store, d: Decision, blocks: tuple[str, ...], cached: int, *, completion: int = 10, slots: int = 10
) -> None:
    """The node answered `blocks` and reported `cached` tokens reused (4 bytes a token, 256 tokens a block)."""
    tokens = TOKENS_PER_BLOCK * len(blocks)
    report = CacheReport(blocks, 1024 * len(blocks), tokens, cached, completion, cache_slots=slots)
    await store.finish(d.lease, Outcome(ok=True, prompt_tokens=tokens, cached_tokens=cached, report=report))


class TestCacheFeedback:
    """The router's model of each node's cache follows what the nodes report (state.cache_model)."""

    async def test_a_prompt_the_node_evicted_no_longer_attracts_it(self, store: Store) -> None:
        one = (Candidate("mac1", cache_slots=4),)
        for i in range(4):
            p = prompt(f"c{i}", 4)
            d = await store.route(req(p, candidates=one))
            await answer(store, d, p, cached=8 * TOKENS_PER_BLOCK if i else 0, slots=4)
        revisit = prompt("c0", 4)
        d = await store.route(req(revisit, candidates=one))
        assert (d.reason, d.matched_blocks) == ("prefix", 12)  # believed: all of it
        # the node had only the tools (its cache really holds 2 entries): it says so
        await answer(store, d, revisit, cached=8 * TOKENS_PER_BLOCK, slots=4)
        (v,) = await store.node_views(["mac1"])
        assert (v.cache.misses, v.cache.capacity, v.cache.reports) == (1, 3, 5)
        assert v.cache.entries <= 3
        assert (v.cache.predicted_tokens, v.cache.reported_tokens) == (3 * 8 * 256 + 12 * 256, 4 * 8 * 256)
        # the others, older than c0's rank, are known gone too
        assert (await store.route(req(prompt("c1", 4), candidates=one))).matched_blocks == 8

    async def test_a_text_turn_extends_the_entry_and_a_tool_turn_keeps_the_old_one(self, store: Store) -> None:
        one = (Candidate("mac1"),)
        turn1 = prompt("chat", 2)
        d = await store.route(req(turn1, "s", candidates=one))
        await answer(store, d, turn1, cached=0, completion=20)
        turn2 = prompt("chat", 4)
        d = await store.route(req(turn2, "s", candidates=one))
        assert (d.reason, d.matched_blocks) == ("session", 10)
        await answer(store, d, turn2, cached=10 * TOKENS_PER_BLOCK + 20, completion=30)  # prompt + reply reused
        (v,) = await store.node_views(["mac1"])
        assert v.cache.entries == 1  # the node's new entry replaced the one it extended
        turn3 = prompt("chat", 6)
        d = await store.route(req(turn3, "s", candidates=one))
        await answer(store, d, turn3, cached=12 * TOKENS_PER_BLOCK + 5)  # a tool call re-rendered: 25 short
        (v,) = await store.node_views(["mac1"])
        assert (v.cache.entries, v.cache.misses) == (2, 0)  # mlx_lm keeps both entries

    async def test_a_re_rendered_reply_is_no_miss_but_a_lost_turn_is(self, store: Store) -> None:
        one = (Candidate("mac1"),)
        edit = prompt("edit", 40, tools=False)  # 10240 tokens, then a 2000-token tool call (an Edit)
        await answer(store, await store.route(req(edit, "e", candidates=one)), edit, cached=0, completion=2000)
        edit2 = prompt("edit", 48, tools=False)
        d = await store.route(req(edit2, "e", candidates=one))
        await answer(store, d, edit2, cached=40 * TOKENS_PER_BLOCK + 30)  # the call re-rendered: reused from it
        (v,) = await store.node_views(["mac1"])
        assert v.cache.misses == 0
        chat = prompt("chat", 40, tools=False)
        await answer(store, await store.route(req(chat, "c", candidates=one)), chat, cached=0, completion=20)
        chat2 = prompt("chat", 48, tools=False)
        d = await store.route(req(chat2, "c", candidates=one))
        await answer(store, d, chat2, cached=40 * TOKENS_PER_BLOCK - 300)  # 3% short of its previous prompt
        (v,) = await store.node_views(["mac1"])
        assert v.cache.misses == 1

    async def test_a_node_that_lost_its_whole_cache(self, store: Store) -> None:
        one = (Candidate("mac1"),)
        for i in range(3):
            p = prompt(f"r{i}", 2, tools=False)
            await answer(store, await store.route(req(p, candidates=one)), p, cached=0)
        p = prompt("r2", 3, tools=False)
        await answer(store, await store.route(req(p, candidates=one)), p, cached=0)  # even the newest is gone
        (v,) = await store.node_views(["mac1"])
        assert (v.cache.entries, v.cache.misses, v.cache.capacity) == (1, 1, 0)  # a restart, not a small cache

    async def test_capacity_grows_back_on_hits_at_the_oldest_entry(self, store: Store) -> None:
        one = (Candidate("mac1", cache_slots=3),)
        prompts = [prompt(f"g{i}", 2, tools=False) for i in range(3)]
        for p in prompts:
            await answer(store, await store.route(req(p, candidates=one)), p, cached=0, slots=3)
        again = prompt("g0", 2, tools=False)
        await answer(store, await store.route(req(again, candidates=one)), again, cached=0, slots=3)  # rank 3 gone
        (v,) = await store.node_views(["mac1"])
        assert v.cache.capacity == 2
        p = prompt("g2", 3, tools=False)  # g2 is now the oldest of the two: a hit there says the node holds more
        d = await store.route(req(p, candidates=one))
        await answer(store, d, p, cached=2 * TOKENS_PER_BLOCK + 10, slots=3)
        (v,) = await store.node_views(["mac1"])
        assert v.cache.capacity == 3

    async def test_capacity_is_learned_one_step_per_miss(self, store: Store) -> None:
        one = (Candidate("mac1", cache_slots=10),)
        prompts = [prompt(f"k{i}", 2, tools=False) for i in range(3)]
        for p in prompts:
            await answer(store, await store.route(req(p, candidates=one)), p, cached=0)
        for expected in (9, 8):  # the oldest entry missed twice: down by one each time, not to 2 at once
            first = prompts[0]
            await answer(store, await store.route(req(first, candidates=one)), first, cached=0)
            (v,) = await store.node_views(["mac1"])
            assert v.cache.capacity == expected
            prompts = [*prompts[1:], first]

    async def test_a_failed_request_stored_nothing(self, store: Store) -> None:
        one = (Candidate("mac1"),)
        p = prompt("fail", 3)
        d = await store.route(req(p, candidates=one))
        report = CacheReport(p, 1024 * len(p), 0, 0, 0, reported=False)
        await store.finish(d.lease, Outcome(ok=False, error_class="http_5xx", report=report))
        assert (await store.route(req(p, candidates=one))).matched_blocks == 0

    async def test_a_session_whose_node_evicted_it_moves_to_a_node_that_holds_it(self, store: Store) -> None:
        p = prompt("moved", 8)
        first = await store.route(req(p, "s", candidates=NODES[:1]))
        await answer(store, first, p, cached=0)
        other = await store.route(req(p, candidates=NODES[1:2]))  # a copy lands on mac2 (no session)
        await answer(store, other, p, cached=0)
        await store.forget_prefix("mac1", p[8:])  # mac1 keeps only the tools
        d = await store.route(req((*p, "next"), "s"))
        assert (d.node_id, d.reason, d.bound) == ("mac2", "rebind-evicted", True)

    async def test_finished_sessions_stop_counting_against_their_node(self, make_stores: StoreFactory) -> None:
        (store,) = await make_stores(session_active_ms=300)
        d = await store.route(req(prompt("idle", 2), "idle"))
        await store.finish(d.lease, Outcome(ok=True))
        (v,) = await store.node_views([d.node_id])
        assert v.sessions == 1
        await asyncio.sleep(0.4)
        (v,) = await store.node_views([d.node_id])
        assert v.sessions == 0
        assert [b.node_id for b in await store.sessions()] == [d.node_id]  # still bound: its next turn returns


async def held_blocks(store: Store, node: str) -> int:
    """Distinct blocks the model of a node's cache holds, read from the backend's own structures; checks that
    the per-block reference counts agree with the entries."""
    if isinstance(store, MemoryStore):
        cache = store._caches.get(node)
        if cache is None:
            return 0
        refs = dict(cache.refs)
        entries = [e.blocks for e in cache.entries.values()]
    else:
        assert isinstance(store, RedisStore)
        refs = {k: int(v) for k, v in (await store.client.hgetall(f"{store.prefix}node:{node}:refs")).items()}
        raw = await store.client.hgetall(f"{store.prefix}node:{node}:entries")
        entries = [tuple(v.split(":", 4)[4].strip(",").split(",")) for v in raw.values()]
    assert refs == collections.Counter(b for blocks in entries for b in blocks)
    return len(refs)
