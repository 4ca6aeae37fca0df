"""Replica and Redis lifecycles over real processes: a rolling update's SIGTERM, a replica killed
mid-stream, and a Redis that dies (losing everything) and comes back."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from state import open_store
from tests.integration.test_health import eventually, sim_stats, turn
from tests.procs import Proc, free_port, gateway, sim_node

pytestmark = pytest.mark.slow

BODY = {"model": "claude-opus-4-8", "max_tokens": 40, "stream": True, "messages": [{"role": "user", "content": "x"}]}


@contextlib.contextmanager
def private_redis(port: int) -> Iterator[Proc]:
    """A redis-server of this test's own (it gets killed), on a given port, keeping nothing on disk."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed (run make test)"
    with tempfile.TemporaryDirectory(prefix="mlxmux-redis-") as d:
        args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", d]
        with Proc(args, port=port, name="redis") as p:
            p.wait_ready()
            yield p


def inflight(redis_url: str, prefix: str, node: str) -> int:
    async def read() -> int:
        store = open_store(redis_url, prefix=prefix)
        try:
            (view,) = await store.node_views([node])
            return view.inflight
        finally:
            await store.close()

    return asyncio.run(read())


def test_sigterm_lets_streams_finish_releases_leases_and_exits_0(redis_url: str) -> None:
    prefix = "sigterm:"
    with sim_node("--id", "slow", "--token-delay-ms", "50", "--prefill-tps", "0", name="slow") as node:
        g = gateway(f"slow={node.url}", extra=["--redis", redis_url], env={"MLXMUX_KEY_PREFIX": prefix})
        events: list[str] = []

        def stream() -> None:
            with httpx.stream("POST", g.url + "/v1/messages", json=BODY, timeout=30) as r:
                events.extend(line[7:] for line in r.iter_lines() if line.startswith("event: "))

        reader = threading.Thread(target=stream)
        reader.start()
        eventually(lambda: inflight(redis_url, prefix, "slow") == 1, timeout=5, what="stream in flight")
        g.signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.ConnectError):  # it takes no new work: the LB's /ready check fails
            httpx.get(g.url + "/ready", timeout=2)
        reader.join(30)
        assert events[-1] == "message_stop" and "error" not in events  # the stream finished normally
        assert g.proc.wait(15) == 0
        assert inflight(redis_url, prefix, "slow") == 0  # its lease was released, not left to expire
        g.stop()


def test_replica_killed_mid_stream_leaves_no_busy_node(redis_url: str) -> None:
    prefix = "sigkill:"
    env = {"MLXMUX_KEY_PREFIX": prefix, "MLXMUX_LEASE_TTL_S": "1.5"}
    with (
        sim_node("--id", "n", "--token-delay-ms", "100", "--prefill-tps", "0", name="n") as node,
        gateway(f"n={node.url}", extra=["--redis", redis_url], env=env) as survivor,
    ):
        doomed = gateway(f"n={node.url}", extra=["--redis", redis_url], env=env)
        client = httpx.Client(timeout=30)
        with contextlib.ExitStack() as stack:
            stack.callback(client.close)
            readers = []  # keep the line iterators: a collected one closes its response (a disconnect)
            for _ in range(2):
                r = stack.enter_context(client.stream("POST", doomed.url + "/v1/messages", json=BODY))
                readers.append(r.iter_lines())
                next(readers[-1])
            eventually(lambda: inflight(redis_url, prefix, "n") == 2, timeout=5, what="two streams in flight")
            doomed.kill()
            # The survivor keeps renewing only its own leases: the dead replica's expire by themselves.
            eventually(lambda: inflight(redis_url, prefix, "n") == 0, timeout=5, what="leases expired")
        doomed.stop()
        assert "Hello from sim node" in turn(survivor, "after-0000-4000-8000-000000000000")


def test_redis_outage_degraded_mode_and_recovery() -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    env = {"MLXMUX_HEALTH_INTERVAL_S": "0.3", "MLXMUX_KEY_PREFIX": "outage:"}
    with contextlib.ExitStack() as stack:
        nodes = {n: stack.enter_context(sim_node("--id", n, "--prefill-tps", "0", name=n)) for n in "abc"}
        specs = [f"{n}={p.url}" for n, p in nodes.items()]
        redis = stack.enter_context(private_redis(port))
        replicas = [stack.enter_context(gateway(*specs, extra=["--redis", url], env=env)) for _ in range(2)]
        assert all(httpx.get(r.url + "/ready").json()["mode"] == "shared" for r in replicas)

        redis.kill()
        sessions = [f"out{i}-0000-4000-8000-000000000000" for i in range(6)]
        started = time.monotonic()
        for turn_no in range(3):  # every turn through the other replica
            for i, s in enumerate(sessions):
                assert "Hello" in turn(replicas[(i + turn_no) % 2], s, f"turn {turn_no}")
        assert time.monotonic() - started < 20  # a dead Redis adds no per-request wait
        # Both replicas put each session on the same node, without shared state.
        where = {s: [n for n, p in nodes.items() if s in sim_stats(p)["per_conversation"]] for s in sessions}
        assert all(len(w) == 1 for w in where.values()), where
        assert len({w[0] for w in where.values()}) > 1  # and sessions are spread over the nodes
        for r in replicas:
            ready = httpx.get(r.url + "/ready")
            assert (ready.status_code, ready.json()["mode"]) == (200, "degraded")

        # Redis comes back empty (no persistence): replicas reconnect on their own, shared routing resumes.
        stack.enter_context(private_redis(port))
        eventually(
            lambda: all(httpx.get(r.url + "/ready").json()["mode"] == "shared" for r in replicas),
            timeout=10,
            what="both replicas back on the shared store",
        )
        assert "Hello" in turn(replicas[0], "back-0000-4000-8000-000000000000")
        eventually(
            lambda: all(httpx.get(r.url + "/cluster").json()["store_reachable"] for r in replicas),
            timeout=10,
            what="store reachable in /cluster",
        )
        logs = replicas[0].output()
        assert "degraded mode" in logs and "shared routing resumed" in logs
