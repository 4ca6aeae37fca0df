"""The documented deployment without Docker (docs/operations.md, "The same topology without Docker"):
a real redis-server, simulated nodes, three `mlxmux serve --redis …` replicas and the real `haproxy`
running the shipped deploy/haproxy.cfg, driven through the load balancer with the official SDK."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import anthropic
import httpx
import pytest

from tests.claude_code_request import claude_code_request, sdk_kwargs
from tests.procs import ROOT, Proc, free_port, mlxmux, sim_node, wait_http_ok
from tests.team import FAST_SIM

pytestmark = pytest.mark.slow

HAPROXY_CFG = ROOT / "deploy" / "haproxy.cfg"


def haproxy_binary() -> str:
    binary = shutil.which("haproxy")
    if binary is None:
        message = "haproxy is not installed (`make test` installs it; or `apt-get install -y haproxy`)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return binary


def haproxy_env(lb_port: int, replica_ports: list[int]) -> dict[str, str]:
    env = {"MLXMUX_LB_PORT": str(lb_port)}
    env.update({f"MLXMUX_GW{i}": f"127.0.0.1:{port}" for i, port in enumerate(replica_ports, 1)})
    return env


@pytest.mark.parametrize("dns", [None, "gateway:8420"], ids=["fixed-addresses", "compose-dns"])
def test_haproxy_accepts_the_config_in_both_modes(dns: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXMUX_")}
    if dns:
        env["MLXMUX_GATEWAY_DNS"] = dns
    run = subprocess.run(
        [haproxy_binary(), "-c", "-f", str(HAPROXY_CFG)], env=env, capture_output=True, text=True, timeout=30
    )
    assert run.returncode == 0, run.stdout + run.stderr


@dataclass
class Topology:
    sims: list[Proc]
    replicas: list[Proc]
    lb: Proc

    @property
    def url(self) -> str:
        return self.lb.url


@pytest.fixture(scope="module")
def topology(redis_url: str) -> Iterator[Topology]:
    binary = haproxy_binary()
    with contextlib.ExitStack() as stack:
        sims = [stack.enter_context(sim_node("--id", f"sim{i}", *FAST_SIM)) for i in (1, 2)]
        nodes = [f"--node=sim{i}={s.url}" for i, s in enumerate(sims, 1)]
        env = {"MLXMUX_KEY_PREFIX": "topology:", "MLXMUX_HEALTH_INTERVAL_S": "1"}
        # Started together, then waited for: the three replicas boot in parallel.
        replicas = []
        for _ in range(3):
            port = free_port()
            args = ["serve", "--port", str(port), *nodes, "--redis", redis_url]
            replicas.append(stack.enter_context(mlxmux(*args, port=port, env=env, name="gateway")))
        for r in replicas:
            r.wait_ready()
            wait_http_ok(r.url + "/ready")  # 200 once a node is routable
        lb_port = free_port()
        lb_env = haproxy_env(lb_port, [r.port for r in replicas])
        lb = stack.enter_context(Proc([binary, "-f", str(HAPROXY_CFG)], port=lb_port, env=lb_env, name="haproxy"))
        lb.wait_ready()
        wait_http_ok(lb.url + "/ready")  # answered by a replica through the load balancer
        yield Topology(sims, replicas, lb)


def served_by(lb: Proc, count: int) -> list[str]:
    """The replica (haproxy server name) of each of the `count` /v1/messages requests so far, from
    haproxy's request log (a line is written when its response has ended, so it may lag the client)."""
    deadline = time.monotonic() + 5
    while True:
        found = re.findall(r" gateways/(gw\d+) .*\"POST /v1/messages", lb.output())
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def sessions_on(sims: list[Proc]) -> dict[str, set[str]]:
    """Session id → the sim nodes that served it (the gateway forwards it as x-session-id)."""
    where: dict[str, set[str]] = {}
    for sim in sims:
        stats = httpx.get(sim.url + "/_sim/stats", timeout=10).json()
        for session in stats["per_conversation"]:
            where.setdefault(session, set()).add(stats["id"])
    return where


