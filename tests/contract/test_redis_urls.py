"""Redis URLs teams actually use: a password (`redis://:pass@…`) and TLS (`rediss://…`), against real servers."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from state import open_store
from state.errors import StateUnavailable
from state.types import Candidate, RouteRequest
from tests.procs import redis_server

pytestmark = [pytest.mark.anyio, pytest.mark.redis]

REQUEST = RouteRequest(pool="default", candidates=(Candidate("mac1"), Candidate("mac2")), session="s", blocks=("b1",))


async def route_twice(url: str) -> None:
    store = open_store(url, prefix="urls:")
    try:
        first = await store.route(REQUEST)
        again = await store.route(REQUEST)
        assert (again.node_id, again.reason) == (first.node_id, "session")
        assert await store.acquire_slot("alice", "l1", 1, 10_000)
        assert not await store.acquire_slot("alice", "l2", 1, 10_000)
    finally:
        await store.close()


async def test_password_in_the_url() -> None:
    with redis_server(password="s3cret pass") as url:
        assert url.startswith("redis://:s3cret pass@")
        await route_twice(url.replace(" ", "%20"))
        wrong = open_store(url.replace("s3cret pass", "wrong"), prefix="urls:")
        try:
            with pytest.raises(StateUnavailable):
                await wrong.route(REQUEST)
        finally:
            await wrong.close()


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key, made with the openssl command."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subject = ["-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    args = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", *subject]
    subprocess.run([*args, "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return str(cert), str(key)


async def test_rediss_with_a_password(self_signed: tuple[str, str]) -> None:
    with redis_server(password="pw", tls=self_signed) as url:
        assert url.startswith("rediss://:pw@127.0.0.1:")
        await route_twice(url)
        plain = open_store(url.replace("rediss://", "redis://").partition("?")[0], prefix="urls:")
        try:
            with pytest.raises(StateUnavailable):  # the port speaks TLS only
                await plain.route(REQUEST)
        finally:
            await plain.close()
