"""Broken nodes behind a real gateway: garbage SSE, invalid JSON chunks, HTML pages, streams that never
close, endless bodies. Each becomes a clean Anthropic error for that request alone (an HTTP status
before any content, `event: error` after it), never a hang or a crash, and the next request is served.

The sim node covers the faults it has (`garbage`, `cut_after`); a tiny raw-socket node (`FakeNode`)
does what no well-meaning server would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.procs import Proc, free_port, gateway, sim_node

pytestmark = pytest.mark.slow

BODY = {"model": "claude-opus-4-8", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
MAX_ANSWER = 1_000_000
ENV = {
    "MLXMUX_MAX_ATTEMPTS": "1",
    "MLXMUX_REQUEST_FAIL_THRESHOLD": "1000",
    "MLXMUX_FIRST_BYTE_TIMEOUT_S": "2",
    "MLXMUX_BETWEEN_CHUNKS_TIMEOUT_S": "1",
    "MLXMUX_PING_INTERVAL_S": "0.3",
    "MLXMUX_MAX_ANSWER_BYTES": str(MAX_ANSWER),
}


def chunk(**delta: object) -> bytes:
    return b"data: " + json.dumps({"choices": [{"index": 0, "delta": delta}]}).encode() + b"\n\n"


GOOD_STREAM = chunk(content="fine") + b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
GOOD_ANSWER = json.dumps({"choices": [{"message": {"content": "fine"}, "finish_reason": "stop"}]}).encode()
HTML = b"<!DOCTYPE html><html><body><h1>502 Bad Gateway</h1></body></html>"
SSE, JSON = b"text/event-stream", b"application/json"


class FakeNode:
    """A chat-completions node on a raw asyncio server in a thread; `mode` says how it misbehaves."""

    def __init__(self) -> None:
        self.port = free_port()
        self.mode = "ok"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FakeNode:
        self._thread.start()
        assert self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._shutdown(server))
        self._loop.close()

    @staticmethod
    async def _shutdown(server: asyncio.Server) -> None:
        """Stop serving and close every connection (a stalled answer's too) before the loop closes."""
        server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
        await asyncio.sleep(0.05)  # closed transports let go of their sockets on the next loop turns

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(BaseException):
                await writer.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        length = next((int(h.split(":")[1]) for h in lines if h.lower().startswith("content-length:")), 0)
        body = await reader.readexactly(length)
        if lines[0].startswith("GET /health"):
            await self._send(writer, 200, JSON, b'{"status": "ok"}')
        elif lines[0].startswith("GET /v1/models"):
            await self._send(writer, 200, JSON, b'{"data": [{"id": "m"}]}')
        else:
            await self._answer(writer, json.loads(body).get("stream", False))

    @staticmethod
    async def _send(
        writer: asyncio.StreamWriter, status: int, ctype: bytes, body: bytes, *, length: bool = True
    ) -> None:
        head = b"HTTP/1.1 %d X\r\ncontent-type: %s\r\nconnection: close\r\n" % (status, ctype)
        if length:
            head += b"content-length: %d\r\n" % len(body)
        writer.write(head + b"\r\n" + body)
        await writer.drain()

    async def _answer(self, w: asyncio.StreamWriter, stream: bool) -> None:
        mode = self.mode
        if mode == "ok":
            await self._send(w, 200, SSE if stream else JSON, GOOD_STREAM if stream else GOOD_ANSWER, length=not stream)
        elif mode == "garbage":
            await self._send(w, 200, SSE, b"data: }{ not json\n\n", length=False)
        elif mode == "invalid_chunk":  # content (relayed at once), then a chunk of the wrong shape
            await self._send(w, 200, SSE, chunk(content="a"), length=False)
            await asyncio.sleep(0.2)
            w.write(b'data: {"choices": 7}\n\n')
        elif mode == "deep_json":  # valid JSON, nested far deeper than any decoder recurses
            deep = b"data: " * stream + b"[" * 100_000 + b"]" * 100_000 + b"\n\n" * stream
            await self._send(w, 200, SSE if stream else JSON, deep, length=False)
        elif mode == "html_200":
            await self._send(w, 200, b"text/html", HTML)
        elif mode == "html_502":
            await self._send(w, 502, b"text/html", HTML)
        elif mode == "never_close":  # some content, then silence on an open connection
            await self._send(w, 200, SSE if stream else JSON, chunk(content="a") if stream else b'{"choi', length=False)
            await asyncio.sleep(3600)
        elif mode == "huge":  # an endless body: one SSE line, or one JSON document, that never ends
            await self._send(w, 200, SSE if stream else JSON, b"data: " if stream else b'{"id": "', length=False)
            for _ in range(400):  # 20 MB at most
                w.write(b"x" * 50_000)
                await w.drain()


def rss_kb(proc: Proc) -> int:
    status = Path(f"/proc/{proc.proc.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeNode]:
    with FakeNode() as node:
        yield node


@pytest.fixture(scope="module")
def gw(fake: FakeNode) -> Iterator[Proc]:
    with gateway(f"fake={fake.url}", env=ENV) as g:
        yield g
        assert g.proc.poll() is None and "Traceback" not in g.output()


def sse(r: httpx.Response) -> list[tuple[str, dict]]:
    events, name = [], None
    for line in r.iter_lines():
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:") and name:
            events.append((name, json.loads(line[5:])))
    return events


def assert_served(url: str) -> None:
    r = httpx.post(url + "/v1/messages", json=BODY, timeout=10)
    assert r.status_code == 200 and r.json()["content"], r.text
    with httpx.stream("POST", url + "/v1/messages", json={**BODY, "stream": True}, timeout=10) as s:
        assert [n for n, _ in sse(s)][-1] == "message_stop"


# mode → (status, error type, words in the message) for a non-streaming request
WHOLE = {
    "garbage": (500, "api_error", "invalid completion"),
    "deep_json": (500, "api_error", "invalid completion"),
    "html_200": (500, "api_error", "invalid completion"),
    "html_502": (529, "overloaded_error", "502 Bad Gateway"),
    "never_close": (504, "timeout_error", "no complete answer in 2s"),
    "huge": (500, "api_error", f"over {MAX_ANSWER} bytes"),
}
# mode → words in the `event: error` message ending a stream, and whether content came first
STREAMED = {
    "garbage": ("invalid stream chunk", False),
    "invalid_chunk": ("invalid stream chunk", True),
    "deep_json": ("invalid stream chunk", False),
    "html_200": ("ended the stream before finishing", False),
    "never_close": ("sent nothing for 1s", True),
    "huge": (f"stream event over {MAX_ANSWER} bytes", False),
}


@pytest.mark.parametrize("mode", list(WHOLE))
def test_broken_node_whole_answer_is_a_clean_error(fake: FakeNode, gw: Proc, mode: str) -> None:
    status, kind, words = WHOLE[mode]
    fake.mode = mode
    before, started = rss_kb(gw), time.monotonic()
    r = httpx.post(gw.url + "/v1/messages", json=BODY, timeout=15)
    assert time.monotonic() - started < 5
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == kind and words in body["error"]["message"]
    assert body["request_id"] == r.headers["request-id"]
    assert rss_kb(gw) - before < 40_000  # a 20 MB answer was not buffered whole
    fake.mode = "ok"
    assert_served(gw.url)


@pytest.mark.parametrize("mode", list(STREAMED))
def test_broken_node_stream_ends_with_an_error_event(fake: FakeNode, gw: Proc, mode: str) -> None:
    words, content_first = STREAMED[mode]
    fake.mode = mode
    before, started = rss_kb(gw), time.monotonic()
    with httpx.stream("POST", gw.url + "/v1/messages", json={**BODY, "stream": True}, timeout=15) as r:
        assert r.status_code == 200
        events = sse(r)
    assert time.monotonic() - started < 5
    names = [n for n, _ in events]
    assert names[0] == "message_start" and names[-1] == "error" and "message_stop" not in names
    assert ("content_block_delta" in names) == content_first
    error = events[-1][1]["error"]
    assert error["type"] == "overloaded_error" and words in error["message"], error
    assert rss_kb(gw) - before < 40_000
    fake.mode = "ok"
    assert_served(gw.url)


def test_sim_node_garbage_and_cut_streams() -> None:
    with (
        sim_node("--id", "sim", "--token-delay-ms", "0", "--reply-tokens", "6", name="sim") as node,
        gateway(f"sim={node.url}", env=ENV) as g,
    ):
        faults = httpx.post(node.url + "/_sim/faults", json={"garbage": True, "times": 2}, timeout=5)
        faults.raise_for_status()
        r = httpx.post(g.url + "/v1/messages", json=BODY, timeout=10)
        assert r.status_code == 500 and "invalid completion" in r.json()["error"]["message"]
        with httpx.stream("POST", g.url + "/v1/messages", json={**BODY, "stream": True}, timeout=10) as s:
            events = sse(s)
        assert events[-1][0] == "error" and "invalid stream chunk" in events[-1][1]["error"]["message"]
        faults = httpx.post(node.url + "/_sim/faults", json={"cut_after": 2, "cut_mode": "eof", "times": 1}, timeout=5)
        faults.raise_for_status()
        with httpx.stream("POST", g.url + "/v1/messages", json={**BODY, "stream": True}, timeout=10) as s:
            events = sse(s)
        assert events[-1][0] == "error" and "before finishing" in events[-1][1]["error"]["message"]
        assert_served(g.url)
        assert "Traceback" not in g.output()
