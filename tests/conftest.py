from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.procs import redis_server


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server for the whole test session (tests use distinct key prefixes)."""
    with redis_server() as url:
        yield url


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
