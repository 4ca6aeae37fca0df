"""The gateway in front of real `mlx_lm.server` processes (mlx-lm on mlx's CPU backend, serving the tiny
model tests/realnode.py builds locally), driven by the official anthropic SDK over real sockets.

mlx_lm.server speaks HTTP/1.0 (every stream is close-delimited), sends `/v1/models` as 200 headers and an
empty body when it has no Hugging Face cache folder, and reports its own prompt-cache hits
(`cached_tokens`): all of it must come out as successes, with the node's numbers, everywhere the gateway
reports them (access log, /cluster, /metrics, `mlxmux status`). The tiny model never emits EOS at
temperature 0, so every answer ends at max_tokens.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from anthropic.types import MessageParam
from prometheus_client.parser import text_string_to_metric_families

from tests.claude_code_request import claude_code_request, sdk_kwargs
from tests.procs import ROOT, Proc, gateway
from tests.realnode import free_port, http_request, sample_text, start_mlx_server, stop_server, wait_ready

pytestmark = pytest.mark.slow

MODEL = "claude-opus-4-8"
GW_ENV = {
    "MLXMUX_LOG_FORMAT": "json",
    "MLXMUX_HEALTH_INTERVAL_S": "0.5",
    "MLXMUX_PING_INTERVAL_S": "0.5",
}
GREEDY: dict[str, Any] = {"extra_body": {"temperature": 0}}
"""Temperature 0 (this SDK has no `temperature` argument any more): the same answer every time."""


class RealNode:
    """One `mlx_lm.server` process on a free port (start several, then `wait` for each: they load in parallel)."""

    def __init__(self, model: Path, node_id: str, *, hf_cache: bool = False, args: tuple[str, ...] = ()) -> None:
        self.id = node_id
        self.port = free_port()
        self.proc = start_mlx_server(model, self.port, hf_cache=hf_cache, extra_args=args)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait(self) -> RealNode:
        wait_ready(self.port, 120, proc=self.proc)
        return self

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        stop_server(self.proc)


@contextlib.contextmanager
def real_nodes(model: Path, *specs: tuple[str, bool, tuple[str, ...]]) -> Iterator[list[RealNode]]:
    """Start (id, hf_cache, extra args) nodes at once; stop them all at the end (killed ones too)."""
    nodes: list[RealNode] = []
    try:
        nodes.extend(RealNode(model, node_id, hf_cache=hf, args=args) for node_id, hf, args in specs)
        for node in nodes:
            node.wait()
        yield nodes
    finally:
        for node in nodes:
            node.stop()


@contextlib.contextmanager
def gateway_for(model: Path, nodes: list[RealNode], *, node_config: str = "", **env: str) -> Iterator[Proc]:
    """A gateway process over `nodes`, each configured with the model id it serves (its --model path) and
    `node_config` (TOML lines), once every node passed its probe."""
    with tempfile.TemporaryDirectory(prefix="mlxmux-real-") as d:
        config = Path(d) / "mlxmux.toml"
        config.write_text(
            "".join(f'[[nodes]]\nid = "{n.id}"\nurl = "{n.url}"\nmodel = "{model}"\n{node_config}\n' for n in nodes)
        )
        with gateway(extra=["--config", str(config)], env={**GW_ENV, **env}) as gw:
            deadline = time.monotonic() + 20
            while {n["id"]: n["state"] for n in cluster(gw)["nodes"]} != {n.id: "healthy" for n in nodes}:
                assert time.monotonic() < deadline, f"nodes not healthy: {cluster(gw)}\n{gw.output()}"
                time.sleep(0.1)
            yield gw


@pytest.fixture(scope="module")
def nodes(tiny_model: Path) -> Iterator[list[RealNode]]:
    # Neither has a Hugging Face cache folder: GET /v1/models answers 200 with an empty body.
    with real_nodes(tiny_model, ("mac1", False, ()), ("mac2", False, ())) as started:
        yield started


@pytest.fixture(scope="module")
def gw(tiny_model: Path, nodes: list[RealNode]) -> Iterator[Proc]:
    """The happy-path gateway: every request it serves must be booked as one success."""
    with gateway_for(tiny_model, nodes) as g:
        yield g


@pytest.fixture
def client(gw: Proc) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=gw.url, api_key="test-key", max_retries=0, timeout=60) as c:
        yield c


# -- what the gateway reports ------------------------------------------------------------------------------------


def cluster(gw: Proc) -> dict[str, Any]:
    view: dict[str, Any] = httpx.get(gw.url + "/cluster", timeout=5).json()
    return view


def access_lines(gw: Proc) -> list[dict[str, Any]]:
    lines = (json.loads(line) for line in gw.output().splitlines() if line.startswith("{"))
    return [line for line in lines if line.get("logger") == "mlxmux.access"]


@dataclass(frozen=True)
class Books:
    """What a gateway has booked so far: access lines and the store's outcome stats, summed over nodes."""

    lines: int
    ok: int
    errors: int
    cancelled: int
    prompt_tokens: int
    cached_tokens: int

    @staticmethod
    def of(gw: Proc) -> Books:
        stats = [n.get("stats", {}) for n in cluster(gw)["nodes"]]
        total = {k: sum(s.get(k, 0) for s in stats) for k in ("ok", "errors", "cancelled", "prompt_tokens")}
        cached = sum(s.get("cached_tokens", 0) for s in stats)
        return Books(len(access_lines(gw)), cached_tokens=cached, **total)


