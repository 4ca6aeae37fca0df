"""Hostile clients against one real gateway process: malformed, oversized, deeply nested, wrongly typed
and non-UTF-8 bodies, huge headers, trickling bodies. Each gets a 4xx Anthropic error naming the
problem; the gateway never answers 5xx, never hangs and keeps serving valid requests."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from proxy.errors import InvalidRequest
from proxy.wire.anthropic import decode_messages_request
from tests.procs import Proc, gateway, sim_node
from tests.unit.test_fuzz_translate import nested, raw_bodies

pytestmark = pytest.mark.slow

ENV = {
    "MLXMUX_BODY_TIMEOUT_S": "1",
    "MLXMUX_MAX_MESSAGES": "50",
    "MLXMUX_MAX_TOOLS": "20",
    "MLXMUX_MAX_BODY_BYTES": "1000000",
    "MLXMUX_REQUEST_FAIL_THRESHOLD": "1000",
}
VALID = {"model": "claude-opus-4-8", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def gw() -> Iterator[Proc]:
    with (
        sim_node("--id", "n1", "--token-delay-ms", "0", "--reply-tokens", "4", name="n1") as node,
        gateway(f"n1={node.url}", env=ENV) as g,
    ):
        yield g
        assert g.proc.poll() is None, "the gateway died"
        assert "Traceback" not in g.output()


@pytest.fixture(scope="module")
def http(gw: Proc) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gw.url, timeout=10) as c:
        yield c


def assert_error(r: httpx.Response, status: int | None = None, type_: str | None = None) -> str:
    """A clean Anthropic error with a request id; returns its message."""
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    if status is not None:
        assert r.status_code == status, r.text[:300]
    assert r.headers["request-id"].startswith("req_")
    body = r.json()
    assert body["type"] == "error" and body["request_id"] == r.headers["request-id"]
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if type_ is not None:
        assert body["error"]["type"] == type_, body
    return str(body["error"]["message"])


content_types = st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", "", "a/b"])


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
)
@given(body=raw_bodies(), content_type=content_types, stream=st.booleans())
def test_any_body_gets_a_named_4xx_or_a_normal_answer(
    http: httpx.Client, body: bytes, content_type: str, stream: bool
) -> None:
    if stream and body.startswith(b"{"):
        body = body.replace(b"{", b'{"stream":true,', 1)
    r = http.post("/v1/messages", content=body, headers={"content-type": content_type})
    try:
        decode_messages_request(body)
    except InvalidRequest as exc:
        expected = exc.message
    else:
        expected = None  # a valid request after all (or one the limits refuse)
    if expected is not None:
        assert assert_error(r, 400, "invalid_request_error") == expected
    elif r.status_code != 200:
        # msgspec's depth limit is Python's recursion limit, counted from the caller's own stack depth:
        # a body some 950 levels deep can decode here and be refused in the server.
        message = assert_error(r, 400)
        assert "limit" in message or "nested too deeply" in message or "rejected" in message


def test_deeply_nested_bodies_are_400_not_500(http: httpx.Client) -> None:
    base = b'{"model":"m","max_tokens":1,"messages":[{"role":"user","content":"x"}]'
    for body in (
        base + b',"extra":' + nested(100_000) + b"}",
        base + b',"tools":[{"name":"t","input_schema":' + nested(100_000, b"{}") + b"}]}",
        nested(100_000),
    ):
        message = assert_error(http.post("/v1/messages", content=body), 400, "invalid_request_error")
        assert "nested too deeply" in message or "Expected `object`" in message
    count = http.post("/v1/messages/count_tokens", content=base + b',"x":' + nested(50_000) + b"}")
    assert "nested too deeply" in assert_error(count, 400)


def test_non_utf8_and_wrong_types_name_the_problem(http: httpx.Client) -> None:
    bad_utf8 = json.dumps(VALID).encode().replace(b"hi", b"h\xff\xfe")
    assert "UTF-8" in assert_error(http.post("/v1/messages", content=bad_utf8), 400)
    wrong = {**VALID, "max_tokens": "lots"}
    assert "max_tokens" in assert_error(http.post("/v1/messages", json=wrong), 400)
    block = {**VALID, "messages": [{"role": "user", "content": [{"type": "hologram"}]}]}
    assert "hologram" in assert_error(http.post("/v1/messages", json=block), 400)


def test_message_and_tool_count_limits(http: httpx.Client) -> None:
    many = {**VALID, "messages": [{"role": "user", "content": "x"}] * 51}
    assert "limit is 50" in assert_error(http.post("/v1/messages", json=many), 400, "invalid_request_error")
    tools = {**VALID, "tools": [{"name": f"t{i}", "input_schema": {}} for i in range(21)]}
    assert "limit is 20" in assert_error(http.post("/v1/messages", json=tools), 400)
    assert "limit is 20" in assert_error(http.post("/v1/messages/count_tokens", json=tools), 400)


def test_oversized_body_is_refused_before_it_is_sent(gw: Proc) -> None:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-length: 100000000\r\n\r\n{")
        received = b""
        while chunk := s.recv(4096):  # the gateway answers and hangs up without waiting for the 100 MB
            received += chunk
    assert received.startswith(b"HTTP/1.1 413") and b"connection: close" in received
    assert b'"request_too_large"' in received and b"100000000 bytes" in received
    r = httpx.post(gw.url + "/v1/messages", content=b" " * 1_000_001, timeout=10)
    assert_error(r, 413, "request_too_large")


def test_huge_header_is_431(http: httpx.Client) -> None:
    r = http.post("/v1/messages", json=VALID, headers={"x-big": "a" * 100_000})
    assert "headers" in assert_error(r, 431, "request_too_large")


def test_trickling_body_times_out_and_frees_the_connection(gw: Proc) -> None:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=8) as s:
        s.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n" + b'{"model":')
        received = b""
        while chunk := s.recv(4096):  # until the gateway closes the connection
            received += chunk
    elapsed = time.monotonic() - started
    assert received.startswith(b"HTTP/1.1 400"), received[:200]
    body = msgspec.json.decode(received.partition(b"\r\n\r\n")[2].split(b"\r\n")[1])
    assert "not received within 1s" in body["error"]["message"]
    assert elapsed < 5


def test_valid_requests_are_still_served(http: httpx.Client) -> None:
    r = http.post("/v1/messages", json=VALID)
    assert r.status_code == 200 and r.json()["type"] == "message"
    with http.stream("POST", "/v1/messages", json={**VALID, "stream": True}) as s:
        assert s.status_code == 200
        assert "event: message_stop" in s.read().decode()
