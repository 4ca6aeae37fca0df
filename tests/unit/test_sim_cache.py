"""The sim node's prompt cache (mlx_lm.server's LRU rules) and the token math it relies on."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest

from proxy.sim.cache import CacheEntry, EntryKind, PromptCache, common_prefix_tokens, is_token_prefix, token_count
from proxy.sim.engine import prefill_points
from proxy.sim.model import (
    Conversation,
    Message,
    ToolCall,
    canonical_json,
    chat_conversation,
    prompt_segments,
    render_prompt,
    text_cells,
)
from proxy.sim.script import Reply, plan_tokens, write_reply


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


# --- LRU rules (mlx_lm.server's LRUPromptCache) --------------------------------------------------------------
#
# A letter is one token ("abc" is three). Each case is a list of steps:
#   ("insert", seq, kind)            store seq (prompt + generated, or a prefill checkpoint)
#   ("fetch", seq, expected_cached)  look seq up: how many tokens it reuses
#   ("entries", [seq, ...])          what is stored, least recently inserted first


def seq(letters: str) -> bytes:
    return b"".join(text_cells(ch) for ch in letters)


Step = tuple[Any, ...]

CACHE_CASES: dict[str, tuple[int, list[Step]]] = {
    "empty cache": (10, [("fetch", "abc", 0)]),
    "exact match reuses all but the last token and keeps the entry": (
        10,
        [("insert", "abcd", "assistant"), ("fetch", "abcd", 3), ("fetch", "abcd", 3), ("entries", ["abcd"])],
    ),
    "identical repeat: the entry is prompt + reply, trimmed to the prompt minus one": (
        10,
        [("insert", "abcdXY", "assistant"), ("fetch", "abcd", 3), ("entries", ["abcdXY"])],
    ),
    "next turn reuses prompt + reply": (10, [("insert", "abcXY", "assistant"), ("fetch", "abcXYuv", 5)]),
    "a longer entry is trimmed to the common prefix": (
        10,
        [("insert", "abcdef", "assistant"), ("fetch", "abcxyz", 3), ("entries", ["abcdef"])],
    ),
    "a stored prefix is reused whole": (10, [("insert", "ab", "user"), ("fetch", "abcd", 2)]),
    "a one-token entry is no stored prefix, but still a common prefix": (
        10,
        [("insert", "a", "assistant"), ("fetch", "abcd", 1)],
    ),
    "a deeper common prefix beats a shorter stored prefix": (
        10,
        [("insert", "abcdXY", "assistant"), ("insert", "ab", "system"), ("fetch", "abcdef", 4)],
    ),
    "a stored prefix as deep as any common prefix is used": (
        10,
        [
            ("insert", "abcd", "user"),
            ("insert", "abcdXY", "assistant"),
            ("insert", "abcd", "user"),
            ("fetch", "abcdQ", 4),
        ],
    ),
    "unrelated prompts share nothing": (10, [("insert", "abc", "assistant"), ("fetch", "xyz", 0)]),
    "insert deletes the stored prefixes of the new entry": (
        10,
        [
            ("insert", "ab", "system"),
            ("insert", "abcd", "user"),
            ("insert", "abx", "assistant"),
            ("insert", "abcdef", "assistant"),
            ("entries", ["abx", "abcdef"]),
        ],
    ),
    "insert keeps entries that only share a prefix": (
        10,
        [("insert", "abcX", "assistant"), ("insert", "abcY", "assistant"), ("entries", ["abcX", "abcY"])],
    ),
    "re-inserting refreshes an entry": (
        2,
        [
            ("insert", "aa", "assistant"),
            ("insert", "bb", "assistant"),
            ("insert", "aa", "assistant"),
            ("insert", "cc", "assistant"),
            ("entries", ["aa", "cc"]),
        ],
    ),
    "a lookup does not refresh": (
        2,
        [
            ("insert", "aa", "assistant"),
            ("insert", "bb", "assistant"),
            ("fetch", "aaX", 2),
            ("insert", "cc", "assistant"),
            ("entries", ["bb", "cc"]),
        ],
    ),
    "assistant entries are evicted before checkpoints": (
        2,
        [
            ("insert", "ss", "system"),
            ("insert", "aa", "assistant"),
            ("insert", "bb", "assistant"),
            ("entries", ["ss", "bb"]),
        ],
    ),
    "checkpoints go first when they outnumber assistant entries": (
        3,
        [
            ("insert", "u1", "user"),
            ("insert", "u2", "user"),
            ("insert", "aa", "assistant"),
            ("insert", "ss", "system"),
            ("entries", ["u2", "aa", "ss"]),
        ],
    ),
    "system checkpoints go last": (
        2,
        [("insert", "s1", "system"), ("insert", "s2", "system"), ("insert", "u1", "user"), ("entries", ["s2", "u1"])],
    ),
    "capacity counts entries, not conversations": (
        3,
        [
            ("insert", "cA", "assistant"),
            ("insert", "cB", "assistant"),
            ("insert", "cAX", "assistant"),
            ("insert", "cBY", "assistant"),
            ("insert", "cD", "assistant"),
            ("entries", ["cAX", "cBY", "cD"]),
        ],
    ),
    "zero capacity stores nothing": (0, [("insert", "abc", "assistant"), ("entries", []), ("fetch", "abcd", 0)]),
}


@pytest.mark.parametrize("case", list(CACHE_CASES), ids=list(CACHE_CASES))
def test_cache_rules(case: str) -> None:
    capacity, steps = CACHE_CASES[case]
    cache = PromptCache(capacity)
    for step in steps:
        if step[0] == "insert":
            cache.insert(seq(step[1]), step[2])
        elif step[0] == "fetch":
            assert cache.fetch(seq(step[1])) == step[2], step
        else:
            assert [e.tokens for e in cache.entries()] == [len(x) for x in step[1]], step
            assert cache.sequences() == [seq(x) for x in step[1]], step


def test_entries_show_kinds() -> None:
    cache = PromptCache()
    cache.insert(seq("ab"), "system")
    cache.insert(seq("xyz"))
    assert cache.entries() == [CacheEntry(2, "system"), CacheEntry(3, "assistant")]


class _FakeKV:
    """What LRUPromptCache needs of a layer cache: a size and trimming."""

    nbytes = 0

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        return n


def test_same_answers_as_mlx_lru_prompt_cache() -> None:
    """Random inserts and lookups on this cache and on mlx_lm's own LRUPromptCache give the same answers."""
    lru = pytest.importorskip("mlx_lm.models.cache")
    rng = random.Random(10)
    for capacity in (1, 3, 6):
        real = lru.LRUPromptCache(max_size=capacity)
        sim = PromptCache(capacity)
        for _ in range(1500):
            tokens = [rng.choice("abc") for _ in range(rng.randint(1, 7))]
            cells = seq("".join(tokens))
            ids = [ord(t) for t in tokens]
            if rng.random() < 0.5:
                kind: EntryKind = rng.choice(["assistant", "assistant", "user", "system"])
                real.insert_cache("m", ids, [_FakeKV()], cache_type=kind)
                sim.insert(cells, kind)
                counts = {k: sum(e.kind == k for e in sim.entries()) for k in ("assistant", "user", "system")}
                assert {k: v["n_sequences"] for k, v in real.stats_by_type().items()} == counts
            else:
                _, rest = real.fetch_nearest_cache("m", ids)
                reused = len(ids) - len(rest)
                # mlx returns an exact hit whole; its server then has nothing left to prefill. The sim, like the
                # server's usual path, computes the last token again.
                expected = len(ids) - 1 if reused == len(ids) else reused
                assert sim.fetch(cells) == expected, tokens