def expect_successes(gw: Proc, before: Books, count: int) -> list[dict[str, Any]]:
    """`count` more requests, every one booked once as a success: its access line says 200 (never
    client_cancel), /cluster counts it ok, nothing was counted cancelled or failed. Returns the new lines."""
    deadline = time.monotonic() + 10
    while True:
        now = Books.of(gw)
        if (now.lines, now.ok) >= (before.lines + count, before.ok + count) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    new = access_lines(gw)[before.lines :]
    assert [line["status"] for line in new] == [200] * count, new
    assert (now.ok, now.errors, now.cancelled) == (before.ok + count, before.errors, before.cancelled), now
    assert now.prompt_tokens - before.prompt_tokens == sum(line["prompt_tokens"] for line in new)
    assert now.cached_tokens - before.cached_tokens == sum(line["cached_tokens"] for line in new)
    return new


def metric_values(gw: Proc) -> list[Any]:
    scrape = httpx.get(gw.url + "/metrics", timeout=5)
    assert scrape.status_code == 200
    return [s for f in text_string_to_metric_families(scrape.text) for s in f.samples]


def metric(samples: list[Any], name: str, **labels: str) -> float:
    return float(sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items()))


def prompt_of(usage: anthropic.types.Usage) -> int:
    return usage.input_tokens + (usage.cache_read_input_tokens or 0) + (usage.cache_creation_input_tokens or 0)


def user(text: str) -> MessageParam:
    return {"role": "user", "content": text}


# -- the happy path -------------------------------------------------------------------------------------------------


def test_streaming_and_not(gw: Proc, client: anthropic.Anthropic) -> None:
    before = Books.of(gw)
    msg = client.messages.create(model=MODEL, max_tokens=8, **GREEDY, messages=[user("Say hi")])
    assert msg.model == MODEL and msg.id.startswith("msg_")
    assert msg.stop_reason == "max_tokens"
    assert msg.usage.output_tokens == 8 and msg.usage.input_tokens > 0
    assert [b.type for b in msg.content] == ["text"]

    with client.messages.stream(model=MODEL, max_tokens=8, **GREEDY, messages=[user("Stream hi")]) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_delta" in kinds
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 8
    assert final.content[0].type == "text"
    lines = expect_successes(gw, before, 2)
    assert [line["prompt_tokens"] for line in lines] == [prompt_of(msg.usage), prompt_of(final.usage)]


