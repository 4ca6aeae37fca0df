"""Blame: only failures a node caused count against it (proxy.upstream classification, HealthMonitor),
a request failing the same way on two nodes is the request's fault (relay.with_failover), and what the
client sends is checked before routing (sampling ranges, session ids).

The in-process tests run the real app (Starlette TestClient, lifespan included) over nodes played by an
`httpx.MockTransport`, so every decision — status, retries, health records — is the real code's."""

from __future__ import annotations

import errno
import json
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from proxy.app import build_app
from proxy.attempts import failure_signature
from proxy.cluster import Cluster
from proxy.config import HealthConfig, NodeConfig, TimeoutConfig, load_settings
from proxy.errors import InvalidRequest
from proxy.health import HealthMonitor
from proxy.upstream import NodeClient, NodeFailure, unsendable_header
from proxy.validate import MAX_SESSION_ID, session_key_part
from proxy.wire.anthropic import decode_messages_request, session_id_from_metadata
from state.memory import MemoryStore
from state.types import NodeState

VALID: dict[str, Any] = {"model": "claude-opus-4-8", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
NODE = NodeConfig(id="mac1", url="http://mac1:8080")
COMPLETION = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}]}
STREAM = (
    b'data: {"choices":[{"index":0,"delta":{"content":"fine"}}]}\n\n'
    b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
)

Handler = Callable[[httpx.Request], httpx.Response]


