"""What an operator meets, over real processes: a 503 that says why, an empty pool, a node URL that loops back
to the gateway, refused logins in the access log, a misspelled variable, a busy port.

One gateway carries most of it: a live sim node, a node nobody listens on, a node whose name does not resolve,
a node whose URL is the gateway's own, and a model map that sends haiku to a pool with no nodes.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import anthropic
import httpx
import pytest

from tests.procs import ROOT, Proc, free_port, gateway, sim_node

pytestmark = pytest.mark.slow

KEY = "sk-team-alice-0042"
WRONG = "sk-wrong-attempt-7731"
HI = [{"role": "user", "content": "hi"}]


def wait_until(check: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    """Poll `check` until it returns something truthy (generous for a loaded machine; no threshold)."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached: {what}")
        time.sleep(0.05)


def log_line(gw: Proc, *words: str) -> str:
    def find() -> str | None:
        return next((line for line in gw.output().splitlines() if all(w in line for w in words)), None)

    line: str = wait_until(find, f"a log line with {words}:\n{gw.output()[-3000:]}")
    return line


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def sdk(gw: Proc, **kw: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, max_retries=0, timeout=30, **{"api_key": KEY, **kw})


@pytest.fixture(scope="module")
def alive() -> Iterator[Proc]:
    with sim_node("--id", "alive", "--token-delay-ms", "1", "--reply-tokens", "4", name="alive") as node:
        yield node