def test_fast_on_20k_token_prompts() -> None:
    cache = PromptCache(capacity=10)
    base = toks(20_000)
    for i in range(10):
        cache.insert(base[: 4 * (19_000 + i)] + toks(100, chr(ord("a") + i)))
    start = time.perf_counter()
    for _ in range(20):
        assert cache.fetch(base + toks(10, "n")) == 19_009
    assert time.perf_counter() - start < 0.5


# --- prefill: segments, steps, checkpoints -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("segments", "cached", "step", "expected"),
    [
        # Measured on mlx_lm.server 0.32.2 (--prefill-step-size 256): a system + user prompt of 986 tokens,
        # 1 cached, system part 518 tokens: keepalives 256, 512, 517, 773, 984, 985 of 985.
        ([("system", 518), ("user", 986)], 1, 256,
         [(256, None), (512, None), (517, ("system", 518)), (773, None), (984, ("user", 985)), (985, None)]),
        # The same prompt again: only the last token is computed (keepalive 1/1).
        ([("system", 518), ("user", 986)], 985, 256, [(1, None)]),
        # Another question under the same system prompt (605 tokens, 518 cached): 86/87, 87/87.
        ([("system", 518), ("user", 605)], 518, 256, [(86, ("user", 604)), (87, None)]),
        # A tool result last: one "assistant" segment (691 tokens, 628 cached): 62/63, 63/63.
        ([("assistant", 691)], 628, 256, [(62, ("assistant", 690)), (63, None)]),
        ([("user", 3)], 0, 2048, [(2, ("user", 2)), (3, None)]),
        ([("user", 1)], 0, 2048, [(1, None)]),
        ([("assistant", 0)], 0, 2048, []),
    ],
)  # fmt: skip
def test_prefill_points(segments: list[Any], cached: int, step: int, expected: list[Any]) -> None:
    assert prefill_points(segments, cached, step) == expected