def turn(client: anthropic.Anthropic, session: str, n: int) -> str:
    """Turn `n` of a Claude-Code-shaped session, streamed; returns the answer's text."""
    body = claude_code_request(session, n, max_tokens=32)
    with client.messages.stream(**sdk_kwargs(body, session)) as stream:
        final = stream.get_final_message()
    assert final.stop_reason in ("end_turn", "tool_use", "max_tokens")
    return "".join(b.text for b in final.content if b.type == "text")


def test_a_session_through_the_load_balancer_stays_on_one_node_and_survives_a_replica_stop(
    topology: Topology,
) -> None:
    session = "topo-0001-4000-8000-000000000000"
    # No retries in the client: whatever goes wrong must be absorbed by haproxy and the replicas.
    with anthropic.Anthropic(base_url=topology.url, api_key="team", max_retries=0, timeout=60) as client:
        for n in range(1, 5):
            assert turn(client, session, n)
        before = served_by(topology.lb, 4)
        assert len(before) == 4
        assert len(set(before)) >= 2, f"haproxy sent every turn to one replica: {before}"
        where = sessions_on(topology.sims)
        assert list(where) == [session]
        assert len(where[session]) == 1, f"the session moved between nodes: {where}"

        # Stop the replica that served the last turn; the next turns must still be answered, whether
        # haproxy's health check has noticed yet or it retries elsewhere (the next test forces that case).
        stopped = int(before[-1].removeprefix("gw")) - 1
        # uvicorn finishes gracefully, then re-raises SIGTERM on itself.
        assert topology.replicas[stopped].stop() in (0, -signal.SIGTERM)
        for n in range(5, 11):
            assert turn(client, session, n)

    after = served_by(topology.lb, 10)[len(before) :]
    assert len(after) == 6
    assert f"gw{stopped + 1}" not in after
    where = sessions_on(topology.sims)
    assert list(where) == [session]
    assert len(where[session]) == 1, f"the session moved between nodes: {where}"

    # haproxy's /ready health check takes the stopped replica out; the other two still serve.
    deadline = time.monotonic() + 15
    while f"gateways/gw{stopped + 1} is DOWN" not in topology.lb.output():
        assert time.monotonic() < deadline, topology.lb.output()
        time.sleep(0.2)
    assert httpx.get(topology.url + "/ready", timeout=10).status_code == 200


def test_haproxy_retries_a_replica_it_still_counts_as_up_on_another(topology: Topology) -> None:
    """Between a replica's end and the health check that notices it, connections to it are refused:
    `retries` with `option redispatch 1` must send those requests to a live replica."""
    running = [r for r in topology.replicas if r.proc.poll() is None]
    if len(running) == len(topology.replicas):
        running.pop().stop()
    dead = next(r.port for r in topology.replicas if r.proc.poll() is not None)
    # Checks an hour apart: haproxy checks its first server at once and the others much later, so the
    # dead replica (second and third) stays "up" for it throughout this test.
    ports = [running[0].port, dead, dead]
    lb_port = free_port()
    env = {**haproxy_env(lb_port, ports), "MLXMUX_LB_CHECK_INTERVAL": "1h"}
    with Proc([haproxy_binary(), "-f", str(HAPROXY_CFG)], port=lb_port, env=env, name="haproxy") as lb:
        lb.wait_ready()
        session = "topo-0002-4000-8000-000000000000"
        with anthropic.Anthropic(base_url=lb.url, api_key="team", max_retries=0, timeout=60) as client:
            for n in range(1, 7):
                assert turn(client, session, n)
        served = served_by(lb, 6)
        assert served and set(served) == {"gw1"}, lb.output()
        # The retries column of the log ("+N" when the request was redispatched) shows the detours.
        assert re.search(r" 200 .* \d+/\d+/\d+/\d+/\+\d+ ", lb.output()), lb.output()
        assert "is DOWN" not in lb.output()
    assert len(sessions_on(topology.sims)[session]) == 1
