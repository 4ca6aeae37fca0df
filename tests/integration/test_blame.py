"""Blame against real processes: one client's bad requests must not make nodes look broken to everyone.

A real gateway process in front of real sim-node processes (or, where a node must fail only some
requests the same way, small fake nodes in threads), the official `anthropic` SDK as the well-behaved
client. A hostile client sends three bad requests a second; the well-behaved client sees no error and
every node stays `healthy` in /cluster.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anthropic
import httpx
import pytest

from tests.fake_http import ChatNodeHandler, serving
from tests.procs import Proc, gateway, sim_node

pytestmark = pytest.mark.slow

FAST = ("--prefill-tps", "0", "--token-delay-ms", "1", "--reply-tokens", "6")
ENV = {"MLXMUX_HEALTH_INTERVAL_S": "0.5", "MLXMUX_HEALTH_TIMEOUT_S": "1", "MLXMUX_PING_INTERVAL_S": "0.5"}
VALID: dict[str, Any] = {"model": "claude-opus-4-8", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
POISON = "please render this poison"


def states(gw: Proc) -> dict[str, str]:
    return {n["id"]: n["state"] for n in httpx.get(gw.url + "/cluster", timeout=5).json()["nodes"]}


def wait_healthy(gw: Proc, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while set(states(gw).values()) != {"healthy"}:
        assert time.monotonic() < deadline, states(gw)
        time.sleep(0.1)


class Load:
    """A well-behaved client (anthropic SDK, streaming and not) and a hostile one, run side by side."""

    def __init__(self, gw: Proc) -> None:
        self.gw = gw
        self.good_ok = 0
        self.good_errors: list[str] = []
        self.bad_answers: list[httpx.Response] = []
        self._stop = threading.Event()

    def _good(self) -> None:
        with anthropic.Anthropic(base_url=self.gw.url, api_key="k", max_retries=0, timeout=30) as client:
            i = 0
            while not self._stop.is_set():
                i += 1
                session = {"x-claude-code-session-id": f"good-{i % 4}"}
                message: Any
                try:
                    if i % 2:
                        with client.messages.stream(
                            model="claude-opus-4-8",
                            max_tokens=16,
                            messages=[{"role": "user", "content": f"hello {i}"}],
                            extra_headers=session,
                        ) as stream:
                            message = stream.get_final_message()
                    else:
                        message = client.messages.create(
                            model="claude-opus-4-8",
                            max_tokens=16,
                            messages=[{"role": "user", "content": f"hello {i}"}],
                            extra_headers=session,
                        )
                    assert message.content, message
                    self.good_ok += 1
                except Exception as exc:
                    self.good_errors.append(repr(exc))

    def run(self, bad: Callable[[int], dict[str, Any]], seconds: float = 4.0, per_second: int = 3) -> None:
        """Run the good client while the hostile one sends `bad(i)` bodies `per_second` times a second."""
        with ThreadPoolExecutor(8) as pool:
            good = pool.submit(self._good)
            with httpx.Client(base_url=self.gw.url, timeout=30) as http:
                sent: list[Any] = []
                for i in range(int(seconds * per_second)):
                    body = bad(i)
                    sent.append(pool.submit(http.post, "/v1/messages", json=body))
                    time.sleep(1 / per_second)
                self.bad_answers = [f.result() for f in sent]
            self._stop.set()
            good.result()


@pytest.fixture
def sims() -> Iterator[tuple[Proc, list[Proc]]]:
    with contextlib.ExitStack() as stack:
        nodes = [stack.enter_context(sim_node("--id", n, *FAST, name=n)) for n in ("a", "b", "c")]
        gw = stack.enter_context(gateway(*(f"{n}={p.url}" for n, p in zip("abc", nodes, strict=True)), env=ENV))
        wait_healthy(gw)
        yield gw, nodes
        assert gw.proc.poll() is None and "Traceback" not in gw.output(), gw.output()[-3000:]


def sim_requests(nodes: list[Proc]) -> int:
    return sum(int(httpx.get(p.url + "/_sim/stats", timeout=5).json()["requests"]) for p in nodes)


BAD_SAMPLING: list[tuple[dict[str, Any], str]] = [
    ({"temperature": -1}, "temperature: range: 0..1"),
    ({"temperature": 1.5}, "temperature: range: 0..1"),
    ({"top_p": 2}, "top_p: range: 0..1"),
    ({"top_k": -1}, "top_k: must be >= 0"),
]


def test_bad_sampling_parameters_are_refused_before_any_node_sees_them(sims: tuple[Proc, list[Proc]]) -> None:
    gw, nodes = sims
    load = Load(gw)
    load.run(lambda i: {**VALID, **BAD_SAMPLING[i % len(BAD_SAMPLING)][0], "stream": i % 2 == 1})
    for i, r in enumerate(load.bad_answers):
        assert r.status_code == 400, r.text
        assert r.headers["x-should-retry"] == "false"
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and BAD_SAMPLING[i % len(BAD_SAMPLING)][1] in error["message"]
    assert not load.good_errors and load.good_ok > 5, (load.good_ok, load.good_errors[:3])
    assert set(states(gw).values()) == {"healthy"}
    assert sim_requests(nodes) == load.good_ok  # not one bad request reached a node


def test_hostile_session_ids_are_served_and_blame_no_node(sims: tuple[Proc, list[Proc]]) -> None:
    gw, nodes = sims
    deep = '{"x":' + "[" * 50_000 + "]" * 50_000 + ',"session_id":"s"}'
    cases: list[tuple[dict[str, Any], dict[bytes, bytes]]] = [
        ({"metadata": {"user_id": json.dumps({"session_id": "abc\r\nx-injected: yes"})}}, {}),
        ({"metadata": {"user_id": json.dumps({"session_id": "sessão-世界"})}}, {}),
        ({"metadata": {"user_id": deep}}, {}),
        ({"metadata": {"user_id": "u" * 20_000}}, {}),
        ({}, {b"x-claude-code-session-id": "sessão-世界".encode()}),
        ({}, {b"x-session-id": b"s" * 20_000}),
        ({}, {b"x-claude-code-session-id": b"ok", b"x-claude-code-agent-id": b"\xff\xfe" * 100}),
    ]
    with httpx.Client(base_url=gw.url, timeout=30) as http:
        for extra, headers in cases:
            for stream in (False, True):
                for _ in range(2):  # the same odd id twice: the same node both times (a stable key)
                    r = http.post("/v1/messages", json={**VALID, **extra, "stream": stream}, headers=headers)
                    assert r.status_code == 200, (extra.keys(), headers.keys(), r.text[:300])
                    assert ("message_stop" in r.text) if stream else r.json()["content"]
    assert set(states(gw).values()) == {"healthy"}
    seen = [s for p in nodes for s in httpx.get(p.url + "/_sim/stats", timeout=5).json()["per_conversation"]]
    assert seen, "the sessions reached the nodes as x-session-id"
    for session in seen:
        assert session.isascii() and session.isprintable() and " " not in session and len(session) <= 257, session
    hashed = [s for s in seen if s.startswith("h:") or s.startswith("ok/h:")]
    assert len(hashed) == 5, seen  # one key per odd id (the deep and the 20 KB user_id carry no session)


# -- a request every node fails the same way ----------------------------------------------------------


def completion_stream() -> bytes:
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": "fine"}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    ]
    return b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


class PickyNode(ChatNodeHandler):
    """A chat-completions node (HTTP/1.0, like mlx_lm.server) that answers any prompt containing POISON
    with a 500 and always the same message, as every copy of the same server would."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if POISON in json.dumps(body["messages"]):
            self.reply(500, {"error": "chat template failed: unsupported content"})
        elif body.get("stream"):
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            self.wfile.write(completion_stream())
        else:
            message = {"role": "assistant", "content": "fine"}
            self.reply(200, {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})


