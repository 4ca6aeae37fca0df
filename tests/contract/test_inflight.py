"""What is in flight (state.inflight): request progress and joinable generations, the same on both stores."""

from __future__ import annotations

import asyncio

import pytest

from state.inflight import Phase, RequestProgress
from state.store import Store
from state.types import Candidate, Lease, Outcome, RouteRequest
from tests.contract.conftest import StoreFactory

pytestmark = pytest.mark.anyio

NODE = (Candidate("mac1"),)


async def requests_on(store: Store, node: str) -> tuple[RequestProgress, ...]:
    (view,) = await store.node_views([node])
    return view.requests


class TestProgress:
    async def test_progress_is_shown_while_the_lease_lives(self, make_stores: StoreFactory) -> None:
        one, two = await make_stores(2)
        first = await one.route(RouteRequest(pool="p", candidates=NODE, lease_id="L1"))
        second = await one.route(RouteRequest(pool="p", candidates=NODE, lease_id="L2"))
        assert await requests_on(two, "mac1") == ()  # nothing reported yet: in flight, no record
        await one.progress(
            [
                (first.lease, RequestProgress("L1", Phase.PREFILL, 2048, 9000, "abc123", age_ms=5000)),
                (second.lease, RequestProgress("L2", Phase.QUEUED, session="s|with|bars", age_ms=100, joined=2)),
            ]
        )
        records = await requests_on(two, "mac1")  # another replica sees them
        assert [(r.lease_id, r.phase, r.done, r.total, r.session, r.joined) for r in records] == [
            ("L1", Phase.PREFILL, 2048, 9000, "abc123", 0),  # oldest first
            ("L2", Phase.QUEUED, 0, 0, "s|with|bars", 2),
        ]
        assert 5000 <= records[0].age_ms < 65_000 and records[1].age_ms < records[0].age_ms
        await one.progress([(first.lease, RequestProgress("L1", Phase.GENERATING, 12, age_ms=6000))])
        assert (await requests_on(two, "mac1"))[0].phase == Phase.GENERATING
        await two.finish(first.lease, Outcome(True))
        assert [r.lease_id for r in await requests_on(one, "mac1")] == ["L2"]

    async def test_no_record_without_a_live_lease(self, make_stores: StoreFactory) -> None:
        (store,) = await make_stores()
        routed = await store.route(RouteRequest(pool="p", candidates=NODE, lease_id="L1", lease_ttl_ms=150))
        await store.finish(routed.lease, Outcome(True))
        # a late update (sent before the answer ended, run after) writes nothing
        await store.progress([(routed.lease, RequestProgress("L1", Phase.PREFILL, 1, 2))])
        await store.progress([(Lease("mac1", "never-taken"), RequestProgress("never-taken"))])
        assert await requests_on(store, "mac1") == ()
        lapsing = await store.route(RouteRequest(pool="p", candidates=NODE, lease_id="L2", lease_ttl_ms=150))
        await store.progress([(lapsing.lease, RequestProgress("L2"))])
        assert len(await requests_on(store, "mac1")) == 1
        await asyncio.sleep(0.3)  # the replica holding it died: its record goes with its lease
        assert await requests_on(store, "mac1") == ()

    async def test_removing_a_node_drops_its_records(self, store: Store) -> None:
        routed = await store.route(RouteRequest(pool="p", candidates=NODE, lease_id="L1"))
        await store.progress([(routed.lease, RequestProgress("L1"))])
        await store.remove_node("mac1")
        assert await requests_on(store, "mac1") == ()


class TestGenerations:
    async def test_first_owns_the_next_waits_and_reads_everything(self, make_stores: StoreFactory) -> None:
        owner_side, waiter_side = await make_stores(2)
        own = await owner_side.open_generation("g1", "owner-a", "w-a", 5000)
        assert (own.role, own.owner) == ("own", "owner-a")
        assert await owner_side.tick_generation("g1", "owner-a", 5000, 1000, ["e0"]) == 0  # nobody waits yet
        join = await waiter_side.open_generation("g1", "owner-b", "w-b", 5000)
        assert (join.role, join.owner) == ("join", "owner-a")
        assert await owner_side.tick_generation("g1", "owner-a", 5000, 1000, ["e1", "e2"]) == 1
        read = await waiter_side.read_generation("g1", "w-b", 0, 5000)
        assert (read.events, read.state, read.end) == (("e0", "e1", "e2"), "live", "")
        read = await waiter_side.read_generation("g1", "w-b", 2, 5000)
        assert read.events == ("e2",)
        assert await owner_side.tick_generation("g1", "owner-a", 5000, 1000, ["e3"], end='{"n":4}') == 1
        read = await waiter_side.read_generation("g1", "w-b", 3, 5000)
        assert (read.events, read.state, read.end) == (("e3",), "ended", '{"n":4}')
        # an ended generation is joined by nobody: a later copy goes ahead on its own
        late = await waiter_side.open_generation("g1", "owner-c", "w-c", 5000)
        assert late.role == "none"
        await asyncio.sleep(1.2)  # the grace after the end is over: it is gone, and the key is free again
        assert (await waiter_side.read_generation("g1", "w-b", 0, 5000)).state == "gone"
        assert (await waiter_side.open_generation("g1", "owner-c", "w-c", 5000)).role == "own"

    async def test_waiters_leave_or_lapse(self, store: Store) -> None:
        await store.open_generation("g2", "owner", "-", 5000)
        await store.open_generation("g2", "x", "w1", 5000)
        await store.open_generation("g2", "y", "w2", 200)
        assert await store.tick_generation("g2", "owner", 5000, 1000) == 2
        await store.leave_generation("g2", "w1")
        assert await store.tick_generation("g2", "owner", 5000, 1000) == 1
        await asyncio.sleep(0.3)  # w2 stopped reading (its replica died)
        assert await store.tick_generation("g2", "owner", 5000, 1000) == 0
        await store.read_generation("g2", "w3", 0, 5000)  # reading a live one makes the reader a waiter
        assert await store.tick_generation("g2", "owner", 5000, 1000) == 1

    async def test_an_owner_that_stops_renewing_loses_it(self, store: Store) -> None:
        await store.open_generation("g3", "owner", "-", 200)
        await store.open_generation("g3", "x", "w", 5000)
        await asyncio.sleep(0.3)
        assert (await store.read_generation("g3", "w", 0, 5000)).state == "gone"
        assert await store.tick_generation("g3", "owner", 5000, 1000, ["late"]) == -1  # not its own any more
        assert (await store.open_generation("g3", "new", "w", 5000)).role == "own"
        assert await store.tick_generation("g3", "owner", 5000, 1000) == -1  # another owner's now

    async def test_many_events_in_one_tick(self, store: Store) -> None:
        await store.open_generation("g4", "owner", "-", 5000)
        events = [f"event {i}\n" for i in range(2500)]
        await store.tick_generation("g4", "owner", 5000, 1000, events)
        read = await store.read_generation("g4", "w", 0, 5000)
        assert list(read.events) == events