def test_http10_close_delimited_streams_succeed_however_fast_the_client_hangs_up(
    gw: Proc, nodes: list[RealNode]
) -> None:
    status, headers, _ = http_request(nodes[0].port, "GET", "/health")
    assert status == 200 and headers[":status-line"].startswith("HTTP/1.0 ")  # close-delimited, always
    body = {"model": MODEL, "max_tokens": 4, "temperature": 0, "stream": True}

    def hang_up_after_message_stop(i: int) -> bool:
        """Read to the last event, then close the connection at once (as Claude Code does)."""
        request = {**body, "messages": [user(f"request {i} of the burst")]}
        with httpx.stream("POST", gw.url + "/v1/messages", json=request, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line == "event: message_stop":
                    return True
        return False

    before = Books.of(gw)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        assert all(pool.map(hang_up_after_message_stop, range(8)))
    expect_successes(gw, before, 8)


def test_tool_round_trip_in_claude_codes_shape(gw: Proc, client: anthropic.Anthropic) -> None:
    """A Claude Code turn with tools, then the next one with its tool_use and tool_result history, through
    the real chat template: the node renders the tools and history (more prompt tokens) and serves both."""
    session = "5b0c4a2e-0000-4000-8000-real00000001"
    before = Books.of(gw)
    finals = []
    for turns in (1, 2):
        body = claude_code_request(session, turns, max_tokens=8, file_lines=5)
        body["tools"] = body["tools"][:3]
        extra = {k: body[k] for k in ("thinking", "context_management", "output_config")}
        kwargs = sdk_kwargs(body, session)
        with client.messages.stream(**kwargs, extra_body={**extra, "temperature": 0}) as stream:
            finals.append(stream.get_final_message())
    plain = client.messages.create(model=MODEL, max_tokens=8, **GREEDY, system=body["system"], messages=[user("x")])
    first, second = finals
    assert first.stop_reason == second.stop_reason == "max_tokens"
    assert prompt_of(first.usage) > prompt_of(plain.usage) + 500  # three tool schemas went into the prompt
    assert prompt_of(second.usage) > prompt_of(first.usage) + 100  # thinking, tool_use, tool_result, answer
    assert (second.usage.cache_read_input_tokens or 0) > prompt_of(first.usage) // 2  # same node, cache kept
    lines = expect_successes(gw, before, 3)
    assert lines[0]["node"] == lines[1]["node"]


def test_session_turns_are_served_from_the_nodes_cache(gw: Proc, client: anthropic.Anthropic) -> None:
    headers = {"x-claude-code-session-id": "0d7e-real-session-2"}
    system = "You are a coding agent.\n" + sample_text(3000, seed=5)
    messages: list[MessageParam] = []
    usages = []
    before = Books.of(gw)
    for turn in range(3):
        messages.append(user(f"Turn {turn + 1}: " + sample_text(200, seed=50 + turn)))
        with client.messages.stream(
            model=MODEL, max_tokens=6, **GREEDY, system=system, messages=messages, extra_headers=headers
        ) as stream:
            final = stream.get_final_message()
        usages.append(final.usage)
        reply = "".join(b.text for b in final.content if b.type == "text") or "ok"
        messages.append({"role": "assistant", "content": reply})
    assert (usages[0].cache_read_input_tokens or 0) < prompt_of(usages[0]) // 10  # cold
    for prev, usage in itertools.pairwise(usages):
        # The node itself says it held the previous turn: at least its whole prompt.
        assert (usage.cache_read_input_tokens or 0) >= prompt_of(prev) - 2, usages
    lines = expect_successes(gw, before, 3)
    assert len({line["node"] for line in lines}) == 1
    assert [line["cached_tokens"] for line in lines] == [u.cache_read_input_tokens or 0 for u in usages]
    assert [line["prompt_tokens"] for line in lines] == [prompt_of(u) for u in usages]
    assert all(line["ttft_ms"] > 0 for line in lines)


def test_an_empty_model_list_leaves_the_node_healthy_and_serving(
    tiny_model: Path, gw: Proc, nodes: list[RealNode], client: anthropic.Anthropic
) -> None:
    for node in nodes:
        # mlx_lm 0.32.2 without ~/.cache/huggingface/hub: 200 headers, then an empty body (a later release may
        # list the model; tests/integration/test_close_delimited.py keeps a node that sends the empty body).
        status, headers, body = http_request(node.port, "GET", "/v1/models")
        assert status == 200 and (body == b"" or str(tiny_model) in body.decode()), (headers, body)
    view = {n["id"]: n for n in cluster(gw)["nodes"]}
    assert {n: v["state"] for n, v in view.items()} == {"mac1": "healthy", "mac2": "healthy"}
    assert not any("last_error" in v for v in view.values())
    before = Books.of(gw)
    for node in nodes:  # each one serves, the other drained
        other = next(n for n in nodes if n is not node)
        httpx.post(f"{gw.url}/admin/nodes/{other.id}/drain", timeout=5).raise_for_status()
        try:
            msg = client.messages.create(model=MODEL, max_tokens=2, **GREEDY, messages=[user(f"on {node.id}")])
            assert msg.stop_reason == "max_tokens"
        finally:
            httpx.post(f"{gw.url}/admin/nodes/{other.id}/undrain", timeout=5).raise_for_status()
    lines = expect_successes(gw, before, 2)
    assert [line["node"] for line in lines] == [n.id for n in nodes]


def test_usage_and_outcomes_reach_every_report(gw: Proc, client: anthropic.Anthropic) -> None:
    """After all of the above: /metrics, /cluster and `mlxmux status --json` agree with the access log,
    and every request the gateway served is one success."""
    headers = {"x-claude-code-session-id": "0d7e-real-session-3"}
    system = "Be brief.\n" + sample_text(1500, seed=9)
    for text in ("first", "second"):
        with client.messages.stream(
            model=MODEL, max_tokens=4, **GREEDY, system=system, messages=[user(text)], extra_headers=headers
        ) as stream:
            stream.get_final_message()
    deadline = time.monotonic() + 10
    while (books := Books.of(gw)).lines != books.ok and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = access_lines(gw)
    assert lines and all(line["status"] == 200 for line in lines)
    assert (books.ok, books.errors, books.cancelled) == (len(lines), 0, 0)
    assert books.cached_tokens == sum(line["cached_tokens"] for line in lines) > 0
    assert books.prompt_tokens == sum(line["prompt_tokens"] for line in lines)

    samples = metric_values(gw)
    assert metric(samples, "mlxmux_requests_total", status="200") == len(lines)
    assert metric(samples, "mlxmux_requests_total", status="client_cancel") == 0
    assert metric(samples, "mlxmux_prompt_tokens_total") == books.prompt_tokens
    assert metric(samples, "mlxmux_cached_tokens_total") == books.cached_tokens
    assert metric(samples, "mlxmux_time_to_first_token_seconds_count") == len(lines)
    for node in ("mac1", "mac2"):
        assert metric(samples, "mlxmux_node_state", node=node, state="healthy") == 1

    done = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "status", "--url", gw.url, "--json"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    stats = {n["id"]: n["stats"] for n in status["nodes"]}
    assert sum(s["ok"] for s in stats.values()) == len(lines)
    assert sum(s["cancelled"] + s["errors"] for s in stats.values()) == 0
    assert sum(s["cached_tokens"] for s in stats.values()) == books.cached_tokens
    assert all(n["state"] == "healthy" for n in status["nodes"])


# -- nodes that die -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def victims(tiny_model: Path) -> Iterator[list[RealNode]]:
    # v1 has a Hugging Face cache folder (its /v1/models lists the model the gateway is configured with) and
    # prefills one token per step: a prompt of a few thousand tokens keeps it busy for seconds (the tiny model
    # prefills ~100k tokens/s otherwise).
    with real_nodes(tiny_model, ("v1", True, ("--prefill-step-size", "1")), ("v2", False, ())) as started:
        yield started


@pytest.fixture(scope="module")
def victim_gw(tiny_model: Path, victims: list[RealNode]) -> Iterator[Proc]:
    with gateway_for(tiny_model, victims, MLXMUX_REQUEST_FAIL_THRESHOLD="1000") as g:
        yield g


def busy_node(gw: Proc, timeout: float = 30.0) -> str:
    """The node the gateway's only request in flight is on."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = [str(n["id"]) for n in cluster(gw)["nodes"] if n.get("inflight")]
        if busy:
            return busy[0]
        time.sleep(0.02)
    raise AssertionError("no request in flight")


def test_a_node_killed_mid_prefill_fails_over(tiny_model: Path, victims: list[RealNode], victim_gw: Proc) -> None:
    slow, other = victims
    assert slow.proc.poll() is None and other.proc.poll() is None, "this test needs both victims"
    status, _, body = http_request(slow.port, "GET", "/v1/models")
    assert status == 200 and str(tiny_model) in body.decode()  # the model list with a hub folder
    prompt = sample_text(20_000, seed=21)  # ~6k tokens: seconds of prefill, one token per step
    events: list[tuple[float, str]] = []
    outcome: dict[str, Any] = {}

    def run() -> None:
        with anthropic.Anthropic(base_url=victim_gw.url, api_key="k", max_retries=0, timeout=120) as c:
            try:
                with c.messages.stream(model=MODEL, max_tokens=4, **GREEDY, messages=[user(prompt)]) as s:
                    for event in s:
                        events.append((time.monotonic(), event.type))
                    outcome["message"] = s.get_final_message()
            except anthropic.APIError as exc:
                outcome["error"] = exc

    # The request goes to the slow node (the other one drained), which is killed while it prefills.
    httpx.post(f"{victim_gw.url}/admin/nodes/{other.id}/drain", timeout=5).raise_for_status()
    client = threading.Thread(target=run)
    client.start()
    try:
        assert busy_node(victim_gw) == slow.id
    finally:
        httpx.post(f"{victim_gw.url}/admin/nodes/{other.id}/undrain", timeout=5).raise_for_status()
    time.sleep(0.5)  # prefill under way (the node sends `: keepalive` comments, no tokens yet)
    killed_at = time.monotonic()
    slow.kill()
    client.join(90)
    assert not client.is_alive(), "the client hung"
    assert all(kind in ("message_start", "ping") for at, kind in events if at < killed_at), events
    # Nothing but message_start had reached the client: the other node served it, in the same stream.
    assert "message" in outcome, outcome
    assert outcome["message"].stop_reason == "max_tokens"
    assert [kind for _, kind in events].count("message_start") == 1
    deadline = time.monotonic() + 10
    while not access_lines(victim_gw) and time.monotonic() < deadline:
        time.sleep(0.05)
    (line,) = access_lines(victim_gw)
    assert (line["status"], line["attempts"], line["node"]) == (200, 2, other.id)
    assert line["prompt_tokens"] == prompt_of(outcome["message"].usage) > 5000
    view = {n["id"]: n for n in cluster(victim_gw)["nodes"]}
    assert view[other.id]["stats"]["ok"] == 1 and view[other.id]["stats"]["errors"] == 0
    assert view[slow.id]["stats"]["cancelled"] == 0 and view[slow.id]["stats"]["errors"] == 1


def test_a_node_killed_mid_stream_ends_with_an_error_event(victims: list[RealNode], victim_gw: Proc) -> None:
    if not any(n.proc.poll() is None for n in victims):
        pytest.fail("no victim left alive")
    before = len(access_lines(victim_gw))
    got: list[str] = []
    with (
        anthropic.Anthropic(base_url=victim_gw.url, api_key="k", max_retries=0, timeout=60) as c,
        pytest.raises(anthropic.APIStatusError) as failed,
        c.messages.stream(model=MODEL, max_tokens=20_000, **GREEDY, messages=[user("Talk for long.")]) as s,
    ):
        for event in s:
            got.append(event.type)
            if event.type == "content_block_delta" and got.count("content_block_delta") == 3:
                next(n for n in victims if n.id == busy_node(victim_gw)).kill()
    assert "message_stop" not in got and "message_delta" not in got  # no made-up end_turn
    body = failed.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] in ("overloaded_error", "api_error")
    deadline = time.monotonic() + 10
    while len(access_lines(victim_gw)) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    (line,) = access_lines(victim_gw)[before:]
    assert line["status"] == "stream_error"
