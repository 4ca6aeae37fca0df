"""The gateway as a real process in front of real sim-node processes, driven by the anthropic SDK
and by raw HTTP over real sockets (streaming, disconnects, errors)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import anthropic
import httpx
import pytest

from tests.procs import Proc, free_port, gateway, sim_node

pytestmark = pytest.mark.slow

FAST_GW_ENV = {"MLXMUX_PING_INTERVAL_S": "0.4", "MLXMUX_HEALTH_INTERVAL_S": "0.5"}


def set_faults(node: Proc, **faults: object) -> None:
    r = httpx.post(node.url + "/_sim/faults", json=faults, timeout=5)
    r.raise_for_status()


def sim_stats(node: Proc) -> dict:
    return httpx.get(node.url + "/_sim/stats", timeout=5).json()


@pytest.fixture(scope="module")
def node() -> Iterator[Proc]:
    with sim_node("--id", "mac1", "--token-delay-ms", "2", "--reply-tokens", "12", name="mac1") as n:
        yield n


@pytest.fixture(scope="module")
def gw(node: Proc) -> Iterator[Proc]:
    # These tests make the node fail on purpose, one after another; they are about what the client
    # sees, so failed requests must not take the only node out of rotation (tests/integration/test_health.py).
    with gateway(f"mac1={node.url}", env={**FAST_GW_ENV, "MLXMUX_REQUEST_FAIL_THRESHOLD": "1000"}) as g:
        yield g


@pytest.fixture(scope="module")
def slow_node() -> Iterator[Proc]:
    """A node that takes 60 ms per token, to watch streaming and disconnects."""
    with sim_node("--id", "slow", "--token-delay-ms", "60", name="slow") as n:
        yield n


@pytest.fixture(scope="module")
def slow_gw(slow_node: Proc) -> Iterator[Proc]:
    with gateway(f"slow={slow_node.url}", env=FAST_GW_ENV) as g:
        yield g


@pytest.fixture(autouse=True)
def clear_faults(node: Proc) -> Iterator[None]:
    set_faults(node)
    yield
    set_faults(node)


@pytest.fixture
def client(gw: Proc) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=gw.url, api_key="test-key", max_retries=0, timeout=20) as c:
        yield c


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, dict]]:
    event = None
    for line in lines:
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:") and event:
            yield event, json.loads(line.split(":", 1)[1])


def stream_body(text: str = "hello", **extra: object) -> dict:
    return {
        "model": "claude-opus-4-8",
        "max_tokens": 256,
        "stream": True,
        "messages": [{"role": "user", "content": text}],
        **extra,
    }


def test_non_streaming_text(client: anthropic.Anthropic) -> None:
    msg = client.messages.create(
        model="claude-opus-4-8", max_tokens=200, messages=[{"role": "user", "content": "Say hi"}]
    )
    assert msg.model == "claude-opus-4-8"
    assert msg.stop_reason == "end_turn"
    assert msg.content[0].type == "text" and "mac1" in msg.content[0].text
    assert msg.usage.output_tokens > 0 and msg.usage.input_tokens > 0
    assert msg.id.startswith("msg_")


def test_streaming_with_sdk(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model="claude-opus-4-8", max_tokens=200, messages=[{"role": "user", "content": "stream please"}]
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start"
    assert "content_block_delta" in kinds or "text" in kinds
    assert kinds[-1] == "message_stop"
    assert final.stop_reason == "end_turn"
    assert "mac1" in final.content[0].text


def test_second_turn_reports_cache_reads(client: anthropic.Anthropic) -> None:
    system = "You are a careful engineer. " * 300
    first = client.messages.create(
        model="claude-opus-4-8", max_tokens=50, system=system, messages=[{"role": "user", "content": "turn one"}]
    )
    second = client.messages.create(
        model="claude-opus-4-8",
        max_tokens=50,
        system=system,
        messages=[
            {"role": "user", "content": "turn one"},
            {"role": "assistant", "content": first.content[0].text},
            {"role": "user", "content": "turn two"},
        ],
    )
    assert (second.usage.cache_read_input_tokens or 0) > 1000
    assert second.usage.input_tokens < (second.usage.cache_read_input_tokens or 0)


def test_tool_round_trip(client: anthropic.Anthropic) -> None:
    tools = [
        {
            "name": "Bash",
            "description": "Run a shell command",
            "input_schema": {
                "type": "object",
                "properties": {"command": {"type": "string"}},
                "required": ["command"],
            },
        }
    ]
    with client.messages.stream(
        model="claude-opus-4-8",
        max_tokens=200,
        tools=tools,
        messages=[{"role": "user", "content": 'please /tool Bash {"command": "ls -la"}'}],
    ) as stream:
        kinds = [e.type for e in stream]
        first = stream.get_final_message()
    assert "input_json" in kinds or "content_block_delta" in kinds
    assert first.stop_reason == "tool_use"
    (tool_use,) = [b for b in first.content if b.type == "tool_use"]
    assert tool_use.name == "Bash" and tool_use.input == {"command": "ls -la"}
    assert tool_use.id.startswith("toolu_")
    second = client.messages.create(
        model="claude-opus-4-8",
        max_tokens=200,
        tools=tools,
        messages=[
            {"role": "user", "content": 'please /tool Bash {"command": "ls -la"}'},
            {"role": "assistant", "content": [b.model_dump() for b in first.content]},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "README.md\nsetup.py"}],
            },
        ],
    )
    assert second.stop_reason == "end_turn"
    assert "README.md" in second.content[0].text


def test_bytes_arrive_as_the_node_produces_them(slow_gw: Proc) -> None:
    times: list[float] = []
    kinds: list[str] = []
    start = time.monotonic()
    with httpx.stream("POST", slow_gw.url + "/v1/messages", json=stream_body(max_tokens=20), timeout=20) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for name, _ in sse_events(r.iter_lines()):
            kinds.append(name)
            times.append(time.monotonic() - start)
    deltas = [t for t, k in zip(times, kinds, strict=True) if k == "content_block_delta"]
    assert len(deltas) >= 5
    # Tokens come 60 ms apart at the node; a buffering gateway would deliver them all at once.
    assert deltas[-1] - deltas[0] > 0.3
    assert kinds[-1] == "message_stop"


def test_message_start_and_pings_before_a_slow_node_answers(gw: Proc, node: Proc) -> None:
    set_faults(node, slow_first_byte_ms=2500)
    start = time.monotonic()
    seen: list[tuple[str, float]] = []
    with httpx.stream("POST", gw.url + "/v1/messages", json=stream_body(), timeout=20) as r:
        assert r.status_code == 200
        for name, _ in sse_events(r.iter_lines()):
            seen.append((name, time.monotonic() - start))
    names = [n for n, _ in seen]
    assert names[0] == "message_start"
    assert seen[0][1] < 1.8  # accept_wait_s (1 s) + slack, long before the node's 2.5 s
    first_content = next(t for n, t in seen if n == "content_block_start")
    assert first_content >= 2.4
    assert names.count("ping") >= 2
    assert names[-1] == "message_stop"


def test_client_disconnect_stops_generation(slow_gw: Proc, slow_node: Proc) -> None:
    node = slow_node
    with httpx.stream("POST", slow_gw.url + "/v1/messages", json=stream_body(max_tokens=200), timeout=20) as r:
        for name, _ in sse_events(r.iter_lines()):
            if name == "content_block_delta":
                # Still reading: the node is generating for us.
                assert sim_stats(node)["active"] == 1
                break
        r.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 3
    while sim_stats(node)["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sim_stats(node)["active"] == 0


def test_node_failing_mid_stream_ends_with_error_event(gw: Proc, node: Proc) -> None:
    set_faults(node, cut_after=3)
    with httpx.stream("POST", gw.url + "/v1/messages", json=stream_body(max_tokens=100), timeout=20) as r:
        events = list(sse_events(r.iter_lines()))
    names = [n for n, _ in events]
    assert "content_block_delta" in names
    assert names[-1] == "error"
    assert events[-1][1]["type"] == "error"
    assert events[-1][1]["error"]["type"] in ("overloaded_error", "api_error")
    assert "message_stop" not in names


def test_sdk_raises_on_mid_stream_error(client: anthropic.Anthropic, node: Proc) -> None:
    set_faults(node, cut_after=3)
    with (
        pytest.raises(anthropic.APIStatusError) as info,
        client.messages.stream(
            model="claude-opus-4-8", max_tokens=100, messages=[{"role": "user", "content": "x"}]
        ) as stream,
    ):
        for _ in stream:
            pass
    assert "overloaded" in str(info.value).lower() or "api_error" in str(info.value)


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b"{not json", 400, "JSON"),
        (b'{"model": "claude-opus-4-8", "messages": [{"role": "user", "content": "x"}]}', 400, "max_tokens"),
        (b'{"model": "m", "max_tokens": "lots", "messages": []}', 400, "max_tokens"),
        (
            b'{"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "hologram"}]}]}',
            400,
            "hologram",
        ),
        (b"\xff\xfe\x00garbage", 400, ""),
    ],
)
def test_bad_requests_are_anthropic_400s(gw: Proc, body: bytes, status: int, needle: str) -> None:
    r = httpx.post(gw.url + "/v1/messages?beta=true", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status
    assert r.headers["request-id"].startswith("req_")
    assert r.headers["x-should-retry"] == "false"
    data = r.json()
    assert data["type"] == "error" and data["error"]["type"] == "invalid_request_error"
    assert needle in data["error"]["message"]
    assert data["request_id"] == r.headers["request-id"]


def test_node_5xx_becomes_529_overloaded(client: anthropic.Anthropic, node: Proc) -> None:
    set_faults(node, fail_status=500)
    with pytest.raises(anthropic.APIStatusError) as info:
        client.messages.create(model="claude-opus-4-8", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 529
    assert info.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]


def test_node_4xx_becomes_400_with_node_message(gw: Proc, node: Proc) -> None:
    set_faults(node, fail_status=422)
    r = httpx.post(gw.url + "/v1/messages", json={**stream_body(), "stream": False})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert r.headers["x-should-retry"] == "false"


def test_small_endpoints(gw: Proc) -> None:
    assert httpx.head(gw.url + "/").status_code == 200
    assert httpx.head(gw.url + "/api/hello").status_code == 200
    assert httpx.get(gw.url + "/health").json() == {"status": "ok"}
    models = httpx.get(gw.url + "/v1/models").json()
    assert any(m["id"].startswith("claude-") for m in models["data"])
    # Earlier tests failed requests on purpose (degraded); a success heals the node.
    assert httpx.post(gw.url + "/v1/messages", json={**stream_body(), "stream": False}).status_code == 200
    cluster = httpx.get(gw.url + "/cluster").json()
    assert cluster["status"] == "healthy"
    assert cluster["nodes"][0]["id"] == "mac1" and cluster["nodes"][0]["state"] == "healthy"
    r = httpx.post(
        gw.url + "/v1/messages/count_tokens",
        json={"model": "x", "messages": [{"role": "user", "content": "hi " * 400}]},
    )
    assert r.status_code == 200 and r.json()["input_tokens"] > 100
    r = httpx.get(gw.url + "/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_body_over_limit_is_413_without_reading_it() -> None:
    with gateway("http://127.0.0.1:9", env={"MLXMUX_MAX_BODY_BYTES": "1000"}) as g:
        r = httpx.post(g.url + "/v1/messages", content=b"x" * 5000)
        assert r.status_code == 413
        assert r.json()["error"]["type"] == "request_too_large"


def test_unreachable_node_is_retryable_and_no_node_is_503() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    with gateway(f"dead={dead}", env=FAST_GW_ENV) as g:
        r = httpx.post(g.url + "/v1/messages", json={**stream_body(), "stream": False})
        # Before the first probe fails the node is tried (529); once known dead there is no node (503).
        assert r.status_code in (503, 529)
        assert r.headers["x-should-retry"] == "true"
        time.sleep(1.5)
        r = httpx.post(g.url + "/v1/messages", json=stream_body())
        assert r.status_code == 503
        assert r.json()["error"]["type"] == "cluster_unavailable"
        assert r.headers["retry-after"] == "10"
        assert httpx.get(g.url + "/ready").status_code == 503


def test_failover_to_a_healthy_node_before_streaming() -> None:
    with (
        sim_node("--id", "bad", "--fail-status", "500", name="bad") as bad,
        sim_node("--id", "good", name="good") as good,
        gateway(f"bad={bad.url}", f"good={good.url}", extra=["--strategy", "round-robin"], env=FAST_GW_ENV) as g,
    ):
        client = stack_client(g.url)
        for _ in range(4):
            msg = client.messages.create(
                model="claude-opus-4-8", max_tokens=10, messages=[{"role": "user", "content": "x"}]
            )
            assert "good" in msg.content[0].text


def stack_client(url: str) -> anthropic.Anthropic:
    """A client closed when the test ends (an unclosed one leaves a socket for the GC to warn about)."""
    client = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0)
    _open_clients.append(client)
    return client


_open_clients: list[anthropic.Anthropic] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _open_clients:
        _open_clients.pop().close()
