"""Node health, failover, drain and run-time node changes across three replicas sharing a real Redis,
with real sim-node processes that are killed and brought back."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import anthropic
import httpx
import pytest

from tests.procs import ROOT, Proc, gateway, sim_node

pytestmark = pytest.mark.slow

INTERVAL = 0.4
ENV = {
    "MLXMUX_HEALTH_INTERVAL_S": str(INTERVAL),
    "MLXMUX_HEALTH_TIMEOUT_S": "0.5",
    "MLXMUX_OPEN_S": "0.4",
    "MLXMUX_MAX_BACKOFF_S": "1",
    "MLXMUX_PING_INTERVAL_S": "0.5",
}
FAST = ("--prefill-tps", "0", "--token-delay-ms", "1", "--reply-tokens", "6")


class Cluster:
    def __init__(self, nodes: dict[str, Proc], replicas: list[Proc]) -> None:
        self.nodes = nodes
        self.replicas = replicas

    def node_of(self, session: str) -> str:
        """The node whose own counters saw the session (the gateway forwards it as x-session-id)."""
        seen = [
            nid
            for nid, p in self.nodes.items()
            if p.proc.poll() is None and session in sim_stats(p)["per_conversation"]
        ]
        assert len(seen) == 1, (session, seen)
        return seen[0]

    def views(self) -> list[dict[str, dict]]:
        return [{n["id"]: n for n in httpx.get(r.url + "/cluster", timeout=5).json()["nodes"]} for r in self.replicas]


def sim_stats(node: Proc) -> dict:
    return httpx.get(node.url + "/_sim/stats", timeout=5).json()


def turn(replica: Proc, session: str, text: str = "hello") -> str:
    with (
        anthropic.Anthropic(base_url=replica.url, api_key="k", max_retries=0, timeout=30) as client,
        client.messages.stream(
            model="claude-opus-4-8",
            max_tokens=32,
            messages=[{"role": "user", "content": text}],
            extra_headers={"x-claude-code-session-id": session},
        ) as stream,
    ):
        message = stream.get_final_message()
    return message.content[0].text  # type: ignore[union-attr]


def eventually(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached within {timeout}s")


@pytest.fixture
def cluster(redis_url: str, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    prefix = f"health-{request.node.name[:40]}:"
    with contextlib.ExitStack() as stack:
        nodes = {nid: stack.enter_context(sim_node("--id", nid, *FAST, name=nid)) for nid in ("a", "b", "c")}
        specs = [f"{nid}={p.url}" for nid, p in nodes.items()]
        env = {**ENV, "MLXMUX_KEY_PREFIX": prefix}
        replicas = [stack.enter_context(gateway(*specs, extra=["--redis", redis_url], env=env)) for _ in range(3)]
        yield Cluster(nodes, replicas)
        for p in nodes.values():  # restarted nodes are new processes: stop them too
            p.stop()


def test_node_killed_between_turns_costs_no_turn_and_comes_back(cluster: Cluster) -> None:
    session = "kill-0000-4000-8000-000000000000"
    turn(cluster.replicas[0], session)
    victim = cluster.node_of(session)
    port = cluster.nodes[victim].port
    cluster.nodes[victim].kill()

    # The next turn, through another replica, is served elsewhere (connect error → next node).
    assert "Hello from sim node" in turn(cluster.replicas[1], session, "hello again")
    assert cluster.node_of(session) != victim

    # Every replica soon reports the node out of rotation.
    eventually(
        lambda: all(v[victim]["state"] in ("unhealthy", "offline") for v in cluster.views()),
        timeout=INTERVAL * 10,
        what="every replica sees the killed node down",
    )
    assert all(v[victim]["breaker"] in ("open", "half-open") for v in cluster.views())

    # It comes back on the same port: healthy again on every replica, and it gets new sessions.
    cluster.nodes[victim] = sim_node("--id", victim, *FAST, port=port, name=victim)
    eventually(
        lambda: all(v[victim]["state"] == "healthy" for v in cluster.views()),
        timeout=10,
        what="every replica sees the node healthy again",
    )
    fresh = [f"new{i}-0000-4000-8000-000000000000" for i in range(6)]
    for i, s in enumerate(fresh):
        turn(cluster.replicas[i % 3], s)
    assert victim in {cluster.node_of(s) for s in fresh}


def test_probes_are_not_multiplied_by_replicas(cluster: Cluster) -> None:
    def checks() -> dict[str, int]:
        return {n: sim_stats(p)["health_checks"] for n, p in cluster.nodes.items()}

    before = checks()
    time.sleep(INTERVAL * 10)
    rounds = {n: after - before[n] for n, after in checks().items()}
    # Three replicas probing on their own would make ~30 probes per node; the probe lease makes ~10.
    assert all(5 <= r <= 16 for r in rounds.values()), rounds


def test_drain_moves_sessions_and_undrain_restores(cluster: Cluster) -> None:
    sessions = [f"drain{i}-0000-4000-8000-000000000000" for i in range(6)]
    for i, s in enumerate(sessions):
        turn(cluster.replicas[i % 3], s)
    target = cluster.node_of(sessions[0])
    out = mlxmux_cli("nodes", "drain", target, "--url", cluster.replicas[0].url)
    assert "draining" in out
    eventually(lambda: all(v[target]["draining"] for v in cluster.views()), timeout=INTERVAL * 6, what="drain seen")
    for p in cluster.nodes.values():
        httpx.post(p.url + "/_sim/reset", timeout=5)
    for i, s in enumerate(sessions):  # every session's next turn, each through another replica
        turn(cluster.replicas[(i + 1) % 3], s, "next")
    assert all(cluster.node_of(s) != target for s in sessions)
    status = mlxmux_cli("status", "--url", cluster.replicas[2].url)
    assert "(draining)" in status and target in status
    mlxmux_cli("nodes", "undrain", target, "--url", cluster.replicas[1].url)
    eventually(
        lambda: not any(v[target]["draining"] for v in cluster.views()), timeout=INTERVAL * 6, what="undrain seen"
    )


def test_nodes_added_and_removed_at_run_time_on_every_replica(cluster: Cluster) -> None:
    with sim_node("--id", "d", *FAST, name="d") as extra:
        out = mlxmux_cli("nodes", "add", f"d={extra.url}", "--url", cluster.replicas[0].url)
        assert "added d" in out
        eventually(
            lambda: all(v.get("d", {}).get("state") == "healthy" for v in cluster.views()),
            timeout=INTERVAL * 8,
            what="every replica has node d healthy",
        )
        cluster.nodes["d"] = extra
        mlxmux_cli("nodes", "remove", "d", "--url", cluster.replicas[1].url)
        eventually(lambda: all("d" not in v for v in cluster.views()), timeout=INTERVAL * 6, what="d gone everywhere")
        del cluster.nodes["d"]
    missing = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "nodes", "drain", "nope", "--url", cluster.replicas[0].url],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert missing.returncode == 1
    assert missing.stderr.startswith("mlxmux: error:") and "no node 'nope'" in missing.stderr


def test_admin_api_needs_the_admin_token_when_one_is_set(redis_url: str) -> None:
    with gateway(env={"MLXMUX_ADMIN_TOKEN": "s3cret", **ENV}) as g:
        assert httpx.get(g.url + "/admin/nodes").status_code == 401
        r = httpx.get(g.url + "/admin/nodes", headers={"authorization": "Bearer wrong"})
        assert (r.status_code, r.json()["error"]["type"]) == (401, "authentication_error")
        assert httpx.get(g.url + "/admin/nodes", headers={"authorization": "Bearer s3cret"}).json() == []
        bad = httpx.post(g.url + "/admin/nodes", json={"url": "ftp://x"}, headers={"authorization": "Bearer s3cret"})
        assert (bad.status_code, bad.json()["error"]["type"]) == (400, "invalid_request_error")


def test_all_nodes_gone_is_503_cluster_unavailable(cluster: Cluster) -> None:
    for p in cluster.nodes.values():
        p.kill()
    eventually(
        lambda: all(httpx.get(r.url + "/ready", timeout=5).status_code == 503 for r in cluster.replicas),
        timeout=INTERVAL * 10,
        what="every replica not ready",
    )
    r = httpx.post(
        cluster.replicas[0].url + "/v1/messages",
        json={"model": "claude-opus-4-8", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]},
    )
    assert r.status_code == 503
    assert r.json()["error"]["type"] == "cluster_unavailable" and r.headers["retry-after"] == "10"
    assert httpx.get(cluster.replicas[1].url + "/cluster").json()["status"] == "offline"


def mlxmux_cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "proxy.cli", *args], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_operator_views_sessions_and_status_from_redis(
    cluster: Cluster, redis_url: str, request: pytest.FixtureRequest
) -> None:
    sessions = [f"view{i}-0000-4000-8000-000000000000" for i in range(3)]
    for i, s in enumerate(sessions):
        turn(cluster.replicas[i], s)
    out = mlxmux_cli("sessions", "--url", cluster.replicas[0].url)
    for s in sessions:
        line = next(line for line in out.splitlines() if line.startswith(s))
        assert cluster.node_of(s) in line.split()
    assert "\n3 sessions bound: " in out
    prefix = f"health-{request.node.name[:40]}:"
    # The same bindings read from Redis, without a gateway (like `status --redis`).
    from_redis = mlxmux_cli("sessions", "--redis", redis_url, "--key-prefix", prefix)
    assert sorted(r.split()[:3] for r in from_redis.splitlines()[1:4]) == sorted(
        r.split()[:3] for r in out.splitlines()[1:4]
    )
    assert from_redis.splitlines()[-1] == out.splitlines()[-1]
    listed = mlxmux_cli("nodes", "list", "--url", cluster.replicas[0].url)
    assert listed.splitlines()[0] == (
        f"cluster healthy · 3 nodes · strategy cache-aware · store shared · via {cluster.replicas[0].url}"
    )
    table = mlxmux_cli("status", "--redis", redis_url, "--key-prefix", prefix)
    assert table.startswith("cluster healthy")
    assert all(any(row.split()[:2] == [n, "healthy"] for row in table.splitlines()) for n in cluster.nodes)
    view = json.loads(mlxmux_cli("status", "--json", "--url", cluster.replicas[1].url))
    assert view["status"] == "healthy" and sorted(n["id"] for n in view["nodes"]) == ["a", "b", "c"]
    bad = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "status", "--redis", "redis://127.0.0.1:9/0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad.returncode == 1 and bad.stderr.startswith("mlxmux: error: cannot read Redis")
