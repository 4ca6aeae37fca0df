"""Operator intent and node health survive the shared store losing its data (proxy.health, proxy.membership).

The shared store is a `MemoryStore` here; "wiping" it is what a Redis restart without persistence or a
FLUSHALL does: every record, registry entry and the epoch are gone. The same runs against real Redis and
real replicas in tests/integration/test_store_loss.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from proxy.cluster import Cluster
from proxy.config import HealthConfig, NodeConfig, TimeoutConfig
from proxy.health import HealthMonitor
from proxy.membership import Membership
from proxy.upstream import NodeFailure
from state.errors import StateUnavailable
from state.memory import MemoryStore
from state.types import NodeState

pytestmark = pytest.mark.anyio

NODES = [NodeConfig(id=n, url=f"http://{n}:8080") for n in ("a", "b", "c")]


def answer(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json={"data": []} if request.url.path == "/v1/models" else {})


class Flaky:
    """A store that can be made unreachable (every call raises StateUnavailable), or lose everything."""

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.down = False

    def wipe(self) -> None:
        self.inner = MemoryStore()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self.inner, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise StateUnavailable(f"{name}: down")
            return await method(*args, **kwargs)

        return call


class Replica:
    def __init__(self, store: Flaky, name: str) -> None:
        self.cluster = Cluster(NODES, TimeoutConfig(), httpx.MockTransport(answer))
        self.health = HealthMonitor(self.cluster, store, MemoryStore(), HealthConfig(), name)  # type: ignore[arg-type]
        self.membership = Membership(self.cluster, store, list(NODES), None)  # type: ignore[arg-type]

    async def cycle(self, *, everyone: bool = False) -> None:
        """What the gateway does every health interval."""
        await self.membership.sync()
        await self.health.round(everyone=everyone)

    def routable(self) -> set[str]:
        return {c.node_id for c in self.cluster.candidates("default")}


@pytest.fixture
async def store() -> AsyncIterator[Flaky]:
    yield Flaky()


async def started(store: Flaky, name: str) -> Replica:
    r = Replica(store, name)
    await r.cycle(everyone=True)
    return r


async def test_lost_health_records_keep_their_state_and_are_written_back(store: Flaky) -> None:
    r1, r2 = await started(store, "r1"), await started(store, "r2")
    await r1.health.set_draining("b", True)
    await r2.cycle()
    assert r1.routable() == r2.routable() == {"a", "c"}

    store.wipe()
    # A request failing right after the loss: the node was healthy a second ago, so it is degraded (still
    # routable), not `initializing` (unroutable) as a node never seen would be; and b stays drained.
    await r2.health.report_request("a", NodeFailure("http_5xx", "boom", status=500))
    assert (await store.health())["a"].state == NodeState.DEGRADED
    for r in (r1, r2):
        await r.cycle()
        assert r.routable() == {"a", "c"}
    records = await store.health()
    assert records["b"].draining and records["b"].state == NodeState.HEALTHY
    assert records["c"].state == NodeState.HEALTHY


async def test_a_replica_that_knows_nothing_does_not_undo_a_drain(store: Flaky) -> None:
    r1 = await started(store, "r1")
    await r1.health.set_draining("b", True)
    store.wipe()
    fresh = await started(store, "fresh")  # started after the loss: writes b as a new, undrained node
    assert not (await store.health())["b"].draining
    await r1.cycle()  # r1 sees a new epoch: the store lost its data, so it re-asserts the drain it knew
    assert (await store.health())["b"].draining
    await fresh.cycle()
    assert fresh.routable() == r1.routable() == {"a", "c"}


async def test_an_undrain_after_the_loss_is_not_undone(store: Flaky) -> None:
    r1, r2 = await started(store, "r1"), await started(store, "r2")
    await r1.health.set_draining("b", True)
    await r2.cycle()
    store.wipe()
    await r1.cycle()
    await r2.cycle()
    await r2.health.set_draining("b", False)  # the operator's newer word
    for r in (r1, r2, r1):
        await r.cycle()
    assert not (await store.health())["b"].draining
    assert r1.routable() == r2.routable() == {"a", "b", "c"}


async def test_the_registry_is_written_back_without_overwriting_newer_entries(store: Flaky) -> None:
    r1, r2 = await started(store, "r1"), await started(store, "r2")
    d = NodeConfig(id="d", url="http://d:8080")
    assert await r1.membership.remove("c")
    assert await r1.membership.add(d)
    await r2.cycle()
    assert set(r2.cluster.nodes) == {"a", "b", "d"}

    store.wipe()
    await store.register_node("a", b'{"removed":true}')  # an operator's change right after the loss
    for r in (r1, r2):
        await r.cycle()
    registry = await store.registry()
    assert registry["c"] == b'{"removed":true}' and b"http://d:8080" in registry["d"]
    assert set(r1.cluster.nodes) == set(r2.cluster.nodes) == {"b", "d"}  # "a" removed, "c" not back


async def test_changes_while_the_store_is_down_apply_here_and_are_written_when_it_is_back(store: Flaky) -> None:
    r1, r2 = await started(store, "r1"), await started(store, "r2")
    store.down = True
    await r1.cycle()  # degraded: health kept locally, starting from what r1 last saw
    assert r1.routable() == {"a", "b", "c"}
    assert not await r1.membership.remove("c")
    await r1.health.set_draining("b", True)
    assert not r1.health.shared
    await r1.cycle()
    assert r1.routable() == {"a"}

    store.down = False
    store.wipe()  # and it came back empty
    await r1.cycle()
    await r2.cycle()
    assert r1.routable() == r2.routable() == {"a"}
    assert (await store.registry())["c"] == b'{"removed":true}'
    assert (await store.health())["b"].draining


async def test_degraded_mode_keeps_the_drains_it_knew(store: Flaky) -> None:
    r1, r2 = await started(store, "r1"), await started(store, "r2")
    await r1.health.set_draining("c", True)
    await r2.cycle()
    store.down = True
    await r2.cycle()
    assert r2.routable() == {"a", "b"}  # not every node back in rotation because the local store knew none
    await r2.health.report_request("a", NodeFailure("http_5xx", "boom", status=500))
    assert r2.routable() == {"a", "b"}
