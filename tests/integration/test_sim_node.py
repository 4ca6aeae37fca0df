"""The simulated mlx_lm.server over real HTTP: endpoints, streaming, prompt cache, tool calls, faults.

The sim speaks HTTP/1.0 like mlx_lm.server: these tests read some answers off a raw socket to see the status
line, the missing lengths and when the server closes.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.procs import Proc, free_port

MODEL = "mlx-community/Qwen3-Coder-30B-A3B-Instruct-4bit"
TOOLS = [
    {"type": "function", "function": {"name": "Read", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "Bash", "parameters": {"type": "object"}}},
]


def start(*args: str, name: str) -> Proc:
    port = free_port()
    return Proc([sys.executable, "-m", "proxy.sim", "--port", str(port), *args], port=port, name=name)


class Node:
    """A running sim node and one pooled client for it (a new httpx client per call costs ~30 ms)."""

    def __init__(self, url: str, http: httpx.Client) -> None:
        self.url = url
        self.http = http

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return self.http.post(self.url + path, **kw)

    def get(self, path: str) -> httpx.Response:
        return self.http.get(self.url + path)

    def chat(self, body: dict[str, Any], **kw: Any) -> httpx.Response:
        return self.post("/v1/chat/completions", json=body, **kw)

    def stats(self) -> dict[str, Any]:
        return self.get("/_sim/stats").json()  # type: ignore[no-any-return]

    def faults(self, **faults: Any) -> None:
        self.post("/_sim/faults", json=faults).raise_for_status()


@pytest.fixture(scope="module")
def nodes() -> Iterator[tuple[Node, Node]]:
    """alpha: 10 ms per token, 2 slots, --anthropic. beta: instant decode, 2 cache entries, prefill in small steps."""
    alpha = start("--id", "alpha", "--token-delay-ms", "10", "--reply-tokens", "20", "--prefill-tps", "0",
                  "--parallel", "2", "--anthropic", name="sim-alpha")  # fmt: skip
    beta = start("--id", "beta", "--prompt-cache-size", "2", "--token-delay-ms", "0", "--prefill-tps", "20000",
                 "--prefill-step-size", "256", name="sim-beta")  # fmt: skip
    with alpha, beta, httpx.Client(timeout=5) as http:
        alpha.wait_ready()
        beta.wait_ready()
        yield Node(alpha.url, http), Node(beta.url, http)


@pytest.fixture
def alpha(nodes: tuple[Node, Node]) -> Node:
    return nodes[0]


@pytest.fixture
def beta(nodes: tuple[Node, Node]) -> Node:
    return nodes[1]


@pytest.fixture(autouse=True)
def clean(nodes: tuple[Node, Node]) -> None:
    for node in nodes:
        node.faults()
        node.post("/_sim/reset").raise_for_status()


def wait_for(predicate: Any, timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


class Stream:
    """What a streaming client saw: data chunks (parsed), comments, [DONE], arrival times."""

    def __init__(self) -> None:
        self.chunks: list[dict[str, Any]] = []
        self.times: list[float] = []
        self.comments: list[str] = []
        self.done = False
        self.status = 0

    @property
    def content(self) -> str:
        return "".join(c["choices"][0]["delta"].get("content", "") for c in self.chunks if c["choices"])

    @property
    def usage(self) -> dict[str, Any] | None:
        return next((c["usage"] for c in self.chunks if not c["choices"]), None)

    @property
    def finish_reason(self) -> str | None:
        return next((c["choices"][0]["finish_reason"] for c in self.chunks if c["choices"]
                     and c["choices"][0]["finish_reason"]), None)  # fmt: skip


def stream_chat(
    node: Node, body: dict[str, Any], headers: dict[str, str] | None = None, out: Stream | None = None
) -> Stream:
    s = out or Stream()
    body = {"stream": True, **body}
    with node.http.stream("POST", node.url + "/v1/chat/completions", json=body, headers=headers) as r:
        s.status = r.status_code
        for line in r.iter_lines():
            if line.startswith(":"):
                s.comments.append(line)
            elif line == "data: [DONE]":
                s.done = True
            elif line.startswith("data: "):
                s.chunks.append(json.loads(line[6:]))
                s.times.append(time.monotonic())
    return s


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


class Raw:
    """One request on a fresh socket, read until the server closes it (what an HTTP/1.0 client does)."""

    def __init__(self, url: str, method: str, path: str, body: bytes | None = b"", headers: str = "") -> None:
        host, port = url.removeprefix("http://").split(":")
        length = "" if body is None else f"Content-Length: {len(body)}\r\n"
        request = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: keep-alive\r\n{headers}{length}\r\n"
        data = b""
        self.done_at = self.closed_at = 0.0
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(request.encode() + (body or b""))
            while chunk := s.recv(65536):
                data += chunk
                if not self.done_at and b"data: [DONE]\n\n" in data:
                    self.done_at = time.monotonic()
            self.closed_at = time.monotonic()
        head, _, self.body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status_line = lines[0]
        self.status = int(lines[0].split()[1])
        self.headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}

    def json(self) -> Any:
        return json.loads(self.body)


def chat_body(**kw: Any) -> bytes:
    return json.dumps({"messages": [user("hi")], **kw}).encode()


# --- endpoints ----------------------------------------------------------------------------------------------


def test_models_health_and_not_found(alpha: Node, beta: Node) -> None:
    models = alpha.get("/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"]) for m in models["data"]] == [(MODEL, "model")]
    assert isinstance(models["data"][0]["created"], int)
    assert alpha.get("/health").json() == {"status": "ok"}
    for method, path in [("GET", "/nope"), ("POST", "/v1/chat/completions?beta=true"), ("GET", "/health/")]:
        r = alpha.http.request(method, alpha.url + path)
        assert (r.status_code, r.text) == (404, "Not Found")
    assert beta.post("/v1/messages", json={}).status_code == 404  # no --anthropic on beta
    r = alpha.chat({"model": "claude-opus-4", "messages": [user("hi")]})
    assert r.status_code == 404
    assert "claude-opus-4" in r.json()["error"]
    r = alpha.post("/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400
    assert "Invalid JSON" in r.json()["error"]


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ({"messages": [user("hi")], "max_tokens": 0}, "max_tokens must be at least 1"),
        ({"messages": [user("hi")], "max_completion_tokens": -5, "max_tokens": 9}, "max_tokens must be at least 1"),
        ({"messages": [user("hi")], "max_tokens": "lots"}, "max_tokens must be of type int"),
        ({"messages": [user("hi")], "stream": "yes"}, "stream must be of type bool"),
        ({"messages": [user("hi")], "temperature": -1}, "temperature must be at least 0"),
        ({"messages": [user("hi")], "temperature": "hot"}, "temperature must be of type ('float', 'int')"),
        ({"messages": [user("hi")], "top_p": 2}, "top_p must be at most 1"),
        ({"messages": [user("hi")], "top_k": 1.5}, "top_k must be of type int"),
        ({"messages": [user("hi")], "xtc_probability": 0}, "xtc_probability must be of type float"),
        ({"messages": [user("hi")], "model": 7}, "requested_model must be of type str"),
        ({"max_tokens": 3}, "Request did not contain messages"),
        ({"messages": "hi"}, "'str' object has no attribute 'get'"),
        ([1], "Request should be a JSON dictionary"),
    ],
)
def test_bad_parameters_get_400_json(alpha: Node, body: Any, error: str) -> None:
    # mlx_lm.server checks types and ranges before anything else and answers 400 {"error": ...}.
    r = Raw(alpha.url, "POST", "/v1/chat/completions", json.dumps(body).encode())
    assert (r.status, r.json()) == (400, {"error": error})
    assert "content-length" not in r.headers  # mlx's errors end when the connection closes


def test_other_failures_are_404_json(alpha: Node) -> None:
    r = Raw(alpha.url, "POST", "/v1/chat/completions", json.dumps({"messages": []}).encode())
    assert (r.status, r.json()) == (
        404,
        {"error": "Cannot apply chat template to an empty conversation. Provide at least one message."},
    )
    parts = [{"type": "image_url", "image_url": {"url": "data:,"}}]
    r = Raw(alpha.url, "POST", "/v1/chat/completions", chat_body(messages=[{"role": "user", "content": parts}]))
    assert (r.status, r.json()) == (404, {"error": "Only 'text' content type is supported."})
    r = Raw(alpha.url, "POST", "/v1/chat/completions", chat_body(model="claude-opus-4"))
    assert r.status == 404 and "claude-opus-4" in r.json()["error"]
    r = Raw(alpha.url, "POST", "/v1/chat/completions", b"{not json")
    assert r.status == 400 and r.json()["error"].startswith("Invalid JSON in request body: Expecting property name")
    r = Raw(alpha.url, "POST", "/v1/chat/completions", None, headers="Transfer-Encoding: chunked\r\n")
    assert (r.status, r.json()) == (411, {"error": "Content-Length header is required"})
    assert alpha.stats()["completed"] == 0


# --- HTTP/1.0, as mlx_lm.server's BaseHTTPRequestHandler ---------------------------------------------------------


def test_every_answer_is_http10_and_closes(alpha: Node) -> None:
    stream = Raw(alpha.url, "POST", "/v1/chat/completions", chat_body(stream=True, max_tokens=3))
    assert stream.status_line == "HTTP/1.0 200 OK"
    assert stream.headers["server"].startswith("BaseHTTP/0.6 Python/") and "date" in stream.headers
    assert stream.headers["content-type"] == "text/event-stream"
    # No length and no chunked encoding: the body is the bytes until the server closed the socket.
    assert "content-length" not in stream.headers and "transfer-encoding" not in stream.headers
    assert stream.body.endswith(b"data: [DONE]\n\n")
    assert 0 <= stream.closed_at - stream.done_at < 0.5
    whole = Raw(alpha.url, "POST", "/v1/chat/completions", chat_body(max_tokens=3))
    assert whole.status_line == "HTTP/1.0 200 OK"
    assert int(whole.headers["content-length"]) == len(whole.body)  # the one answer mlx gives a length
    health = Raw(alpha.url, "GET", "/health")
    assert (health.status_line, health.body, "content-length" in health.headers) == (
        "HTTP/1.0 200 OK",
        b'{"status": "ok"}',
        False,
    )
    # httpx reads close-delimited bodies as they are.
    r = alpha.chat({"messages": [user("hi")], "max_tokens": 2})
    assert (r.http_version, r.status_code, r.json()["usage"]["completion_tokens"]) == ("HTTP/1.0", 200, 2)


def test_head_unknown_methods_and_paths(beta: Node) -> None:
    head = Raw(beta.url, "HEAD", "/")
    assert head.status_line == "HTTP/1.0 501 Unsupported method ('HEAD')"
    assert (head.headers["content-type"], head.body) == ("text/html;charset=utf-8", b"")
    put = Raw(beta.url, "PUT", "/v1/chat/completions")
    assert put.status == 501 and b"Unsupported method ('PUT')" in put.body
    assert int(put.headers["content-length"]) == len(put.body)
    nope = Raw(beta.url, "GET", "/nope")
    assert (nope.status_line, nope.body) == ("HTTP/1.0 404 Not Found", b"Not Found")
    options = Raw(beta.url, "OPTIONS", "/v1/chat/completions")
    assert (options.status, options.headers["access-control-allow-origin"]) == (204, "*")


@pytest.fixture(scope="module")
def gamma() -> Iterator[Node]:
    """A node that closes 150 ms after each response and has no model list (mlx 0.32.2 without an HF cache)."""
    with start("--id", "gamma", "--close-delay-ms", "150", "--empty-models", "--prefill-tps", "0",
               "--token-delay-ms", "0", name="sim-gamma") as proc, httpx.Client(timeout=5) as http:  # fmt: skip
        proc.wait_ready()
        yield Node(proc.url, http)


def test_stream_is_complete_at_done_before_the_close(gamma: Node) -> None:
    r = Raw(gamma.url, "POST", "/v1/chat/completions", chat_body(stream=True, max_tokens=2))
    assert r.body.endswith(b"data: [DONE]\n\n")
    assert r.closed_at - r.done_at >= 0.14  # everything arrived; the socket closed a while later
    models = Raw(gamma.url, "GET", "/v1/models")
    assert (models.status, models.headers["content-type"], models.body) == (200, "application/json", b"")


def test_non_streaming_reply_limits_and_stops(alpha: Node) -> None:
    body = {"model": MODEL, "messages": [user("hi")], "max_tokens": 4}
    r = alpha.chat(body).json()
    assert r["object"] == "chat.completion"
    choice = r["choices"][0]
    assert (choice["finish_reason"], choice["message"]["content"]) == ("length", "Hello from sim n")
    assert r["usage"]["completion_tokens"] == 4
    assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + 4
    assert r["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    r = alpha.chat({"messages": [user("hi")], "stop": ["sim"]}).json()
    assert (r["choices"][0]["finish_reason"], r["choices"][0]["message"]["content"]) == ("stop", "Hello from ")
    r = alpha.post("/v1/completions", json={"prompt": "once upon", "max_tokens": 3}).json()
    assert (r["object"], r["choices"][0]["text"]) == ("text_completion", "Hello from s")


# --- streaming and the prompt cache ------------------------------------------------------------------------


def test_stream_arrives_token_by_token(alpha: Node) -> None:
    s = stream_chat(alpha, {"messages": [user("hi")]})
    assert s.status == 200 and s.done
    assert s.content.startswith("Hello from sim node alpha.")
    assert s.usage is None  # not asked for
    assert s.finish_reason == "stop"
    first = s.chunks[0]
    assert first["object"] == "chat.completion.chunk" and first["id"].startswith("chatcmpl-")
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert len(s.chunks) > 15
    assert s.times[-1] - s.times[0] > 0.1  # ~20 tokens at 10 ms each, not one buffered burst
    # Each delta has `role` plus only the fields that have something: mlx leaves empty ones out.
    deltas = [c["choices"][0]["delta"] for c in s.chunks]
    assert all(d["role"] == "assistant" and all(d[k] for k in d) for d in deltas)
    assert all(set(d) == {"role", "content"} for d in deltas[:-1])
    assert (deltas[-1], s.chunks[-1]["choices"][0]["finish_reason"]) == ({"role": "assistant"}, "stop")


def test_stream_options_without_include_usage_end_without_done(alpha: Node) -> None:
    broken = stream_chat(alpha, {"messages": [user("hi")], "max_tokens": 3, "stream_options": {}})
    assert (broken.status, broken.done, broken.usage, broken.finish_reason) == (200, False, None, "length")
    plain = stream_chat(alpha, {"messages": [user("hi")], "max_tokens": 3, "stream_options": {"include_usage": False}})
    assert (plain.done, plain.usage) == (True, None)
    usage = stream_chat(alpha, {"messages": [user("hi")], "max_tokens": 3, "stream_options": {"include_usage": True}})
    assert usage.done and usage.chunks[-1]["choices"] == [] and usage.chunks[-1]["object"] == "chat.completion"
    assert usage.usage is not None and usage.usage["completion_tokens"] == 3
    assert set(usage.usage["prompt_tokens_details"]) == {"cached_tokens"}


def test_non_streaming_message_fields(beta: Node) -> None:
    r = beta.chat({"messages": [user('/tool Read {"file_path": "/a"}')], "tools": TOOLS}).json()
    message = r["choices"][0]["message"]
    assert set(message) == {"role", "content", "tool_calls"}  # no empty "reasoning"
    assert "index" not in message["tool_calls"][0]  # only streamed calls carry an index


def test_second_turn_reads_the_first_from_cache(beta: Node) -> None:
    headers = {"x-sim-conversation": "conv-1"}
    first = [{"role": "system", "content": "You are terse. " * 50}, user("hello")]
    opts = {"stream_options": {"include_usage": True}}
    s1 = stream_chat(beta, {"messages": first, **opts}, headers)
    u1 = s1.usage
    assert u1 is not None and u1["prompt_tokens_details"]["cached_tokens"] == 0
    assert s1.chunks[-1]["choices"] == [] and s1.done
    second = [*first, {"role": "assistant", "content": s1.content}, user("and now?")]
    s2 = stream_chat(beta, {"messages": second, **opts}, headers)
    u2 = s2.usage
    assert u2 is not None
    # mlx stores prompt + generated tokens: turn 2 reuses all of turn 1.
    cached2 = u2["prompt_tokens_details"]["cached_tokens"]
    assert cached2 == u1["prompt_tokens"] + u1["completion_tokens"]
    assert f"from sim node beta. I read {u2['prompt_tokens']} prompt tokens, {cached2} from my cache" in s2.content
    st = beta.stats()
    assert st["conversations"] == ["conv-1"]
    assert st["prompt_tokens"] == u1["prompt_tokens"] + u2["prompt_tokens"]
    assert st["cached_tokens"] == u2["prompt_tokens_details"]["cached_tokens"]
    assert st["per_conversation"]["conv-1"]["requests"] == 2
    assert (st["requests"], st["completed"], st["active"]) == (2, 2, 0)


def test_lru_evicts_when_conversations_outnumber_slots(beta: Node) -> None:
    def turn(messages: list[dict[str, Any]]) -> dict[str, Any]:
        r = beta.chat({"messages": messages, "max_tokens": 3})
        return r.json()  # type: ignore[no-any-return]

    firsts = {c: [user(f"{c} " + "lorem ipsum " * 100)] for c in ("one", "two", "three")}
    replies = {c: turn(m) for c, m in firsts.items()}
    assert len(beta.stats()["cache_entries"]) == 2

    def second(c: str) -> int:
        msgs = [*firsts[c], {"role": "assistant", "content": replies[c]["choices"][0]["message"]["content"]}]
        return int(turn([*msgs, user("more")])["usage"]["prompt_tokens_details"]["cached_tokens"])

    p3 = replies["three"]["usage"]["prompt_tokens"]
    assert second("three") == p3 + 3  # still cached
    assert second("one") < 5  # evicted: only the shared first marker tokens match


def test_keepalive_comments_follow_prefill_steps(beta: Node) -> None:
    system = {"role": "system", "content": "You are terse. " * 100}
    s = stream_chat(beta, {"messages": [system, user("x" * 2000)], "max_tokens": 2})
    total = beta.stats()["prompt_tokens"]
    steps = [c.removeprefix(": keepalive ").split("/") for c in s.comments]
    assert {int(m) for _, m in steps} == {total}  # N/M: M is what was not cached (everything here)
    done = [int(n) for n, _ in steps]
    # Steps of at most --prefill-step-size (256) that stop at the end of the system part; the last prompt
    # token comes alone at the end, as mlx's batch generator reports it.
    sys_end = next(n for n in done if n % 256)
    assert 256 < sys_end < total - 256
    assert done == [*range(256, sys_end, 256), sys_end, *range(sys_end + 256, total - 1, 256), total - 1, total]
    # A checkpoint was saved there: another question under the same system prompt reuses exactly that part.
    other = stream_chat(
        beta, {"messages": [system, user("y" * 100)], "max_tokens": 2, "stream_options": {"include_usage": True}}
    )
    assert other.usage is not None and other.usage["prompt_tokens_details"]["cached_tokens"] == sys_end


# --- tool calls ----------------------------------------------------------------------------------------------


def test_tool_directive_makes_one_whole_tool_call(beta: Node) -> None:
    msgs: list[dict[str, Any]] = [user('please /tool Read {"file_path": "/etc/hosts"}')]
    s = stream_chat(beta, {"messages": msgs, "tools": TOOLS})
    calls = [c for c in s.chunks if c["choices"] and c["choices"][0]["delta"].get("tool_calls")]
    assert len(calls) == 1
    (call,) = calls[0]["choices"][0]["delta"]["tool_calls"]
    assert (call["type"], call["index"], call["function"]["name"]) == ("function", 0, "Read")
    assert call["id"]
    assert json.loads(call["function"]["arguments"]) == {"file_path": "/etc/hosts"}
    assert s.finish_reason == "tool_calls"
    # The tool result comes back: the node quotes it.
    msgs += [
        {"role": "assistant", "content": s.content, "tool_calls": [dict(call, index=None)]},
        {"role": "tool", "tool_call_id": call["id"], "content": "127.0.0.1 localhost"},
    ]
    r = beta.chat({"messages": msgs, "tools": TOOLS}).json()
    assert '"127.0.0.1 localhost"' in r["choices"][0]["message"]["content"]
    assert r["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_tool_turn_keeps_the_previous_entry(beta: Node) -> None:
    # As with Qwen3-Coder's template on the real server, the assistant's text and its tool call re-render with
    # a separator the model did not generate: the next turn reuses turn 1's prompt and the reply's text only,
    # and turn 1's entry is not a prefix of the new one, so the node keeps both.
    opts = {"tools": TOOLS, "stream_options": {"include_usage": True}}
    msgs: list[dict[str, Any]] = [user('/tool Read {"file_path": "/etc/hosts"}')]
    s1 = stream_chat(beta, {"messages": msgs, **opts})
    (call,) = [tc for c in s1.chunks if c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    msgs += [
        {"role": "assistant", "content": s1.content, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "127.0.0.1 localhost"},
    ]
    s2 = stream_chat(beta, {"messages": msgs, **opts})
    u1, u2 = s1.usage, s2.usage
    assert u1 is not None and u2 is not None
    text_tokens = -(-len(s1.content.encode()) // 4)
    assert u2["prompt_tokens_details"]["cached_tokens"] == u1["prompt_tokens"] + text_tokens
    entries = beta.stats()["cache_entries"]
    assert entries == [
        {"tokens": u1["prompt_tokens"] + u1["completion_tokens"], "kind": "assistant"},
        {"tokens": u2["prompt_tokens"] + u2["completion_tokens"], "kind": "assistant"},
    ]
    # A plain text turn after that extends turn 2's entry, which is replaced: still two entries.
    msgs += [{"role": "assistant", "content": s2.content}, user("thanks")]
    s3 = stream_chat(beta, {"messages": msgs, **opts})
    assert s3.usage is not None
    assert s3.usage["prompt_tokens_details"]["cached_tokens"] == u2["prompt_tokens"] + u2["completion_tokens"]
    kept = beta.stats()["cache_entries"]
    assert [e["tokens"] for e in kept] == [
        entries[0]["tokens"],
        s3.usage["prompt_tokens"] + s3.usage["completion_tokens"],
    ]


def test_run_directive_calls_bash(beta: Node) -> None:
    # Text parts are joined with nothing in between, as mlx does: the directive still counts.
    parts = [{"type": "text", "text": "<system-reminder>r</system-reminder>"}, {"type": "text", "text": "run: ls -la"}]
    r = beta.chat({"messages": [{"role": "user", "content": parts}], "tools": TOOLS}).json()
    (call,) = r["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "Bash"
    assert json.loads(call["function"]["arguments"])["command"] == "ls -la"
    assert r["choices"][0]["finish_reason"] == "tool_calls"


def test_directives_inside_reminders_or_mid_line_are_ignored(beta: Node) -> None:
    # Claude Code puts skill lists and context into <system-reminder> sections of the user's message.
    reminder = "<system-reminder>Skills:\nrun: the app\n/tool Bash {}</system-reminder>"
    for text in (reminder + "Say hello", "Say hello, we will run: nothing"):
        r = beta.chat({"messages": [user(text)], "tools": TOOLS}).json()
        assert not r["choices"][0]["message"].get("tool_calls"), text
        assert r["choices"][0]["finish_reason"] in {"stop", "length"}


# --- faults ---------------------------------------------------------------------------------------------------


def test_fail_status_rate_and_times(alpha: Node) -> None:
    body = {"messages": [user("hi")], "max_tokens": 1}
    alpha.faults(fail_status=500, fail_rate=0.5)
    codes = [alpha.chat(body).status_code for _ in range(4)]
    assert codes == [200, 500, 200, 500]
    alpha.faults(fail_status=503, times=1)
    r = alpha.chat(body)
    assert (r.status_code, "error" in r.json()) == (503, True)
    assert alpha.chat(body).status_code == 200
    alpha.faults(health_status=503)
    assert alpha.get("/health").status_code == 503


def test_cut_stream_without_done(alpha: Node) -> None:
    alpha.faults(cut_after=3)  # "drop": the connection is reset after 3 chunks
    s = Stream()
    with pytest.raises(httpx.ReadError):
        stream_chat(alpha, {"messages": [user("hi")]}, out=s)
    assert (len(s.chunks), s.done) == (3, False)
    # "eof", what mlx does when generation fails mid-stream: over HTTP/1.0 the stream just ends, no [DONE].
    alpha.faults(cut_after=2, cut_mode="eof")
    s = stream_chat(alpha, {"messages": [user("hi")]})
    assert (len(s.chunks), s.done) == (2, False)
    wait_for(lambda: alpha.stats()["generating"] == 0)


def test_close_without_response(alpha: Node) -> None:
    alpha.faults(close=True)
    with pytest.raises(httpx.RemoteProtocolError):
        alpha.chat({"messages": [user("hi")]})
    assert alpha.stats()["active"] == 0


def test_hang_ends_when_the_client_leaves_or_faults_clear(alpha: Node) -> None:
    alpha.faults(hang=True)
    with pytest.raises(httpx.ReadTimeout):
        alpha.chat({"messages": [user("hi")]}, timeout=0.3)
    wait_for(lambda: alpha.stats()["active"] == 0, timeout=10)  # the client left: the hang ends
    result: list[int] = []
    body = {"messages": [user("hi")], "max_tokens": 2}
    t = threading.Thread(target=lambda: result.append(alpha.chat(body, timeout=30).status_code))
    t.start()
    # Clear the faults only once the request is held by the hang (not merely arrived), so the test sees a
    # hang end; the sim also releases a request whose hang fault was cleared before it began to wait.
    wait_for(lambda: alpha.stats()["hanging"] == 1, timeout=10)
    alpha.faults()
    t.join(30)
    assert result == [200]
    assert alpha.stats()["hanging"] == 0


def test_parallel_slots_queue_extra_requests(alpha: Node) -> None:
    codes: list[int] = []
    body = {"messages": [user("hi")], "max_tokens": 15}
    threads = [threading.Thread(target=lambda: codes.append(alpha.chat(body).status_code)) for _ in range(3)]
    for t in threads:
        t.start()
    wait_for(lambda: (lambda s: (s["generating"], s["queued"]))(alpha.stats()) == (2, 1))
    for t in threads:
        t.join(5)
    assert codes == [200, 200, 200]
    assert alpha.stats()["completed"] == 3


def test_client_disconnect_stops_generation(alpha: Node) -> None:
    body = {"messages": [user("hi")], "stream": True}
    with alpha.http.stream("POST", alpha.url + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))
    wait_for(lambda: alpha.stats()["generating"] == 0, timeout=1.0)  # well before the ~200 ms reply would end
    st = alpha.stats()
    assert (st["completed"], st["disconnects"], st["active"]) == (0, 1, 0)
    # Like mlx's batched server, an abandoned request stores nothing at the end: only the checkpoint its
    # prefill saved (the prompt but its last token) stays.
    assert st["cache_entries"] == [{"tokens": st["prompt_tokens"] - 1, "kind": "user"}]


# --- native Anthropic Messages (--anthropic) ------------------------------------------------------------------


def test_anthropic_messages_stream_with_cache_usage(alpha: Node) -> None:
    def events(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        body = {"model": "any", "max_tokens": 5, "stream": True, "system": "be brief " * 30, "messages": messages}
        with alpha.http.stream("POST", alpha.url + "/v1/messages", json=body) as r:
            return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]

    first = events([user("hi")])
    types = [e["type"] for e in first]
    assert types[0] == "message_start" and types[-2:] == ["message_delta", "message_stop"]
    assert "content_block_start" in types and "content_block_stop" in types
    text = "".join(e["delta"]["text"] for e in first if e["type"] == "content_block_delta")
    assert first[-2]["delta"]["stop_reason"] == "max_tokens"
    second = events([user("hi"), {"role": "assistant", "content": [{"type": "text", "text": text}]}, user("more")])
    usage = second[0]["message"]["usage"]
    assert usage["cache_read_input_tokens"] > first[0]["message"]["usage"]["input_tokens"]