@pytest.fixture
def picky() -> Iterator[Proc]:
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(serving(PickyNode)) for _ in range(3)]
        gw = stack.enter_context(gateway(*(f"{n}={u}" for n, u in zip("abc", urls, strict=True)), env=ENV))
        wait_healthy(gw)
        yield gw
        assert gw.proc.poll() is None and "Traceback" not in gw.output(), gw.output()[-3000:]


def test_a_request_that_fails_the_same_way_on_two_nodes_is_the_requests_fault(picky: Proc) -> None:
    load = Load(picky)
    poisoned = {**VALID, "messages": [{"role": "user", "content": POISON}]}
    load.run(lambda i: {**poisoned, "stream": i % 2 == 1})
    for r in load.bad_answers:
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error", error
        assert "both failed this request the same way" in error["message"]
        assert "HTTP 500: chat template failed: unsupported content" in error["message"]
    assert not load.good_errors and load.good_ok > 5, (load.good_ok, load.good_errors[:3])
    assert set(states(picky).values()) == {"healthy"}


# -- the gateway's own connection pool ------------------------------------------------------------------


def test_a_full_connection_pool_is_the_gateways_fault(tmp_path: Any) -> None:
    """More requests than the gateway keeps connections to a node (64): those waiting longer than
    connect_s for one get 529 with Retry-After, the node is not blamed and its probes keep passing."""
    env = {**ENV, "MLXMUX_CONNECT_TIMEOUT_S": "1", "MLXMUX_MAX_ATTEMPTS": "1"}
    with sim_node("--id", "a", *FAST, name="a") as node, gateway(f"a={node.url}", env=env) as gw:
        wait_healthy(gw)
        httpx.post(node.url + "/_sim/faults", json={"hang": True}, timeout=5).raise_for_status()

        def one(_: int) -> httpx.Response:
            return httpx.post(gw.url + "/v1/messages", json=VALID, timeout=60)

        with ThreadPoolExecutor(80) as pool:
            futures = [pool.submit(one, i) for i in range(80)]
            time.sleep(3.0)  # 64 hang on the node, the rest gave up waiting for a connection
            assert states(gw) == {"a": "healthy"}, "probes have connections of their own"
            httpx.post(node.url + "/_sim/faults", json={}, timeout=5).raise_for_status()
            answers = [f.result() for f in futures]
        full = [r for r in answers if r.status_code == 529]
        assert len(full) == 16 and sum(r.status_code == 200 for r in answers) == 64, [r.status_code for r in answers]
        for r in full:
            assert r.headers["retry-after"] == "2" and "connections to node a" in r.json()["error"]["message"]
        assert states(gw) == {"a": "healthy"}
        assert gw.proc.poll() is None and "Traceback" not in gw.output()
