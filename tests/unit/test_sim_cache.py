"""The sim node's prompt cache (mlx_lm.server's LRU rules) and the token math it relies on."""

from __future__ import annotations

import time
from typing import Any

import pytest

from proxy.sim.cache import PromptCache, common_prefix_tokens, is_token_prefix, token_count
from proxy.sim.model import Conversation, Message, ToolCall, chat_conversation, render_prompt, text_cells
from proxy.sim.script import Reply, plan_tokens, write_reply


def cells(*words: str) -> bytes:
    """One 4-byte token per word (each word padded to 4 bytes)."""
    return b"".join(text_cells(w[:4]) for w in words)


def toks(n: int, tag: str = "a") -> bytes:
    return b"".join(f"{tag}{i:03d}"[-4:].encode() for i in range(n))


# --- token math ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        (b"abcdefgh", b"abcdefgh", 2),
        (b"abcdefgh", b"abcdefgX", 1),  # the differing byte spoils its whole token
        (b"abcdefgh", b"Xbcdefgh", 0),
        (b"abcd", b"abcdefgh", 1),
        (b"abcdef", b"abcdef", 2),  # identical sequences match their partial last token too
        (b"abcdef", b"abcdefgh", 1),  # a partial token is not a prefix of a full one
        (b"", b"abcd", 0),
    ],
)
def test_common_prefix_tokens(a: bytes, b: bytes, expected: int) -> None:
    assert common_prefix_tokens(a, b) == expected
    assert common_prefix_tokens(b, a) == expected


@pytest.mark.parametrize("split", [0, 1, 2, 3, 4, 5, 4095, 4096, 4097, 79_999])
def test_common_prefix_tokens_finds_every_split_point(split: int) -> None:
    a = bytes(range(256)) * 320  # 81,920 bytes: a 20k-token prompt
    b = a[:split] + bytes([a[split] ^ 1]) + a[split + 1 :]
    assert common_prefix_tokens(a, b) == split // 4


def test_token_count_and_prefix() -> None:
    assert token_count(b"") == 0
    assert token_count(b"abcde") == 2
    assert is_token_prefix(b"abcd", b"abcdefgh")
    assert not is_token_prefix(b"abc", b"abcdefgh")
    assert is_token_prefix(b"abc", b"abc")
    assert not is_token_prefix(b"abcdX", b"abcdefgh")


# --- LRU rules ----------------------------------------------------------------------------------------------


def test_capacity_evicts_least_recently_used() -> None:
    cache = PromptCache(capacity=2)
    a, b, c = toks(10, "a"), toks(10, "b"), toks(10, "c")
    cache.insert(a)
    cache.insert(b)
    cache.insert(a)  # re-inserting refreshes a (count 2) ...
    cache.insert(c)  # ... so b is the one evicted
    assert len(cache) == 2
    assert cache.fetch(b + toks(3, "x")) == 0
    assert cache.fetch(c + toks(3, "x")) == 10


def test_longest_whole_prefix_wins_and_is_taken_out() -> None:
    cache = PromptCache()
    short, long = toks(8), toks(16)
    cache.insert(short)
    cache.insert(long)
    assert cache.fetch(toks(20)) == 16
    assert [e.tokens for e in cache.entries()] == [8]


def test_extending_a_conversation_replaces_its_entry() -> None:
    cache = PromptCache(capacity=10)
    turn1 = toks(100)
    cache.insert(turn1 + toks(5, "g"))  # prompt + generated
    turn2 = turn1 + toks(5, "g") + toks(50, "u")
    assert cache.fetch(turn2) == 105
    assert len(cache) == 0  # taken out while the request runs
    cache.insert(turn2 + toks(5, "h"))
    assert [e.tokens for e in cache.entries()] == [160]


def test_divergent_prompt_reuses_the_common_prefix_and_leaves_the_entry() -> None:
    cache = PromptCache(capacity=2)
    shared = toks(60, "s")
    cache.insert(shared + toks(10, "x"))
    cache.insert(toks(5, "q"))
    assert cache.fetch(shared + toks(10, "y")) == 60
    assert len(cache) == 2
    cache.insert(toks(5, "r"))  # the divergent lookup did not refresh the entry: it is evicted first
    assert cache.fetch(shared + toks(10, "y")) == 0


def test_prompt_inside_an_entry_keeps_one_token_to_compute() -> None:
    cache = PromptCache()
    cache.insert(toks(30))
    assert cache.fetch(toks(20)) == 19
    assert len(cache) == 1


def test_exact_match_takes_everything() -> None:
    cache = PromptCache()
    cache.insert(toks(12))
    assert cache.fetch(toks(12)) == 12
    assert len(cache) == 0


