"""What one misbehaving node can cost, against a real gateway process (issue 11):

- a node that dribbles its answer a byte at a time, or sends keepalives forever, holds a request (and
  its lease) no longer than `timeouts.stream_deadline_s`: then the client gets an `error` event (or a
  504 when nothing was sent) and the attempt counts as a node timeout, not retried elsewhere;
- a node sending one endless line is cut at `server.max_answer_bytes` in time linear in the bytes,
  while `/health` keeps answering.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.test_broken_nodes import JSON, SSE, FakeNode, chunk
from tests.procs import Proc, gateway

pytestmark = pytest.mark.slow

BODY = {"model": "claude-opus-4-8", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
DEADLINE_S = 2.0
DRIP_S = 0.05  # between two bytes (or two keepalives): far below every silence limit
ENDLESS_CAP = 48 * 1024 * 1024


class SlowNode(FakeNode):
    """A node that is never silent and never done, or one that sends a line without end."""

    def __init__(self) -> None:
        super().__init__()
        self.mode = "dribble"
        self.sent = 0  # bytes of the endless line written

    async def _answer(self, w: asyncio.StreamWriter, stream: bool) -> None:
        if self.mode == "dribble" and not stream:  # a whole answer that never ends, a byte at a time
            await self._send(w, 200, JSON, b'{"choices": [{"message": {"content": "', length=False)
            while True:
                await asyncio.sleep(DRIP_S)
                w.write(b"a")
                await w.drain()
        elif self.mode == "dribble":  # one token at once, then the next ones a byte at a time, forever
            await self._send(w, 200, SSE, chunk(content="first"), length=False)
            while True:
                for byte in chunk(content="more"):
                    await asyncio.sleep(DRIP_S)
                    w.write(bytes([byte]))
                    await w.drain()
        elif self.mode == "keepalive":  # "prefill progress" that never ends: no content at all
            await self._send(w, 200, SSE, b"", length=False)
            for n in range(1, 1_000_000):
                await asyncio.sleep(DRIP_S)
                w.write(b": keepalive %d/10000000\n\n" % n)
                await w.drain()
        elif self.mode == "endless_line":  # one SSE line that never ends, 64 KB at a time
            await self._send(w, 200, SSE, b"data: ", length=False)
            piece = b"x" * 65536
            while self.sent < 2 * ENDLESS_CAP:
                w.write(piece)
                await w.drain()
                self.sent += len(piece)
        else:
            await super()._answer(w, stream)


@pytest.fixture(scope="module")
def nodes() -> Iterator[tuple[SlowNode, SlowNode]]:
    with SlowNode() as a, SlowNode() as b:
        yield a, b


@pytest.fixture(scope="module")
def gw(nodes: tuple[SlowNode, SlowNode]) -> Iterator[Proc]:
    env = {
        "MLXMUX_STREAM_DEADLINE_S": str(DEADLINE_S),
        "MLXMUX_FIRST_BYTE_TIMEOUT_S": "10",
        "MLXMUX_BETWEEN_CHUNKS_TIMEOUT_S": "1",
        "MLXMUX_PING_INTERVAL_S": "0.3",
        "MLXMUX_MAX_ATTEMPTS": "3",
        "MLXMUX_REQUEST_FAIL_THRESHOLD": "1000",
        "MLXMUX_HEALTH_INTERVAL_S": "30",
        "MLXMUX_MAX_ANSWER_BYTES": str(ENDLESS_CAP),
    }
    a, b = nodes
    with gateway(f"a={a.url}", f"b={b.url}", env=env) as g:
        yield g
        assert g.proc.poll() is None and "Traceback" not in g.output()


def events_within(r: httpx.Response, give_up_s: float) -> list[tuple[str, dict]]:
    """The stream's events, read for at most `give_up_s` seconds (a stream that never ends is cut here)."""
    events, name, started = [], None, time.monotonic()
    for line in r.iter_lines():
        if line.startswith("event:"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("data:") and name:
            events.append((name, json.loads(line[5:])))
        if time.monotonic() - started > give_up_s:
            break
    return events


def access_line(gw: Proc, request_id: str) -> str:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for line in gw.output().splitlines():
            if "mlxmux.access" in line and request_id in line:
                return line
        time.sleep(0.05)
    raise AssertionError(f"no access line for {request_id}:\n{gw.output()[-3000:]}")


def last_errors(gw: Proc) -> dict[str, str]:
    nodes = httpx.get(gw.url + "/cluster", timeout=5).json()["nodes"]
    return {n["id"]: n.get("last_error", "") for n in nodes}


@pytest.mark.parametrize("mode", ["dribble", "keepalive"])
def test_a_stream_that_never_ends_is_cut_at_the_deadline(nodes: tuple[SlowNode, SlowNode], gw: Proc, mode: str) -> None:
    for node in nodes:
        node.mode = mode
    started = time.monotonic()
    with httpx.stream("POST", gw.url + "/v1/messages", json={**BODY, "stream": True}, timeout=30) as r:
        assert r.status_code == 200
        events = events_within(r, DEADLINE_S + 10)
        request_id = r.headers["request-id"]
    elapsed = time.monotonic() - started
    assert DEADLINE_S <= elapsed < DEADLINE_S + 2.0, elapsed  # not the 30 s first-byte limit, not forever
    names = [n for n, _ in events]
    assert names[0] == "message_start" and names[-1] == "error" and "message_stop" not in names
    assert ("content_block_delta" in names) == (mode == "dribble")
    if mode == "keepalive":
        assert names.count("ping") >= 3  # the node's keepalives reached the client as pings meanwhile
    error = events[-1][1]["error"]
    assert f"within the request deadline of {DEADLINE_S:g}s" in error["message"], error
    line = access_line(gw, request_id)
    assert "status=stream_error" in line and "attempts=1" in line, line  # the deadline left no time to retry
    node = line.split("node=")[1].split()[0]
    assert "request deadline" in last_errors(gw)[node]  # a node timeout, on the node's record


def test_a_whole_answer_that_never_ends_is_a_504_at_the_deadline(nodes: tuple[SlowNode, SlowNode], gw: Proc) -> None:
    for node in nodes:
        node.mode = "dribble"
    started = time.monotonic()
    r = httpx.post(gw.url + "/v1/messages", json=BODY, timeout=30)  # the 10 s first-byte limit is the last resort
    elapsed = time.monotonic() - started
    assert DEADLINE_S <= elapsed < DEADLINE_S + 2.0, elapsed
    assert r.status_code == 504, r.text
    error = r.json()["error"]
    assert error["type"] == "timeout_error" and "request deadline of 2s" in error["message"], error
    line = access_line(gw, r.headers["request-id"])
    assert "status=504" in line and "attempts=1" in line, line


def cpu_seconds(proc: Proc) -> float:
    """User + system CPU time the process has used so far (/proc/PID/stat, clock ticks of 1/100 s)."""
    fields = Path(f"/proc/{proc.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


def test_an_endless_line_is_cut_at_the_cap_in_linear_time(nodes: tuple[SlowNode, SlowNode], gw: Proc) -> None:
    for node in nodes:
        node.mode, node.sent = "endless_line", 0
    health: list[int] = []
    stop = threading.Event()

    def poll_health() -> None:
        with httpx.Client(timeout=2.0) as client:  # a stalled event loop fails this poll
            while not stop.is_set():
                try:
                    health.append(client.get(gw.url + "/health").status_code)
                except httpx.HTTPError:
                    health.append(0)
                time.sleep(0.05)

    poller = threading.Thread(target=poll_health)
    cpu_before = cpu_seconds(gw)
    poller.start()
    try:
        with httpx.stream("POST", gw.url + "/v1/messages", json={**BODY, "stream": True}, timeout=60) as r:
            events = events_within(r, 120)
    finally:
        stop.set()
        poller.join(10)
    cpu = cpu_seconds(gw) - cpu_before
    assert events[-1][0] == "error", events
    assert f"stream event over {ENDLESS_CAP} bytes" in events[-1][1]["error"]["message"]
    assert len(health) >= 5 and set(health) == {200}, health  # /health answered all along
    # Each node tried (the failure comes before any content, so the other one is tried too) was read up
    # to the cap, then hung up on.
    sent = [n.sent for n in nodes if n.sent]
    assert sent and all(ENDLESS_CAP - 2 * 65536 <= s < ENDLESS_CAP + 16 * 1024 * 1024 for s in sent), sent
    # Quadratic buffering of a 48 MB line copies ~18 GB (about 9 s of CPU here); linear: well under a second.
    assert cpu < 1.5 * len(sent), f"{cpu:.2f} s of gateway CPU to relay {len(sent)} line(s) of {ENDLESS_CAP} bytes"
    for node in nodes:
        node.mode = "ok"
    r = httpx.post(gw.url + "/v1/messages", json=BODY, timeout=10)
    assert r.status_code == 200 and json.loads(r.text)["content"], r.text
