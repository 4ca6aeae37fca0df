from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.procs import redis_server

REALNODE = Path(__file__).with_name("realnode.py")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server for the whole test session (tests use distinct key prefixes)."""
    with redis_server() as url:
        yield url


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def tiny_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model real mlx_lm.server nodes load (tests/realnode.py), built once: kept in the pytest cache
    under a name keyed on realnode.py's content, so a later run (or a CI cache) reuses it until that changes."""
    from tests.realnode import build_tiny_model

    key = hashlib.sha256(REALNODE.read_bytes()).hexdigest()[:12]
    cache = getattr(request.config, "cache", None)  # None with -p no:cacheprovider
    root = cache.mkdir("mlxmux-tiny-model") if cache is not None else tmp_path_factory.mktemp("tiny-model")
    for old in root.iterdir():  # builds of an older realnode.py
        if old.name != key and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)
    return build_tiny_model(root / key).resolve()
