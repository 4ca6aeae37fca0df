"""The gateway makes good the store calls that failed: slots and leases it asked for are given back by id
when the store answers again, twice when a stalled Redis may still run the original call; and degraded
mode keeps sessions on the node the store had bound them to (`BindingCache`)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from proxy.bindings import BindingCache
from proxy.cluster import Cluster
from proxy.config import Settings, load_settings
from proxy.gateway import KEY_SLOT, NODE_LEASE, Gateway
from state.errors import StateUnavailable
from state.memory import MemoryStore
from state.types import Candidate, Lease, NodeState, RouteRequest

pytestmark = pytest.mark.anyio


class StallingStore(MemoryStore):
    """A MemoryStore whose calls, while `stalled`, are applied but then reported as timed out: what a
    Redis that was stalled past the client's timeout does with the commands queued in its sockets."""

    def __init__(self) -> None:
        super().__init__()
        self.stalled = False
        self.released: list[tuple[list[Lease], list[tuple[str, str]]]] = []

    def _maybe_time_out(self) -> None:
        if self.stalled:
            raise StateUnavailable("redis timeout")

    async def acquire_slot(
        self, key_name: str, lease_id: str, limit: int, ttl_ms: int, release: Sequence[str] = ()
    ) -> bool:
        taken = await super().acquire_slot(key_name, lease_id, limit, ttl_ms, release)
        self._maybe_time_out()
        return taken

    async def release_slot(self, key_name: str, lease_id: str) -> None:
        self._maybe_time_out()
        await super().release_slot(key_name, lease_id)

    async def release(self, leases: Sequence[Lease], slots: Sequence[tuple[str, str]] = ()) -> None:
        self._maybe_time_out()
        self.released.append((list(leases), list(slots)))
        await super().release(leases, slots)

    async def route(self, request: RouteRequest):  # type: ignore[no-untyped-def]
        decision = await super().route(request)
        self._maybe_time_out()
        return decision


def settings() -> Settings:
    return load_settings(env={"MLXMUX_NODES": "a=http://127.0.0.1:9,b=http://127.0.0.1:9"})


async def slots_held(store: MemoryStore, key: str, limit: int = 100) -> int:
    """Live slots of `key`: how many fewer than `limit` a probe can take (it gives them back)."""
    taken = []
    while await MemoryStore.acquire_slot(store, key, f"probe{len(taken)}", limit, 10_000):
        taken.append(f"probe{len(taken)}")
    for lease_id in taken:
        await MemoryStore.release_slot(store, key, lease_id)
    return limit - len(taken)


async def test_a_timed_out_acquire_and_a_skipped_release_are_made_good() -> None:
    store = StallingStore()
    gw = Gateway(settings(), store, Cluster(settings().nodes, settings().timeouts))
    store.stalled = True
    slot = await gw.acquire_slot("alice", 4)  # fails open, but the slot was taken in the store
    assert slot is not None and slot in gw.slots
    assert await slots_held(store, "alice") == 1
    await gw.release_slot(slot)  # the circuit is open: the release is owed, not sent
    assert list(gw.repairs) == [(KEY_SLOT, "alice", slot[1])]
    await gw._repair()  # still stalled: stays owed
    assert gw.repairs

    store.stalled = False
    await gw._repair()  # Redis answers: given back, but not yet proven to have run after the acquire
    assert await slots_held(store, "alice") == 0
    assert gw.repairs and gw.store_ok
    await gw._repair()  # sent once more, after an answer: settled
    assert not gw.repairs
    assert len(store.released) == 2


async def test_an_acquire_gives_back_the_keys_owed_slots_in_the_same_call() -> None:
    store = StallingStore()
    gw = Gateway(settings(), store, Cluster(settings().nodes, settings().timeouts))
    store.stalled = True
    phantoms = []
    for _ in range(2):
        gw._store_retry_at = 0.0  # the circuit's retry is due: the call goes to the (stalled) store
        phantoms.append(await gw.acquire_slot("alice", 2))
    for slot in phantoms:
        assert slot is not None
        await gw.release_slot(slot)
    store.stalled = False
    gw._store_retry_at = 0.0  # the circuit's retry is due
    assert await slots_held(store, "alice", 2) == 2  # without a repair the key would be at its limit
    assert await gw.acquire_slot("alice", 2) is not None  # no 429: the phantoms went first, atomically
    assert await slots_held(store, "alice", 2) == 1  # only the new one
    assert len(gw.repairs) == 2  # sent once; once more after this answer, then settled
    await gw._repair()
    assert not gw.repairs


async def test_a_timed_out_route_gives_its_lease_back_on_every_candidate() -> None:
    store = StallingStore()
    gw = Gateway(settings(), store, Cluster(settings().nodes, settings().timeouts))
    gw.cluster.states.update({"a": NodeState.HEALTHY, "b": NodeState.HEALTHY})
    store.stalled = True
    decision = await gw.route("default", (), "s1", ())
    assert decision.reason == "degraded-hash"
    (view_a, view_b) = await store.node_views(["a", "b"])
    assert view_a.inflight + view_b.inflight == 1  # the store took a lease all the same
    assert {k[:2] for k in gw.repairs} == {(NODE_LEASE, "a"), (NODE_LEASE, "b")}
    store.stalled = False
    await gw._repair()
    (view_a, view_b) = await store.node_views(["a", "b"])
    assert view_a.inflight + view_b.inflight == 0


async def test_degraded_mode_keeps_a_session_on_the_node_the_store_bound_it_to() -> None:
    store = StallingStore()
    gw = Gateway(settings(), store, Cluster(settings().nodes, settings().timeouts))

    def request(*nodes: str) -> RouteRequest:
        return RouteRequest(pool="default", candidates=tuple(Candidate(n) for n in nodes), session="s")

    hashed = (await gw._degraded_route(request("a", "b"))).node_id
    other = "b" if hashed == "a" else "a"
    gw.bindings.put("default", "s", other)  # what the store said while it was up
    for _ in range(3):
        decision = await gw._degraded_route(request("a", "b"))
        assert (decision.node_id, decision.reason) == (other, "degraded-binding")
    # the bound node is not routable: the hash decides, and the session stays where it went
    decision = await gw._degraded_route(request(hashed))
    assert (decision.node_id, decision.reason) == (hashed, "degraded-hash")
    assert gw.bindings.get("default", "s") == hashed


def test_the_binding_cache_is_bounded_and_forgets_idle_sessions() -> None:
    now = [0.0]
    cache = BindingCache(3, 10.0, clock=lambda: now[0])
    for i in range(4):
        cache.put("p", f"s{i}", f"n{i}")
    assert len(cache) == 3 and cache.get("p", "s0") is None  # the least recently routed went
    cache.put("p", "s1", "n1")  # routed again: now the most recent
    cache.put("p", "s4", "n4")
    assert cache.get("p", "s1") == "n1" and cache.get("p", "s2") is None
    now[0] = 9.0
    cache.put("p", "s4", "n9")
    now[0] = 10.5
    assert cache.get("p", "s1") is None  # idle for the session TTL
    assert cache.get("p", "s4") == "n9"
    assert cache.get("other-pool", "s4") is None
