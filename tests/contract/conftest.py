from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from state.memory import MemoryStore
from state.redis_store import RedisStore
from state.store import Store
from state.types import RoutingLimits

StoreFactory = Callable[..., Awaitable[list[Store]]]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def make_stores(backend: str, request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    """`await make_stores(n, **limits)`: n replicas sharing one state (memory: one store n times).

    Each call gets its own key prefix, so tests never see each other's keys.
    """
    opened: list[Store] = []
    url = request.getfixturevalue("redis_url") if backend == "redis" else ""

    async def make(n: int = 1, **limits: Any) -> list[Store]:
        settings = RoutingLimits(key_prefix=f"t{uuid.uuid4().hex[:12]}:", **limits)
        stores: list[Store]
        if backend == "memory":
            stores = [MemoryStore(settings)] * n
        else:
            stores = [RedisStore.from_url(url, settings) for _ in range(n)]
        opened.extend(stores)
        return stores

    yield make
    for store in opened:
        await store.close()


@pytest.fixture
async def store(make_stores: StoreFactory) -> Store:
    (one,) = await make_stores()
    return one
