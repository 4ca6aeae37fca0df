"""Resends join the answer in flight, prefill progress, and context windows: over real processes (gateway
replicas, a real redis-server, sim nodes whose prefill is slow like a Mac's), with the anthropic SDK."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import pytest

from proxy.ops import render_status
from tests.claude_code_request import claude_code_request, sdk_kwargs
from tests.procs import Proc, gateway, sim_node

pytestmark = pytest.mark.slow

# The ~20k-token Claude Code prompt prefills in about 4 s at 5000 tokens/s, then 24 tokens stream.
SLOW = ("--prefill-tps", "5000", "--prefill-step-size", "1024", "--reply-tokens", "24", "--token-delay-ms", "20")


@contextlib.contextmanager
def slow_cluster(
    request: pytest.FixtureRequest, shared: bool, name: str, *sim_args: str
) -> Iterator[tuple[Proc, list[Proc], str, dict[str, Any]]]:
    """A slow sim node behind one replica (memory) or two sharing Redis, a session id and its first turn."""
    redis_url = request.getfixturevalue("redis_url") if shared else None
    session = f"{name}-{shared}-0000-4000-8000-000000000000"
    body = claude_code_request(session, 1, max_tokens=64)
    with sim_node(*sim_args) as node, replicas(node, redis_url, 2 if shared else 1, f"{name}{shared}:") as gws:
        yield node, gws, session, body


@contextlib.contextmanager
def replicas(node: Proc, redis_url: str | None, count: int, prefix: str) -> Iterator[list[Proc]]:
    extra = ["--redis", redis_url] if redis_url else []
    env = {"MLXMUX_KEY_PREFIX": prefix, "MLXMUX_HEALTH_INTERVAL_S": "1"}
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(gateway(f"mac1={node.url}", extra=extra, env=env)) for _ in range(count)]


def stats(node: Proc) -> dict[str, Any]:
    return dict(httpx.get(node.url + "/_sim/stats", timeout=5).json())


async def raw_events(url: str, body: dict[str, Any], session: str) -> list[tuple[str, str]]:
    """Every event of a streamed answer but pings, as (event, data), read over a real socket."""
    events: list[tuple[str, str]] = []
    headers = {"x-claude-code-session-id": session, "anthropic-version": "2023-06-01"}
    async with (
        httpx.AsyncClient(timeout=60) as client,
        client.stream("POST", url + "/v1/messages", json=body, headers=headers) as r,
    ):
        assert r.status_code == 200
        name = ""
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: ") and name != "ping":
                events.append((name, line[len("data: ") :]))
    return events


async def leave_after(url: str, body: dict[str, Any], session: str, seconds: float) -> None:
    """A client that gives up after `seconds` (as Claude Code does past its timeout) and hangs up."""
    async with anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0) as client:
        with contextlib.suppress(TimeoutError):
            async with (
                asyncio.timeout(seconds),
                client.messages.stream(**sdk_kwargs(body, session)) as stream,
            ):
                async for _ in stream:
                    pass
    raise AssertionError("the answer came before the client gave up")  # pragma: no cover


async def complete(url: str, body: dict[str, Any], session: str) -> anthropic.types.Message:
    async with (
        anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0) as client,
        client.messages.stream(**sdk_kwargs(body, session)) as stream,
    ):
        return await stream.get_final_message()


@pytest.mark.parametrize("shared", [False, True], ids=["one-replica", "two-replicas-redis"])
def test_a_resend_after_the_client_gave_up_joins_the_answer(shared: bool, request: pytest.FixtureRequest) -> None:
    with slow_cluster(request, shared, "resend", *SLOW) as (node, gws, session, body):

        async def scenario() -> anthropic.types.Message:
            with contextlib.suppress(AssertionError):  # the first client gives up mid-prefill...
                await leave_after(gws[0].url, body, session, 1.0)
            await asyncio.sleep(0.5)  # ...and resends half a second later, as Claude Code does
            return await complete(gws[-1].url, body, session)

        message = asyncio.run(scenario())
        assert message.stop_reason == "end_turn" and message.content[0].type == "text"
        assert message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0) > 15_000
        s = stats(node)
        assert (s["requests"], s["completed"], s["disconnects"]) == (1, 1, 0)  # one generation, never cut
        assert message.usage.output_tokens == s["recent"][0]["completion_tokens"]  # the node's one answer, whole
        # the node's success was booked once, though the client that asked first had gone
        view = httpx.get(gws[0].url + "/cluster", timeout=5).json()
        assert view["nodes"][0]["stats"]["ok"] == 1
        joined = "shared" if shared else "local"
        scrape = httpx.get(gws[-1].url + "/metrics", timeout=5).text
        assert f'mlxmux_resends_joined_total{{where="{joined}"}} 1.0' in scrape


@pytest.mark.parametrize("shared", [False, True], ids=["one-replica", "two-replicas-redis"])
def test_copies_in_flight_get_identical_complete_streams(shared: bool, request: pytest.FixtureRequest) -> None:
    with slow_cluster(request, shared, "twins", *SLOW) as (node, gws, session, body):

        async def scenario() -> list[list[tuple[str, str]]]:
            first = asyncio.create_task(raw_events(gws[0].url, body, session))
            await asyncio.sleep(1.0)
            second = asyncio.create_task(raw_events(gws[-1].url, body, session))
            await asyncio.sleep(0.5)
            third = asyncio.create_task(raw_events(gws[0].url, body, session))
            return list(await asyncio.gather(first, second, third))

        first, second, third = asyncio.run(scenario())
        assert first[0][0] == "message_start" and first[-1][0] == "message_stop"
        assert second == first and third == first  # the same events, from the first one on
        assert stats(node)["requests"] == 1


@pytest.mark.parametrize("shared", [False, True], ids=["one-replica", "two-replicas-redis"])
def test_a_client_that_leaves_alone_cancels_the_nodes_request(shared: bool, request: pytest.FixtureRequest) -> None:
    # prefill alone takes about 20 s here: the node's request must end long before
    with slow_cluster(request, shared, "alone", "--prefill-tps", "1000", "--prefill-step-size", "1024") as (
        node,
        gws,
        session,
        body,
    ):
        with contextlib.suppress(AssertionError):
            asyncio.run(leave_after(gws[0].url, body, session, 1.0))
        left = time.monotonic()
        while stats(node)["active"] and time.monotonic() - left < 15:
            time.sleep(0.1)
        waited = time.monotonic() - left
        s = stats(node)
        assert (s["active"], s["disconnects"], s["completed"]) == (0, 1, 0)
        print(f"\nnode request cancelled {waited:.2f} s after the client left (resend grace 1.5 s)")


def test_progress_of_a_slow_prefill_is_shown_on_every_replica(redis_url: str) -> None:
    session = "progress-0000-4000-8000-000000000000"
    body = claude_code_request(session, 1, max_tokens=200)
    with sim_node(*SLOW, "--reply-tokens", "150") as node, replicas(node, redis_url, 2, "pg:") as gws:
        seen: list[dict[str, Any]] = []
        shown = ""

        async def scenario() -> None:
            nonlocal shown
            task = asyncio.create_task(complete(gws[0].url, body, session))
            async with httpx.AsyncClient(timeout=5) as client:
                while not task.done():
                    view = (await client.get(gws[1].url + "/cluster")).json()  # the other replica
                    requests = view["nodes"][0].get("requests", [])
                    seen.extend(requests)
                    if requests and requests[0]["phase"] == "prefill" and not shown:
                        shown = render_status(view, gws[1].url)
                    await asyncio.sleep(0.25)
            await task

        asyncio.run(scenario())
        prefill = [r for r in seen if r["phase"] == "prefill"]
        assert len({r["done"] for r in prefill}) >= 2, seen  # N/M moved
        assert all(0 < r["done"] <= r["total"] for r in prefill)
        assert [r["done"] for r in prefill] == sorted(r["done"] for r in prefill)
        assert prefill[0]["total"] > 15_000 and prefill[0]["session"] and prefill[0]["age_ms"] >= 1000
        assert any(r["phase"] == "generating" for r in seen)
        assert "in flight" in shown and "prefill" in shown and "tokens" in shown
        view = httpx.get(gws[1].url + "/cluster", timeout=5).json()
        assert view["nodes"][0]["requests"] == []  # gone with the answer


def _config_file(tmp_path: Any, text: str) -> str:
    path = tmp_path / "mlxmux.toml"
    path.write_text(text)
    return str(path)


def test_an_over_window_prompt_gets_anthropics_400_and_never_reaches_a_node(tmp_path: Any) -> None:
    with sim_node("--prefill-tps", "0", "--reply-tokens", "4") as node:
        config = _config_file(
            tmp_path, f'[pools.default]\ncontext_window = 8192\n[[nodes]]\nid = "mac1"\nurl = "{node.url}"\n'
        )
        with gateway(extra=["--config", config]) as gw:
            client = anthropic.Anthropic(base_url=gw.url, api_key="x", max_retries=0)
            body = claude_code_request("window-0000-4000-8000-000000000000", 1, max_tokens=64)
            with pytest.raises(anthropic.BadRequestError) as caught:
                client.messages.create(**sdk_kwargs(body, "w"))
            assert caught.value.status_code == 400
            error = caught.value.body["error"]  # type: ignore[index]
            assert error["type"] == "invalid_request_error"
            words = error["message"].split()
            assert words[:3] == ["prompt", "is", "too"] and words[-2:] == ["8192", "maximum"], error
            assert int(words[4]) > 8192 and words[5:7] == ["tokens", ">"]
            small = client.messages.create(
                model="claude-opus-4-8", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
            )
            assert small.stop_reason in ("end_turn", "max_tokens")
            assert stats(node)["requests"] == 1  # only the short one reached it
            assert httpx.get(gw.url + "/cluster", timeout=5).json()["nodes"][0]["context_window"] == 8192


def test_a_mixed_window_pool_sends_long_prompts_only_to_nodes_that_hold_them(tmp_path: Any) -> None:
    with sim_node("--prefill-tps", "0", "--reply-tokens", "4") as small, sim_node("--prefill-tps", "0") as big:
        config = _config_file(
            tmp_path,
            f'[[nodes]]\nid = "small"\nurl = "{small.url}"\ncontext_window = 8192\n'
            f'[[nodes]]\nid = "big"\nurl = "{big.url}"\ncontext_window = 131072\n',
        )
        with gateway(extra=["--config", config, "--strategy", "round-robin"]) as gw:
            client = anthropic.Anthropic(base_url=gw.url, api_key="x", max_retries=0)
            for i in range(4):  # long prompts and short ones, taking turns
                body = claude_code_request(f"mixed-{i}-0000-4000-8000-000000000000", 1, max_tokens=8)
                client.messages.create(**sdk_kwargs(body, f"mixed-{i}"))
                client.messages.create(
                    model="claude-opus-4-8", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
                )
            long_on = {
                name: sum(r["prompt_tokens"] > 8192 for r in stats(n)["recent"])
                for name, n in (("small", small), ("big", big))
            }
            assert long_on == {"small": 0, "big": 4}
            assert stats(small)["requests"] + stats(big)["requests"] == 8
            httpx.post(gw.url + "/admin/nodes/big/drain", timeout=5).raise_for_status()
            body = claude_code_request("mixed-x-0000-4000-8000-000000000000", 1, max_tokens=8)
            with pytest.raises(anthropic.APIStatusError) as caught:
                client.messages.create(**sdk_kwargs(body, "mixed-x"))
            assert caught.value.status_code == 503  # the one node that holds it is out: retry later
            assert "holds" in caught.value.message


def test_a_copy_whose_owner_replica_died_asks_the_node_itself(request: pytest.FixtureRequest) -> None:
    with slow_cluster(request, True, "orphan", *SLOW) as (node, gws, session, body):

        async def scenario() -> anthropic.types.Message:
            first = asyncio.create_task(raw_events(gws[0].url, body, session))
            await asyncio.sleep(1.0)
            copy = asyncio.create_task(complete(gws[1].url, body, session))
            await asyncio.sleep(1.0)
            gws[0].kill()  # the replica that owns the answer dies mid-prefill
            with contextlib.suppress(httpx.HTTPError, AssertionError):
                await first
            return await copy

        message = asyncio.run(scenario())
        s = stats(node)
        assert (s["requests"], s["completed"]) == (2, 1)  # the owner's copy was cut with its replica
        assert message.stop_reason == "end_turn"
        assert message.usage.output_tokens == s["recent"][-1]["completion_tokens"]  # the whole answer, from the node