def test_prompt_segments() -> None:
    system, question = {"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}
    conv = _chat([system, question], TOOLS)
    prompt = render_prompt(conv)
    ((kind, sys_end), last) = prompt_segments(conv, prompt)
    assert (kind, last) == ("system", ("user", token_count(prompt)))
    # The system part ends where the user's text starts (mlx renders the system messages with an empty user
    # message and finds where that differs from the prompt).
    head = render_prompt(_chat([system, {"role": "user", "content": ""}], TOOLS), add_generation_prompt=False)
    assert prompt[: sys_end * 4] == head[: sys_end * 4] and prompt[sys_end * 4 :].startswith(text_cells("hello"))
    assert prompt_segments(_chat([question]), render_prompt(_chat([question]))) == [
        ("user", token_count(render_prompt(_chat([question]))))
    ]
    tool_last = _chat([question, {"role": "tool", "content": "out"}])
    assert prompt_segments(tool_last, render_prompt(tool_last)) == [
        ("assistant", token_count(render_prompt(tool_last)))
    ]
    assert prompt_segments(None, text_cells("once upon")) == [("assistant", 3)]
    # An empty first user message renders like the system-only prefix: mlx then finds no cut.
    empty = _chat([system, {"role": "user", "content": ""}])
    assert prompt_segments(empty, render_prompt(empty)) == [("user", token_count(render_prompt(empty)))]


# --- what the cache sees: rendering across turns -------------------------------------------------------------


def _chat(messages: list[Any], tools: list[Any] | None = None) -> Conversation:
    return chat_conversation({"messages": messages, "tools": tools or []})


TOOLS: list[Any] = [{"type": "function", "function": {"name": "Read", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("user", ["hello", "héllo wörld ✓"])
def test_next_turn_starts_with_prompt_plus_generated_tokens(user: str) -> None:
    first = [{"role": "system", "content": "be brief"}, {"role": "user", "content": user}]
    conv = _chat(first, TOOLS)
    prompt = render_prompt(conv)
    reply = write_reply(conv, node_id="n", reply_tokens=20, reasoning=False, prompt_tokens=1, cached_tokens=0)
    plan = plan_tokens(reply, max_tokens=512)
    second = [*first, {"role": "assistant", "content": reply.content}, {"role": "user", "content": "again"}]
    nxt = render_prompt(_chat(second, TOOLS))
    assert nxt.startswith(prompt + plan.cells)
    cache = PromptCache()
    cache.insert(prompt + plan.cells)
    assert cache.fetch(nxt) == token_count(prompt + plan.cells)
    cache.insert(nxt + toks(5, "r"))
    assert len(cache) == 1  # the conversation's entry grew


def _tool_turn(content: str) -> tuple[bytes, bytes, bytes]:
    """(turn 1 prompt, what the node generated, turn 2 prompt) for a reply that calls Read."""
    first = [{"role": "user", "content": '/tool Read {"file_path": "/a"}'}]
    conv = _chat(first, TOOLS)
    reply = Reply("", content, (ToolCall("Read", canonical_json({"file_path": "/a"})),))
    plan = plan_tokens(reply, max_tokens=512)
    # A client sends the arguments back in its own key order and spacing: rendering is canonical.
    call = {"id": "1", "type": "function", "function": {"name": "Read", "arguments": '{ "file_path" : "/a" }'}}
    second = [*first, {"role": "assistant", "content": content, "tool_calls": [call]}]
    second.append({"role": "tool", "tool_call_id": "1", "content": "data"})
    return render_prompt(conv), plan.cells, render_prompt(_chat(second, TOOLS))


def test_a_tool_call_after_text_re_renders_differently() -> None:
    # Qwen3-Coder's template writes the text, a blank line, then the call; the model wrote one newline. The
    # next prompt leaves the generated tokens right after the text, so the old entry is no prefix of the new.
    prompt, generated, nxt = _tool_turn("Let me read it.")
    text = token_count(text_cells("Let me read it."))
    assert common_prefix_tokens(prompt + generated, nxt) == token_count(prompt) + text
    cache = PromptCache()
    cache.insert(prompt + generated)
    assert cache.fetch(nxt) == token_count(prompt) + text
    cache.insert(nxt + toks(5, "r"))
    assert len(cache) == 2  # both entries stay


def test_a_bare_tool_call_re_renders_the_same() -> None:
    # With no text before it the call renders as generated (as measured with Qwen3-Coder's template).
    prompt, generated, nxt = _tool_turn("")
    assert nxt.startswith(prompt + generated)


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
