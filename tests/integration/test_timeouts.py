"""Silence limits over real processes: a node that hangs before its first byte is failed over; a node
that stalls mid-stream ends the client's stream with an error event; nothing waits forever."""

from __future__ import annotations

import contextlib
import json
import time

import anthropic
import httpx
import pytest

from tests.procs import gateway, sim_node

pytestmark = pytest.mark.slow

BODY = {"model": "claude-opus-4-8", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}


def test_hanging_node_is_failed_over_after_the_first_byte_timeout() -> None:
    env = {"MLXMUX_FIRST_BYTE_TIMEOUT_S": "1", "MLXMUX_PING_INTERVAL_S": "0.3"}
    with (
        sim_node("--id", "hung", "--hang", name="hung") as hung,
        sim_node("--id", "ok", name="ok") as ok,
        gateway(f"hung={hung.url}", f"ok={ok.url}", extra=["--strategy", "round-robin"], env=env) as g,
        contextlib.ExitStack() as stack,
    ):
        client = stack.enter_context(anthropic.Anthropic(base_url=g.url, api_key="k", max_retries=0, timeout=30))
        for stream in (False, True):
            started = time.monotonic()
            for _ in range(2):  # round-robin: one of the two tries the hung node first
                if stream:
                    with client.messages.stream(**BODY) as s:  # type: ignore[arg-type]
                        text = s.get_final_message().content[0].text  # type: ignore[union-attr]
                else:
                    text = client.messages.create(**BODY).content[0].text  # type: ignore[arg-type, union-attr]
                assert "sim node ok" in text
            assert time.monotonic() - started < 10
        assert httpx.get(hung.url + "/_sim/stats", timeout=5).json()["active"] == 0  # the gateway hung up


def test_node_stalling_mid_stream_ends_with_an_error_event() -> None:
    env = {"MLXMUX_BETWEEN_CHUNKS_TIMEOUT_S": "1", "MLXMUX_PING_INTERVAL_S": "0.3"}
    with (
        sim_node("--id", "slow", "--token-delay-ms", "2500", "--prefill-tps", "0", name="slow") as slow,
        gateway(f"slow={slow.url}", env=env) as g,
    ):
        started = time.monotonic()
        events: list[tuple[str, dict]] = []
        with httpx.stream("POST", g.url + "/v1/messages", json={**BODY, "stream": True}, timeout=30) as r:
            assert r.status_code == 200
            name = None
            for line in r.iter_lines():
                if line.startswith("event:"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and name:
                    events.append((name, json.loads(line[5:])))
        elapsed = time.monotonic() - started
        names = [n for n, _ in events]
        assert names[0] == "message_start"
        assert "ping" in names  # the client heard from us while the node was silent
        assert "content_block_delta" in names  # the first token came through
        assert names[-1] == "error" and "message_stop" not in names
        assert events[-1][1]["error"]["type"] == "overloaded_error"
        assert elapsed < 8  # token 1 at 2.5 s, then 1 s of silence
