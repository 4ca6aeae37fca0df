"""Giving leases and slots back by id (`Store.release`, `acquire_slot(release=…)`), which is how a replica
makes good store calls that timed out or were skipped: the same on MemoryStore and on a real Redis."""

from __future__ import annotations

import pytest

from state.store import Store
from state.types import Candidate, Lease, RouteRequest
from tests.contract.conftest import StoreFactory

pytestmark = pytest.mark.anyio


async def inflight(store: Store, node: str) -> int:
    (v,) = await store.node_views([node])
    return int(v.inflight)


async def test_release_gives_back_leases_and_slots_by_id_and_ignores_the_rest(make_stores: StoreFactory) -> None:
    a, b = await make_stores(2)
    for lease_id in ("l1", "l2", "l3"):
        await a.route(RouteRequest(pool="p", candidates=(Candidate("mac1"),), lease_id=lease_id))
    assert await a.acquire_slot("alice", "s1", 3, 10_000)
    assert await a.acquire_slot("alice", "s2", 3, 10_000)
    assert await inflight(a, "mac1") == 3

    # from another replica, with ids never taken, on nodes and keys never seen, and a lease id asked of
    # every candidate because the route that took it timed out: only what is held goes
    await b.release(
        [Lease("mac1", "l1"), Lease("mac2", "l1"), Lease("mac1", "never"), Lease("gone", "l2")],
        [("alice", "s1"), ("bob", "s2"), ("alice", "never")],
    )
    assert await inflight(a, "mac1") == 2
    assert await a.acquire_slot("alice", "s3", 3, 10_000)
    assert await a.acquire_slot("alice", "s4", 3, 10_000)  # s1 was given back: s2, s3, s4 fit the limit of 3
    assert not await a.acquire_slot("alice", "s5", 3, 10_000)
    await b.release([Lease("mac1", "l1")], [])  # twice: no harm
    await b.release([], [])
    assert await inflight(a, "mac1") == 2


async def test_acquire_gives_back_the_callers_owed_slots_first(make_stores: StoreFactory) -> None:
    (store,) = await make_stores()
    assert await store.acquire_slot("alice", "phantom1", 2, 10_000)
    assert await store.acquire_slot("alice", "phantom2", 2, 10_000)
    assert not await store.acquire_slot("alice", "new", 2, 10_000)  # at its limit
    # the same call gives back the two it owed (their requests ended while Redis stalled): atomically
    assert await store.acquire_slot("alice", "new", 2, 10_000, release=["phantom1", "phantom2", "never"])
    assert await store.acquire_slot("alice", "other", 2, 10_000)
    assert not await store.acquire_slot("alice", "third", 2, 10_000)
    assert await store.acquire_slot("alice", "new", 2, 10_000, release=["new"])  # its own id: taken again