class Body(httpx.AsyncByteStream):
    """A response body that is streamed (a plain `content=` body is read at once, and cannot be streamed)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.data


def answer(status: int, body: Any, content_type: str = "application/json") -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.Response(status, headers={"content-type": content_type}, stream=Body(data))


# -- classification (proxy.upstream) -------------------------------------------------------------


def raising(exc: Exception) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    return handler


def emfile() -> httpx.ConnectError:
    try:
        try:
            raise OSError(errno.EMFILE, "Too many open files")
        except OSError as os_error:
            raise httpx.ConnectError("connect failed") from os_error
    except httpx.ConnectError as exc:
        return exc


async def open_failure(handler: Handler, headers: dict[str, str] | None = None) -> NodeFailure:
    client = NodeClient(NODE, TimeoutConfig(), httpx.MockTransport(handler))
    try:
        with pytest.raises(NodeFailure) as info:
            await client.open_stream("/v1/chat/completions", b"{}", headers)
        return info.value
    finally:
        await client.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("handler", "kind", "blames", "retryable"),
    [
        (raising(httpx.PoolTimeout("no connection")), "pool_wait", False, True),
        (raising(httpx.LocalProtocolError("Illegal header value b'a\\r\\nb'")), "gateway", False, True),
        (raising(httpx.UnsupportedProtocol("Request URL has an unsupported protocol")), "gateway", False, True),
        (raising(emfile()), "gateway", False, True),
        (raising(httpx.ConnectError("All connection attempts failed")), "connect", True, True),
        (raising(httpx.ConnectTimeout("timed out")), "connect", True, True),
        (raising(httpx.WriteTimeout("timed out")), "timeout", True, True),
        (raising(httpx.RemoteProtocolError("Server disconnected without sending a response.")), "protocol", True, True),
        (raising(httpx.ReadError("Connection reset by peer")), "protocol", True, True),
        (lambda r: answer(500, {"error": "boom"}), "http_5xx", True, True),
        (lambda r: answer(404, {"error": "no such model"}), "http_4xx", False, False),
    ],
)
async def test_what_counts_against_the_node(handler: Handler, kind: str, blames: bool, retryable: bool) -> None:
    failure = await open_failure(handler)
    assert (failure.kind, failure.blames_node, failure.retryable) == (kind, blames, retryable), failure.message


@pytest.mark.anyio
@pytest.mark.parametrize("value", ["a\r\nb", "caf\u00e9", "a\x00b", " padded", ""])
async def test_an_unsendable_client_header_is_never_sent(value: str) -> None:
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200)

    failure = await open_failure(handler, {"x-session-id": value})
    assert (failure.kind, failure.blames_node, failure.retryable) == ("request_header", False, False)
    assert "x-session-id" in failure.message and not sent
    assert unsendable_header({"x-session-id": "9f7b-uuid", "x": "a b"}) is None


def test_failure_signatures() -> None:
    five = NodeFailure("http_5xx", "cannot render: poison", status=500)
    assert failure_signature("a", five) == failure_signature("b", five)
    cut_a = NodeFailure("protocol", "node a failed: RemoteProtocolError: Server disconnected")
    cut_b = NodeFailure("protocol", "node b failed: RemoteProtocolError: Server disconnected")
    assert failure_signature("a", cut_a) == failure_signature("b", cut_b) is not None
    assert failure_signature("a", NodeFailure("http_5xx", "other", status=500)) != failure_signature("a", five)
    # Nothing about the request: proxies' down pages, empty bodies, dead or slow nodes, the gateway's own.
    assert failure_signature("a", NodeFailure("http_5xx", "<h1>502 Bad Gateway</h1>", status=502)) is None
    assert failure_signature("a", NodeFailure("http_5xx", "node answered HTTP 500", status=500)) is None
    for kind in ("connect", "timeout", "pool_wait", "gateway"):
        assert failure_signature("a", NodeFailure(kind, f"node a {kind}")) is None


# -- HealthMonitor.report_request ------------------------------------------------------------------


@pytest.mark.anyio
async def test_report_request_ignores_failures_the_node_did_not_cause() -> None:
    cluster = Cluster([NODE], TimeoutConfig(), httpx.MockTransport(lambda r: httpx.Response(200)))
    store = MemoryStore()
    health = HealthMonitor(cluster, store, store, HealthConfig(request_fail_threshold=1), "r1")
    await health.change("mac1", lambda h: h.__class__(state=NodeState.HEALTHY))
    for kind in ("pool_wait", "gateway", "request_header", "http_4xx"):
        for _ in range(5):
            await health.report_request("mac1", NodeFailure(kind, "not the node"))
    record = health.records["mac1"]
    assert record.state == NodeState.HEALTHY and record.request_fails == 0
    await health.report_request("mac1", NodeFailure("http_5xx", "boom", status=500))
    assert health.records["mac1"].state == NodeState.UNHEALTHY
    await cluster.aclose()


# -- validation before routing --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("temperature", -1, "temperature: range: 0..1"),
        ("temperature", 1.5, "temperature: range: 0..1"),
        ("temperature", 1e400, "$.temperature"),  # msgspec: out of range
        ("top_p", 2, "top_p: range: 0..1"),
        ("top_p", -0.1, "top_p: range: 0..1"),
        ("top_k", -1, "top_k: must be >= 0"),
        ("top_k", 1.5, "Expected `int | null`, got `float`"),
        ("temperature", "hot", "Expected `float | null`"),
        ("max_tokens", 0, "max_tokens"),
        ("max_tokens", 2.5, "max_tokens"),
        ("stop_sequences", "END", "stop_sequences"),
        ("stop_sequences", ["ok", 7], "stop_sequences"),
        ("messages", [], "messages"),
        ("messages", [{"role": "robot", "content": "hi"}], "role"),
    ],
)
def test_what_anthropic_refuses_is_refused_before_routing(field: str, value: object, words: str) -> None:
    raw = json.dumps({**VALID, field: value}).replace("Infinity", "1e400").encode()
    with pytest.raises(InvalidRequest) as info:
        decode_messages_request(raw)
    assert words in info.value.message, info.value.message


def test_edges_and_unknown_fields_are_accepted() -> None:
    body = {**VALID, "temperature": 0, "top_p": 1, "top_k": 0, "stop_sequences": [], "context_management": {"x": 1}}
    req = decode_messages_request(json.dumps({**body, "output_config": {"effort": "high"}}).encode())
    assert (req.temperature, req.top_p, req.top_k) == (0, 1, 0)
    decode_messages_request(json.dumps({**VALID, "temperature": 1.0, "top_p": 0.0, "temperature_x": -5}).encode())


# -- session ids -------------------------------------------------------------------------------------


def test_session_key_parts_are_kept_or_hashed() -> None:
    uuid = "0f8a4c2e-7d1b-4e5f-9a3c-2b6d8e0f1a2b"
    assert session_key_part(uuid) == uuid
    assert session_key_part("x" * MAX_SESSION_ID) == "x" * MAX_SESSION_ID
    for bad in ("a\r\nx-evil: 1", "caf\u00e9", "x" * (MAX_SESSION_ID + 1), "a b", "\ud800", "x" * 20_000):
        key = session_key_part(bad)
        assert key.startswith("h:") and len(key) == 34 and key == session_key_part(bad)
    assert session_key_part("caf\u00e9") != session_key_part("cafe\u0301")


def with_user_id(user_id: str) -> Any:
    return decode_messages_request(json.dumps({**VALID, "metadata": {"user_id": user_id}}).encode())


def test_metadata_user_id_never_raises() -> None:
    good = json.dumps({"device_id": "d", "account_uuid": "", "session_id": "s-1"})
    assert session_id_from_metadata(with_user_id(good)) == "s-1"
    assert session_id_from_metadata(with_user_id("user_ab_account__session_s-2")) == "s-2"
    deep = '{"a":' + "[" * 100_000 + "]" * 100_000 + ',"session_id":"s"}'
    for hostile in (deep, '{"session_id": 5}', '{"session_id": "' + "x" * 20_000 + '"}', "{", "user_" + "_" * 50_000):
        assert session_id_from_metadata(with_user_id(hostile)) is None
    assert session_id_from_metadata(with_user_id(json.dumps({"session_id": "a\r\nb"}))) == "a\r\nb"  # hashed later


# -- the whole gateway in process: failover and blame ------------------------------------------------


class Nodes:
    """Two or three nodes behind one MockTransport; `answer[node]` says how each answers a request."""

    def __init__(self, ids: tuple[str, ...]) -> None:
        self.ids = ids
        self.answer: dict[str, Handler] = {}
        self.calls: dict[str, int] = dict.fromkeys(ids, 0)
        self.headers: list[httpx.Headers] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        node = request.url.host
        path = request.url.path
        if path == "/health":
            return answer(200, {"status": "ok"})
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        self.calls[node] += 1
        self.headers.append(request.headers)
        if node in self.answer:
            return self.answer[node](request)
        stream = json.loads(request.content).get("stream")
        if stream:
            return answer(200, STREAM, "text/event-stream")
        return answer(200, COMPLETION)


@pytest.fixture
def nodes() -> Nodes:
    return Nodes(("a", "b", "c"))


@pytest.fixture
def client(nodes: Nodes) -> Iterator[TestClient]:
    settings = load_settings(
        env={"MLXMUX_HEALTH_INTERVAL_S": "60", "MLXMUX_REQUEST_FAIL_THRESHOLD": "3"},
        nodes=[f"{n}=http://{n}:8080" for n in nodes.ids],
    )
    app = build_app(settings, store=MemoryStore(), transport=httpx.MockTransport(nodes))
    with TestClient(app) as c:
        yield c


def states(client: TestClient) -> dict[str, tuple[str, str]]:
    return {n["id"]: (n["state"], n.get("last_error", "")) for n in client.get("/cluster").json()["nodes"]}


def error_of(r: Any) -> dict[str, Any]:
    body = r.json()
    assert body["type"] == "error", body
    return dict(body["error"])


@pytest.mark.parametrize("stream", [False, True])
def test_the_same_failure_on_two_nodes_is_the_requests_fault(client: TestClient, nodes: Nodes, stream: bool) -> None:
    for n in nodes.ids:
        nodes.answer[n] = lambda r: answer(500, {"error": "cannot render the prompt: poison"})
    for _ in range(5):
        r = client.post("/v1/messages", json={**VALID, "stream": stream})
        assert r.status_code == 400 and r.headers["x-should-retry"] == "false"
        error = error_of(r)
        assert error["type"] == "invalid_request_error"
        assert "both failed this request the same way" in error["message"]
        assert "HTTP 500: cannot render the prompt: poison" in error["message"]
    assert sum(nodes.calls.values()) == 10  # two nodes per request, never the third
    assert {s for s, _ in states(client).values()} == {"healthy"}


def test_different_failures_on_every_node_are_the_nodes_fault(client: TestClient, nodes: Nodes) -> None:
    nodes.answer["a"] = lambda r: answer(500, {"error": "error one"})
    nodes.answer["b"] = lambda r: answer(500, {"error": "error two"})
    nodes.answer["c"] = lambda r: answer(500, {"error": "error three"})
    r = client.post("/v1/messages", json=VALID)
    assert r.status_code == 529 and error_of(r)["type"] == "overloaded_error"
    assert {s for s, _ in states(client).values()} == {"degraded"}


def test_a_failure_then_a_success_blames_the_failed_node(client: TestClient, nodes: Nodes) -> None:
    sick = {"x"}

    def first_fails(r: httpx.Request) -> httpx.Response:
        if sick:
            sick.clear()
            return answer(500, {"error": "kv cache allocation failed"})
        return answer(200, COMPLETION)

    for n in nodes.ids:
        nodes.answer[n] = first_fails
    r = client.post("/v1/messages", json=VALID)
    assert r.status_code == 200, r.text
    blamed = {n: e for n, (s, e) in states(client).items() if s == "degraded"}
    assert list(blamed.values()) == ["kv cache allocation failed"]


def test_identical_502_pages_are_not_the_requests_fault(client: TestClient, nodes: Nodes) -> None:
    for n in nodes.ids:
        nodes.answer[n] = lambda r: answer(502, b"<h1>502 Bad Gateway</h1>", "text/html")
    r = client.post("/v1/messages", json=VALID)
    assert r.status_code == 529 and sum(nodes.calls.values()) == 3
    assert {s for s, _ in states(client).values()} == {"degraded"}


@pytest.mark.parametrize(
    ("exc", "status", "type_"),
    [
        (httpx.PoolTimeout("no free connection"), 529, "overloaded_error"),
        (httpx.LocalProtocolError("Illegal header value"), 500, "api_error"),
        (httpx.UnsupportedProtocol("unsupported protocol"), 500, "api_error"),
    ],
)
def test_the_gateways_own_failures_blame_no_node(
    client: TestClient, nodes: Nodes, exc: Exception, status: int, type_: str
) -> None:
    for n in nodes.ids:
        nodes.answer[n] = raising(exc)
    for _ in range(4):
        r = client.post("/v1/messages", json=VALID)
        assert r.status_code == status and error_of(r)["type"] == type_, r.text
    if status == 529:
        assert r.headers["retry-after"] == "2" and "connections to node" in error_of(r)["message"]
    assert {s for s, _ in states(client).values()} == {"healthy"}


@pytest.mark.parametrize(
    ("session", "key"),
    [
        ({"headers": {"x-claude-code-session-id": "caf\u00e9-\u4e16\u754c".encode()}}, "h:"),
        ({"headers": {"x-session-id": "s" * 20_000}}, "h:"),
        ({"headers": {"x-claude-code-session-id": "ok", "x-claude-code-agent-id": b"\xff" * 300}}, "ok/h:"),
        ({"metadata": json.dumps({"session_id": "a\r\nx-injected: 1"})}, "h:"),
        ({"metadata": json.dumps({"session_id": "\u00e9" * 10})}, "h:"),
        ({"metadata": '{"x":' + "[" * 50_000 + "]" * 50_000 + "}"}, None),
        ({"metadata": "x" * 20_000}, None),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_hostile_session_ids_are_served_and_blame_no_node(
    client: TestClient, nodes: Nodes, session: dict[str, Any], key: str | None, stream: bool
) -> None:
    body: dict[str, Any] = {**VALID, "stream": stream}
    if "metadata" in session:
        body["metadata"] = {"user_id": session["metadata"]}
    r = client.post("/v1/messages", json=body, headers=session.get("headers", {}))
    assert r.status_code == 200, r.text
    sent = nodes.headers[-1].get("x-session-id")
    if key is None:
        assert sent is None
    else:
        assert sent.startswith(key) and sent.isascii() and sent.isprintable() and len(sent) <= 2 * MAX_SESSION_ID + 1
    assert "\r" not in "".join(f"{k}{v}" for k, v in nodes.headers[-1].items())
    assert {s for s, _ in states(client).values()} == {"healthy"}


def test_an_answer_over_the_size_cap_is_never_the_requests_fault() -> None:
    from proxy.attempts import failure_signature
    from proxy.upstream import NodeFailure

    over = NodeFailure("protocol", "node a sent a stream event over 100 bytes", oversized=True)
    assert failure_signature("a", over) is None
    broken = NodeFailure("protocol", "node a sent an invalid stream chunk")
    assert failure_signature("a", broken) is not None


def refused() -> httpx.ConnectError:
    exc = httpx.ConnectError("All connection attempts failed")
    exc.__cause__ = ConnectionRefusedError(111, "Connect call failed")
    return exc


@pytest.mark.parametrize("stream", [False, True])
def test_every_node_failing_to_connect_is_503_with_retry_after(client: TestClient, nodes: Nodes, stream: bool) -> None:
    """docs/health.md: no node of the pool can take the request → 503 cluster_unavailable, Retry-After (not 529)."""
    for n in nodes.ids:
        nodes.answer[n] = raising(refused())
    r = client.post("/v1/messages", json={**VALID, "stream": stream})
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "10" and r.headers["x-should-retry"] == "true"
    error = error_of(r)
    assert error["type"] == "cluster_unavailable"
    for n in nodes.ids:  # every node named with why
        assert f"{n}: unhealthy: connection refused at http://{n}:8080" in error["message"], error["message"]
    assert sum(nodes.calls.values()) == 3


def test_a_node_left_untried_keeps_the_529(nodes: Nodes) -> None:
    """Only when no node of the pool is left is it the cluster's state; with max_attempts 2 of 3 nodes it is not."""
    settings = load_settings(
        env={"MLXMUX_HEALTH_INTERVAL_S": "60", "MLXMUX_MAX_ATTEMPTS": "2"},
        nodes=[f"{n}=http://{n}:8080" for n in nodes.ids],
    )
    for n in nodes.ids:
        nodes.answer[n] = raising(refused())
    with TestClient(build_app(settings, store=MemoryStore(), transport=httpx.MockTransport(nodes))) as client:
        r = client.post("/v1/messages", json=VALID)
    assert r.status_code == 529 and error_of(r)["type"] == "overloaded_error"
    assert sum(nodes.calls.values()) == 2
