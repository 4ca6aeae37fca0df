"""Redis URLs teams actually use, against real servers: a password (`redis://:pass@…`), TLS (`rediss://…`),
a Sentinel-managed primary (`redis+sentinel://…`, `rediss+sentinel://…`); and a Redis Cluster node, refused."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from state import open_store
from state.errors import StateUnavailable, StoreUnsupported
from state.types import Candidate, RouteRequest
from tests.procs import ROOT, Proc, free_port, redis_sentinels, redis_server, redis_server_binary

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


async def assert_refused(url: str) -> None:
    """A store opened with `url` cannot route (a wrong password, TLS spoken to a plain client, …)."""
    store = open_store(url, prefix="urls:")
    try:
        with pytest.raises(StateUnavailable):
            await store.route(REQUEST)
    finally:
        await store.close()


async def test_password_in_the_url() -> None:
    with redis_server(password="s3cret pass") as url:
        assert url.startswith("redis://:s3cret pass@")
        await route_twice(url.replace(" ", "%20"))
        await assert_refused(url.replace("s3cret pass", "wrong"))


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
        await assert_refused(url.replace("rediss://", "redis://").partition("?")[0])  # the port speaks TLS only


async def test_sentinel_url_with_the_servers_and_the_sentinels_passwords() -> None:
    with redis_sentinels(sentinels=1, replicas=0, password="pw 1", sentinel_password="spw") as found:
        url = found.url().replace("pw 1", "pw%201")
        assert url.startswith("redis+sentinel://:pw%201@127.0.0.1:") and url.endswith("?sentinel_password=spw")
        await route_twice(url)
        for wrong in (url.replace("spw", "nope"), url.replace("pw%201", "nope")):
            await assert_refused(wrong)


async def test_rediss_sentinel(self_signed: tuple[str, str]) -> None:
    with redis_sentinels(sentinels=1, replicas=1, password="pw", tls=self_signed) as found:
        url = found.url()
        assert url.startswith("rediss+sentinel://:pw@127.0.0.1:")
        await route_twice(url)
        await assert_refused(url.replace("rediss+", "redis+").partition("?")[0])  # the sentinels speak TLS only


@pytest.fixture
def cluster_node(tmp_path: Path) -> Iterator[str]:
    """A redis-server in cluster mode that serves every hash slot: a one-shard Redis Cluster."""
    port = free_port()
    binary = redis_server_binary()
    assert binary, "redis-server is not installed (run make test)"
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += ["--dir", str(tmp_path), "--cluster-enabled", "yes", "--cluster-port", str(free_port())]
    with Proc(args, port=port, name="cluster") as proc:
        proc.wait_ready()
        with contextlib.closing(redis.Redis(port=port)) as r:
            r.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        yield f"redis://127.0.0.1:{port}/0"


async def test_a_redis_cluster_node_is_refused(cluster_node: str) -> None:
    store = open_store(cluster_node, prefix="urls:")
    try:
        with pytest.raises(StoreUnsupported, match="Redis Cluster is not supported"):
            await store.check()
        # Should a gateway meet one anyway (it was unreachable when the gateway started), every script fails
        # with a message that says why, and the gateway stays in degraded mode.
        with pytest.raises(StateUnavailable, match="Redis Cluster is not supported"):
            await store.route(REQUEST)
    finally:
        await store.close()


def test_mlxmux_serve_stops_on_a_redis_cluster_with_one_line(cluster_node: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "serve", "--port", str(free_port()), "--redis", cluster_node],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"mlxmux: error: redis url {cluster_node!r}: Redis Cluster is not supported: a routing decision is one Lua "
        "script over keys that span shards (docs/redis-keys.md#redis-cluster); use one Redis or a "
        "Sentinel-managed primary (redis+sentinel://)"
    ]


async def test_no_sentinel_answering_is_an_outage_said_in_one_short_line() -> None:
    store = open_store(f"redis+sentinel://127.0.0.1:{free_port()},127.0.0.1:{free_port()}/mymaster/0", prefix="urls:")
    try:
        with pytest.raises(StateUnavailable) as info:
            await store.route(REQUEST)
    finally:
        await store.close()
    assert str(info.value) == (
        "redis route failed: No master found for 'mymaster' (no sentinel answered, or none monitors it)"
    )