def test_shorter_whole_prefix_beats_a_longer_common_prefix() -> None:
    cache = PromptCache()
    prompt = toks(40)
    cache.insert(prompt[: 4 * 10])
    cache.insert(prompt[: 4 * 30] + toks(5, "z"))
    assert cache.fetch(prompt) == 10


def test_one_token_entry_is_not_a_prefix_hit() -> None:
    cache = PromptCache()
    cache.insert(toks(1))
    cache.insert(toks(3) + toks(3, "z"))
    assert cache.fetch(toks(6)) == 3  # falls through to the common-prefix rule
    assert len(cache) == 2


def test_duplicate_entries_are_counted() -> None:
    cache = PromptCache()
    cache.insert(toks(8))
    cache.insert(toks(8))
    assert [(e.tokens, e.count) for e in cache.entries()] == [(8, 2)]
    assert cache.fetch(toks(10)) == 8
    assert [(e.tokens, e.count) for e in cache.entries()] == [(8, 1)]


def test_zero_capacity_caches_nothing() -> None:
    cache = PromptCache(capacity=0)
    cache.insert(toks(8))
    assert cache.fetch(toks(10)) == 0


def test_fast_on_20k_token_prompts() -> None:
    cache = PromptCache(capacity=10)
    base = toks(20_000)
    for i in range(10):
        cache.insert(base[: 4 * (19_000 + i)] + toks(100, chr(ord("a") + i)))
    start = time.perf_counter()
    for _ in range(20):
        assert cache.fetch(base + toks(10, "n")) == 19_009
    assert time.perf_counter() - start < 0.5


# --- what the cache sees: rendering across turns -------------------------------------------------------------


def _chat(messages: list[Any], tools: list[Any] | None = None) -> Conversation:
    return chat_conversation({"messages": messages, "tools": tools or []})


TOOLS: list[Any] = [{"type": "function", "function": {"name": "Read", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("user", ["hello", "héllo wörld ✓", '/tool Read {"file_path": "/a"}'])
def test_next_turn_starts_with_prompt_plus_generated_tokens(user: str) -> None:
    first = [{"role": "system", "content": "be brief"}, {"role": "user", "content": user}]
    conv = _chat(first, TOOLS)
    prompt = render_prompt(conv)
    reply = write_reply(conv, node_id="n", reply_tokens=20, reasoning=False, prompt_tokens=1, cached_tokens=0)
    plan = plan_tokens(reply, max_tokens=512)
    assistant: dict[str, object] = {"role": "assistant", "content": reply.content}
    if reply.tool_calls:
        # A client sends the arguments back in its own key order and spacing: rendering is canonical.
        assistant["tool_calls"] = [
            {"id": "1", "type": "function", "function": {"name": c.name, "arguments": '{"file_path": "/a"}'}}
            for c in reply.tool_calls
        ]
    second = [*first, assistant, {"role": "user", "content": "again"}]
    nxt = render_prompt(_chat(second, TOOLS))
    assert nxt.startswith(prompt + plan.cells)
    cache = PromptCache()
    cache.insert(prompt + plan.cells)
    assert cache.fetch(nxt) == token_count(prompt + plan.cells)


def test_tools_render_first_and_canonically() -> None:
    a = _chat([{"role": "system", "content": "A"}], [{"type": "function", "function": {"name": "x", "d": 1}}])
    b = _chat([{"role": "system", "content": "B"}], [{"function": {"d": 1, "name": "x"}, "type": "function"}])
    shared = common_prefix_tokens(render_prompt(a), render_prompt(b))
    assert shared > 8  # the tools block is shared even though the system prompts differ


def test_reasoning_is_not_rendered_back() -> None:
    conv = Conversation((), (), (Message("user", "hi"),))
    reply = Reply("thinking hard", "answer", ())
    prompt = render_prompt(conv)
    plan = plan_tokens(reply, max_tokens=512)
    nxt = render_prompt(Conversation((), (), (Message("user", "hi"), Message("assistant", "answer"))))
    assert common_prefix_tokens(prompt + plan.cells, nxt) == token_count(prompt)


def test_max_tokens_and_stop_cut_the_reply() -> None:
    reply = Reply("", "one two three four five", (ToolCall("Read", "{}"),))
    cut = plan_tokens(reply, max_tokens=3)
    assert (cut.finish_reason, cut.completion_tokens) == ("length", 3)
    assert "".join(p.text for p in cut.pieces) == "one two thre"
    assert not any(p.tool_call for p in cut.pieces)
    stopped = plan_tokens(reply, max_tokens=100, stop=["three"])
    assert stopped.finish_reason == "stop"
    assert "".join(p.text for p in stopped.pieces) == "one two "
    whole = plan_tokens(reply, max_tokens=100)
    assert whole.finish_reason == "tool_calls"
    assert [p.tool_call for p in whole.pieces if p.tool_call] == [ToolCall("Read", "{}")]
    assert len(whole.cells) == 4 * whole.completion_tokens