@pytest.fixture(scope="module")
def dead_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def gw(alive: Proc, dead_port: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    config = tmp_path_factory.mktemp("operator") / "mlxmux.toml"
    config.write_text('[models]\n"claude-*haiku*" = "small"\n')
    port = free_port()
    env = {
        "MLXMUX_API_KEYS": f"alice:{KEY}",
        "MLXMUX_FIRST_BYTE_TIMEOUT": "900",  # misspelled: MLXMUX_FIRST_BYTE_TIMEOUT_S
        "MLXMUX_HEALTH_INTERVAL_S": "0.3",
        "MLXMUX_LOG_LEVEL": "debug",
    }
    nodes = [
        f"alive={alive.url}",
        f"dead=http://127.0.0.1:{dead_port}",
        "dns=http://no-such-node.invalid:8080",
        f"self=http://127.0.0.1:{port}",  # the gateway's own URL
    ]
    with gateway(*nodes, port=port, extra=["--config", str(config)], env=env) as g:
        yield g


def test_startup_warns_about_a_misspelled_variable_and_an_empty_pool(gw: Proc) -> None:
    line = log_line(gw, "WARNING", "MLXMUX_FIRST_BYTE_TIMEOUT ")
    assert line.endswith(
        "environment variable MLXMUX_FIRST_BYTE_TIMEOUT is not an mlxmux setting and is ignored: "
        "did you mean MLXMUX_FIRST_BYTE_TIMEOUT_S?"
    )
    line = log_line(gw, "WARNING", "pool 'small'")
    assert "the model map sends claude-*haiku* there: those requests get 503" in line


def test_ready_and_status_name_the_empty_pool(gw: Proc) -> None:
    r = httpx.get(gw.url + "/ready", timeout=5)
    assert r.status_code == 200  # the default pool can serve: the replica stays in its load balancer
    body = r.json()
    assert body["pools"]["small"] == {"nodes": 0, "routable": 0}
    assert body["pools"]["default"]["routable"] == 1
    assert [p for p in body["problems"] if p.startswith("pool 'small' has no nodes")], body
    status = cli("status", "--url", gw.url)
    assert status.returncode == 0, status.stderr
    assert "problems:\n  pool 'small' has no nodes, but the model map sends claude-*haiku* there" in status.stdout


def test_a_request_for_the_empty_pool_is_a_503_naming_it(gw: Proc) -> None:
    with sdk(gw) as client, pytest.raises(anthropic.APIStatusError) as info:
        client.messages.create(model="claude-haiku-4-5", max_tokens=4, messages=HI)
    assert info.value.status_code == 503
    assert info.value.response.headers["retry-after"] == "10"
    message = info.value.body["error"]["message"]  # type: ignore[index]
    assert message.startswith("no routable node: pool 'small' has no nodes (the model map sends claude-*haiku* there)")
    request_id = info.value.response.headers["request-id"]
    line = log_line(gw, "mlxmux.access", request_id)
    assert "status=503" in line and "error=\"no routable node: pool 'small' has no nodes" in line, line


def test_a_503_names_every_node_and_what_is_wrong_with_it(gw: Proc, dead_port: int) -> None:
    def states() -> dict[str, str]:
        return {n["id"]: n["state"] for n in httpx.get(gw.url + "/cluster", timeout=5).json()["nodes"]}

    wait_until(lambda: {states()[n] for n in ("dead", "dns", "self")} == {"unhealthy"}, "failed probes take them out")
    drained = cli("nodes", "drain", "alive", "--url", gw.url)
    assert drained.returncode == 0, drained.stderr
    try:
        with sdk(gw) as client, pytest.raises(anthropic.APIStatusError) as info:
            client.messages.create(model="claude-opus-4-8", max_tokens=4, messages=HI, stream=True)
    finally:
        assert cli("nodes", "undrain", "alive", "--url", gw.url).returncode == 0
    assert info.value.status_code == 503
    assert info.value.response.headers["retry-after"] == "10"
    assert info.value.body["error"]["type"] == "cluster_unavailable"  # type: ignore[index]
    message = info.value.body["error"]["message"]  # type: ignore[index]
    assert message.startswith("no routable node in pool 'default' (alive: draining (mlxmux nodes undrain alive); ")
    # A refused port and a name that does not resolve are told apart, with their URLs.
    assert f"dead: unhealthy: connection refused at http://127.0.0.1:{dead_port} " in message, message
    assert "dns: unhealthy: cannot resolve host 'no-such-node.invalid' (DNS: " in message, message
    assert "self: unhealthy: " in message, message
    line = log_line(gw, "mlxmux.access", info.value.response.headers["request-id"])
    assert "status=503" in line and "alive: draining" in line and "connection refused at" in line, line


def test_a_node_url_that_leads_back_to_the_gateway_is_a_loop(gw: Proc) -> None:
    def loop_error() -> str | None:
        nodes = httpx.get(gw.url + "/cluster", timeout=5).json()["nodes"]
        entry = next(n for n in nodes if n["id"] == "self")
        return entry if "routing loop" in entry.get("last_error", "") else None

    entry = wait_until(loop_error, "the self node's last error names the loop")
    assert entry["state"] not in ("healthy", "degraded")
    assert entry["last_error"] == (
        f"node self: {gw.url} is an mlxmux gateway: routing loop: this node URL points back at this mlxmux gateway; "
        "give the Mac's own URL instead"
    )
    assert "node self: initializing -> unhealthy: " in log_line(gw, "mlxmux.health", "node self:", "routing loop")
    # What another gateway, pointed here as at a node, is told.
    r = httpx.get(gw.url + "/health", headers={"x-mlxmux-hop": "0123abcd"}, timeout=5)
    assert r.status_code == 508
    assert r.json()["error"]["type"] == "loop_detected"
    assert "an mlxmux gateway, not an inference node, and another one (process 0123abcd)" in r.text


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"api_key": WRONG}, "the API key sent is not one of this gateway's team keys"),  # ANTHROPIC_API_KEY
        ({"api_key": None, "auth_token": WRONG}, "the API key sent is not one of this gateway's team keys"),
        (None, "no API key sent"),  # the SDK refuses to send no key: plain HTTP
    ],
)
def test_refused_logins_are_in_the_access_log(gw: Proc, kw: dict[str, Any] | None, why: str) -> None:
    if kw is None:
        response = httpx.post(gw.url + "/v1/messages", json={"model": "x", "messages": HI}, timeout=10)
    else:
        with sdk(gw, **kw) as client, pytest.raises(anthropic.AuthenticationError) as info:
            client.messages.create(model="claude-opus-4-8", max_tokens=4, messages=HI)
        response = info.value.response
    assert response.status_code == 401
    # Claude Code hides a 401 message that mentions x-api-key behind its generic "Not logged in"; ours it shows.
    message = response.json()["error"]["message"]
    assert message == f"{why}: set ANTHROPIC_AUTH_TOKEN (or ANTHROPIC_API_KEY) to your team key"
    line = log_line(gw, "mlxmux.access", response.headers["request-id"])
    assert "status=401" in line and "path=/v1/messages" in line and "client=127.0.0.1" in line, line
    assert why in line, line
    assert WRONG not in gw.output() and KEY not in gw.output()
    assert "alice" not in line  # a refused key is nobody's: no key name


