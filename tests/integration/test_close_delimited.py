"""Nodes that speak HTTP/1.0 as mlx_lm.server does (close-delimited bodies), here ones that keep the socket
open for seconds after the answer is complete: a finished answer is a success the moment it is finished,
booked once with its usage, whatever the socket does next and however fast the client hangs up."""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fake_http import serving
from tests.procs import Proc, gateway

pytestmark = pytest.mark.slow

HOLD_S = 3.0
"""How long the fake node keeps the connection open after the answer."""


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, usage: dict[str, Any] | None = None) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    body: dict[str, Any] = {"id": "c1", "object": "chat.completion.chunk", "model": "m", "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: %s\ndata: %s\n\n" % (name.encode(), json.dumps({"type": name, **data}).encode())


USAGE = {
    "prompt_tokens": 40,
    "completion_tokens": 2,
    "total_tokens": 42,
    "prompt_tokens_details": {"cached_tokens": 30},
}
NATIVE_USAGE = {"input_tokens": 10, "cache_read_input_tokens": 30, "cache_creation_input_tokens": 0, "output_tokens": 2}


class Node(BaseHTTPRequestHandler):
    """HTTP/1.0 (BaseHTTPRequestHandler's default): no content-length on streams, the close ends the body."""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.end_headers()
        if self.path == "/health":
            self.wfile.write(b'{"status": "ok"}')  # /v1/models: an empty body, as mlx_lm 0.32.2 without a hub

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        text = json.dumps(body["messages"])
        self.send_response(200)
        if self.path == "/v1/messages" and not body.get("stream"):
            self.send_header("content-type", "application/json")
            self.end_headers()
            message = {
                "id": "msg_node",
                "type": "message",
                "role": "assistant",
                "model": "m",
                "content": [{"type": "text", "text": "Hi"}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": NATIVE_USAGE,
            }
            self.wfile.write(json.dumps(message).encode())
            return
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        if self.path == "/v1/messages":
            self.native_stream(broken="error mid-stream" in text)
        else:
            self.chat_stream(cut="cut after finish" in text)
        self.wfile.flush()
        if "error mid-stream" not in text and "cut after finish" not in text:
            time.sleep(HOLD_S)  # the answer is complete; the socket stays open a while

    def chat_stream(self, *, cut: bool) -> None:
        self.wfile.write(chunk({"role": "assistant", "content": "Hel"}))
        self.wfile.write(chunk({"content": "lo"}))
        self.wfile.write(chunk({}, finish="stop"))
        if not cut:
            self.wfile.write(chunk(usage=USAGE) + b"data: [DONE]\n\n")

    def native_stream(self, *, broken: bool) -> None:
        message = {"id": "msg_node", "type": "message", "role": "assistant", "model": "m", "content": []}
        self.wfile.write(event("message_start", {"message": {**message, "usage": NATIVE_USAGE}}))
        self.wfile.write(event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}))
        self.wfile.write(event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "Hi"}}))
        if broken:
            self.wfile.write(event("error", {"error": {"type": "overloaded_error", "message": "node melted"}}))
            return
        self.wfile.write(event("content_block_stop", {"index": 0}))
        self.wfile.write(event("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}}))
        self.wfile.write(event("message_stop", {}))


@contextlib.contextmanager
def gateway_over(url: str, protocol: str) -> Iterator[Proc]:
    with tempfile.TemporaryDirectory() as d:
        config = Path(d) / "mlxmux.toml"
        config.write_text(f'[[nodes]]\nid = "mac1"\nurl = "{url}"\nmodel = "m"\nprotocol = "{protocol}"\n')
        env = {"MLXMUX_LOG_FORMAT": "json", "MLXMUX_HEALTH_INTERVAL_S": "0.5"}
        with gateway(extra=["--config", str(config)], env=env) as gw:
            yield gw


@pytest.fixture(scope="module")
def node() -> Iterator[str]:
    with serving(Node) as url:
        yield url


@pytest.fixture(scope="module")
def chat_gw(node: str) -> Iterator[Proc]:
    with gateway_over(node, "openai") as gw:
        yield gw


@pytest.fixture(scope="module")
def native_gw(node: str) -> Iterator[Proc]:
    with gateway_over(node, "anthropic") as gw:
        yield gw


def access_lines(gw: Proc, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 5
    while True:
        lines = [json.loads(line) for line in gw.output().splitlines() if line.startswith("{")]
        found = [line for line in lines if line.get("logger") == "mlxmux.access"]
        if len(found) >= count or time.monotonic() > deadline:
            return found


def stats(gw: Proc) -> dict[str, Any]:
    (node,) = httpx.get(gw.url + "/cluster", timeout=5).json()["nodes"]
    return {"state": node["state"], **node["stats"]}


def stream_and_hang_up(gw: Proc, text: str) -> tuple[list[str], float]:
    """Stream a request, close the connection the moment the last event (message_stop or error) arrives;
    the events seen and how long it took."""
    body = {
        "model": "claude-opus-4-8",
        "max_tokens": 16,
        "stream": True,
        "messages": [{"role": "user", "content": text}],
    }
    start = time.monotonic()
    events = []
    with httpx.stream("POST", gw.url + "/v1/messages", json=body, timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("event: "):
                events.append(line.removeprefix("event: "))
                if events[-1] in ("message_stop", "error"):
                    break
    return events, time.monotonic() - start


@pytest.mark.parametrize("gw_name", ["chat_gw", "native_gw"])
def test_a_finished_stream_is_a_success_while_the_node_holds_its_socket(
    gw_name: str, request: pytest.FixtureRequest
) -> None:
    gw: Proc = request.getfixturevalue(gw_name)
    for i in range(3):
        events, took = stream_and_hang_up(gw, f"hello {i}")
        assert events[-1] == "message_stop" and "error" not in events
        assert took < HOLD_S / 2  # the client was not kept waiting for the node's close
    lines = access_lines(gw, 3)
    assert [line["status"] for line in lines] == [200] * 3
    assert [(line["prompt_tokens"], line["cached_tokens"]) for line in lines] == [(40, 30)] * 3
    s = stats(gw)
    assert (s["state"], s["ok"], s["errors"], s["cancelled"]) == ("healthy", 3, 0, 0)
    assert (s["prompt_tokens"], s["cached_tokens"]) == (120, 90)


def test_a_stream_cut_after_its_finish_reason_is_complete(chat_gw: Proc) -> None:
    before = stats(chat_gw)
    count = len(access_lines(chat_gw, 0))
    events, _ = stream_and_hang_up(chat_gw, "cut after finish")
    assert events[-2:] == ["message_delta", "message_stop"]
    (line,) = access_lines(chat_gw, count + 1)[count:]
    assert line["status"] == 200
    after = stats(chat_gw)
    assert (after["ok"], after["errors"], after["cancelled"]) == (before["ok"] + 1, before["errors"], 0)


def test_a_native_error_event_mid_stream_is_a_stream_error_sent_once(native_gw: Proc) -> None:
    before = stats(native_gw)
    count = len(access_lines(native_gw, 0))
    body = {"model": "claude-opus-4-8", "max_tokens": 16, "stream": True}
    r = httpx.post(
        native_gw.url + "/v1/messages", json={**body, "messages": [{"role": "user", "content": "error mid-stream"}]}
    )
    events = [line.removeprefix("event: ") for line in r.text.splitlines() if line.startswith("event: ")]
    assert events.count("error") == 1 and events[-1] == "error"
    assert "message_stop" not in events and "message_delta" not in events
    (line,) = access_lines(native_gw, count + 1)[count:]
    assert line["status"] == "stream_error"
    after = stats(native_gw)
    assert (after["ok"], after["errors"]) == (before["ok"], before["errors"] + 1)


def test_a_native_whole_answer_books_its_usage(native_gw: Proc) -> None:
    before = stats(native_gw)
    count = len(access_lines(native_gw, 0))
    body = {"model": "claude-opus-4-8", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(native_gw.url + "/v1/messages", json=body, timeout=30)
    assert r.status_code == 200 and r.json()["model"] == "claude-opus-4-8"
    (line,) = access_lines(native_gw, count + 1)[count:]
    assert (line["status"], line["prompt_tokens"], line["cached_tokens"]) == (200, 40, 30)
    after = stats(native_gw)
    assert after["ok"] == before["ok"] + 1
    assert (after["prompt_tokens"] - before["prompt_tokens"], after["cached_tokens"] - before["cached_tokens"]) == (
        40,
        30,
    )