def test_the_debug_log_shows_the_routing_decision(gw: Proc, alive: Proc) -> None:
    with sdk(gw) as client:
        message = client.messages.create(model="claude-opus-4-8", max_tokens=4, messages=HI)
    line = log_line(gw, "DEBUG mlxmux.relay", f"request {message._request_id}:")
    assert re.search(r": pool default -> node alive, reason \w+, attempt 1, prefix \d+/\d+ blocks", line), line


@pytest.fixture
def two_nodes() -> Iterator[tuple[Proc, Proc]]:
    with sim_node("--id", "a", name="a") as a, sim_node("--id", "b", name="b") as b:
        yield a, b


def test_when_every_node_fails_to_connect_the_answer_is_503_with_retry_after(two_nodes: tuple[Proc, Proc]) -> None:
    """docs/health.md promises 503 cluster_unavailable with Retry-After when no node can take the request: also
    when the nodes die between probes, so this one request is the first to find every node refusing."""
    a, b = two_nodes
    env = {"MLXMUX_HEALTH_INTERVAL_S": "60"}  # no probe between the nodes' death and the request
    with gateway(f"a={a.url}", f"b={b.url}", env=env) as gw:
        a.stop()
        b.stop()
        with sdk(gw, api_key="any") as client, pytest.raises(anthropic.APIStatusError) as info:
            client.messages.create(model="claude-opus-4-8", max_tokens=4, messages=HI, stream=True)
        assert info.value.status_code == 503
        assert info.value.response.headers["retry-after"] == "10"
        error = info.value.body["error"]  # type: ignore[index]
        assert error["type"] == "cluster_unavailable"
        for node in (a, b):
            assert f"connection refused at {node.url} " in error["message"], error["message"]
        line = log_line(gw, "mlxmux.access", info.value.response.headers["request-id"])
        assert "attempts=2" in line and "status=503" in line, line


@pytest.mark.parametrize(
    ("command", "prefix"),
    [
        (["serve", "--node", "http://127.0.0.1:9", "--port"], "mlxmux: error: "),
        (["demo", "--node-port", str(free_port()), "--port"], "mlxmux: error: "),
        (["sim-node", "--port"], "mlxmux sim-node: error: "),
    ],
)
def test_a_busy_port_is_one_line(command: list[str], prefix: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = cli(*command, str(port))
    assert proc.returncode == 2
    assert proc.stderr == (
        f"{prefix}port {port} on 127.0.0.1 is already in use (another mlxmux or another program): "
        "choose another --port\n"
    )


def test_sessions_redis_unreachable_is_one_line() -> None:
    proc = cli("sessions", "--redis", f"redis://127.0.0.1:{free_port()}/0")
    assert proc.returncode == 1
    assert proc.stderr.startswith("mlxmux: error: cannot read Redis at ") and proc.stderr.count("\n") == 1
