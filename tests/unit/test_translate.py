"""Anthropic Messages → chat completions (requests) and back (non-streaming answers)."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from proxy.answers import THINKING_SIGNATURE, from_chat_completion
from proxy.errors import InvalidRequest
from proxy.translate import (
    encode_chat_request,
    estimate_tokens,
    native_prompt_parts,
    prompt_parts,
    to_chat_request,
    to_native_body,
)
from proxy.wire.anthropic import (
    decode_count_tokens_request,
    decode_messages_request,
    session_id_from_metadata,
)
from proxy.wire.openai import decode_completion
from state.prefix import block_hashes
from tests.claude_code_request import TOOL_NAMES, billing_header, claude_code_request

BILLING = "x-anthropic-billing-header: cc_version=2.1.37.abc; cc_entrypoint=cli; cch=1f2e3;"
SCHEMA = {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}


def body(messages: list[dict[str, Any]] | None = None, **fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = {
        "model": "claude-opus-4-8",
        "max_tokens": 1024,
        "messages": messages if messages is not None else [{"role": "user", "content": "hi"}],
    }
    out.update(fields)
    return out


def encode(b: dict[str, Any]) -> bytes:
    return json.dumps(b).encode()


def chat(b: dict[str, Any], *, model_id: str | None = None, cap: int = 8192, images: bool = False) -> dict[str, Any]:
    """What the node receives, as JSON."""
    req = decode_messages_request(encode(b))
    out: dict[str, Any] = json.loads(
        encode_chat_request(to_chat_request(req, model_id=model_id, max_tokens_cap=cap, images=images))
    )
    return out


def user(*blocks: Any) -> dict[str, Any]:
    return {"role": "user", "content": list(blocks)}


def assistant(*blocks: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": list(blocks)}


def text(t: str, **extra: Any) -> dict[str, Any]:
    return {"type": "text", "text": t, **extra}


def image(media_type: str = "image/png", data: str = "iVBORw0KGgo=") -> dict[str, Any]:
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def tool_use(id_: str, name: str = "Read", input_: Any = None) -> dict[str, Any]:
    return {"type": "tool_use", "id": id_, "name": name, "input": input_ if input_ is not None else {"path": "/a"}}


def tool_result(id_: str, content: Any = "ok", **extra: Any) -> dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": id_, "content": content, **extra}


# -- system prompt -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("system", "expected"),
    [
        ("Be brief.", "Be brief."),
        ([text("You are a helper."), text("Be brief.")], "You are a helper.\n\nBe brief."),
        ([text(BILLING), text("You are a helper.", cache_control={"type": "ephemeral"})], "You are a helper."),
        (BILLING + "\nBe brief.", "Be brief."),
        ([text(BILLING)], None),
        ([], None),
        ("", None),
        (None, None),
    ],
    ids=["string", "blocks", "billing-block-dropped", "billing-line-dropped", "only-billing", "empty", "blank", "null"],
)
def test_system_prompt_becomes_one_leading_system_message(system: Any, expected: str | None) -> None:
    messages = chat(body(system=system))["messages"]
    if expected is None:
        assert messages == [{"role": "user", "content": "hi"}]
    else:
        assert messages[0] == {"role": "system", "content": expected}
        assert all(BILLING not in m["content"] for m in messages)


MID_SYSTEM: list[dict[str, Any]] = [
    {"role": "user", "content": "a"},
    {"role": "assistant", "content": "b"},
    {"role": "system", "content": "<system-reminder>files changed</system-reminder>"},
    {"role": "system", "content": [text("block reminder")]},
    {"role": "user", "content": "c"},
]


def test_mid_conversation_system_message_stays_in_place_as_a_reminder() -> None:
    """By default a user message: Qwen's chat templates reject any system message but the first."""
    messages = chat(body(MID_SYSTEM, system="sys"))["messages"]
    assert [(m["role"], m["content"]) for m in messages] == [
        ("system", "sys"),
        ("user", "a"),
        ("assistant", "b"),
        ("user", "<system-reminder>files changed</system-reminder>"),
        ("user", "<system-reminder>\nblock reminder\n</system-reminder>"),
        ("user", "c"),
    ]
    assert [m["role"] for m in messages].count("system") == 1


def test_mid_conversation_system_message_as_system() -> None:
    req = decode_messages_request(encode(body(MID_SYSTEM, system="sys")))
    out = json.loads(encode_chat_request(to_chat_request(req, model_id=None, max_tokens_cap=10, late_system="system")))
    assert [(m["role"], m["content"]) for m in out["messages"]] == [
        ("system", "sys"),
        ("user", "a"),
        ("assistant", "b"),
        ("system", "<system-reminder>files changed</system-reminder>"),
        ("system", "block reminder"),
        ("user", "c"),
    ]


def test_leading_system_message_without_system_field_stays_system() -> None:
    messages = chat(body([{"role": "system", "content": "rules"}, {"role": "user", "content": "q"}]))["messages"]
    assert messages == [{"role": "system", "content": "rules"}, {"role": "user", "content": "q"}]


# -- user turns --------------------------------------------------------------------------------


def test_tool_results_come_before_the_rest_of_the_user_turn() -> None:
    messages = chat(
        body(
            [
                user(text("do it")),
                assistant(tool_use("toolu_1"), tool_use("toolu_2", "Bash", {"command": "ls"})),
                user(text("also this"), tool_result("toolu_1", "one"), tool_result("toolu_2", "two")),
            ]
        )
    )["messages"]
    assert messages[2:] == [
        {"role": "tool", "tool_call_id": "toolu_1", "content": "one"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "two"},
        {"role": "user", "content": "also this"},
    ]


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (tool_result("t", "plain"), "plain"),
        (tool_result("t", "boom", is_error=True), "[tool error] boom"),
        (tool_result("t", "fine", is_error=False), "fine"),
        (tool_result("t", [text("line 1"), text("line 2")]), "line 1\nline 2"),
        (tool_result("t", [text("see:"), image("image/jpeg")]), "see:\n[image omitted: image/jpeg]"),
        (tool_result("t", [{"type": "tool_reference", "tool_name": "Grep"}]), "[tool reference: Grep]"),
        (
            tool_result(
                "t", [{"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "D"}}]
            ),
            "D",
        ),
        ({"type": "tool_result", "tool_use_id": "t"}, ""),
        (tool_result("t", None), ""),
        (tool_result("t", [], is_error=True), "[tool error] "),
    ],
    ids=[
        "string",
        "error",
        "not-error",
        "text-list",
        "image-in-result",
        "tool-reference",
        "document",
        "absent",
        "null",
        "empty-error",
    ],
)
def test_tool_result_content_is_flattened_to_text(result: dict[str, Any], expected: str) -> None:
    messages = chat(body([user(text("q")), assistant(tool_use("t")), user(result)]))["messages"]
    assert messages[-1] == {"role": "tool", "tool_call_id": "t", "content": expected}


def test_text_parts_of_a_user_turn_are_joined_into_a_string() -> None:
    messages = chat(body([user(text("<system-reminder>r</system-reminder>"), text("the prompt"))]))["messages"]
    assert messages == [{"role": "user", "content": "<system-reminder>r</system-reminder>\nthe prompt"}]


@pytest.mark.parametrize(
    ("images", "block", "expected"),
    [
        (False, image("image/png"), "[image omitted: image/png]"),
        (True, image("image/png", "QUJD"), {"type": "image_url", "image_url": {"url": "data:image/png;base64,QUJD"}}),
        (
            True,
            {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}},
            {"type": "image_url", "image_url": {"url": "https://x.test/a.png"}},
        ),
        (False, {"type": "image", "source": {"type": "url", "url": "https://x.test/a.png"}}, "[image omitted: url]"),
    ],
    ids=["placeholder", "data-url", "url", "url-placeholder"],
)
def test_images(images: bool, block: dict[str, Any], expected: Any) -> None:
    content = chat(body([user(text("look"), block, text("and"), text("this"))]), images=images)["messages"][0][
        "content"
    ]
    if isinstance(expected, str):
        assert content == f"look\n{expected}\nand\nthis"
    else:
        assert content == [{"type": "text", "text": "look"}, expected, {"type": "text", "text": "and\nthis"}]


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ({"type": "text", "media_type": "text/plain", "data": "the text"}, "the text"),
        (
            {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0="},
            "[document omitted: application/pdf]",
        ),
        ({"type": "content", "content": [text("a"), text("b")]}, "a\nb"),
        ({"type": "url", "url": "https://x.test/a.pdf"}, "[document omitted: https://x.test/a.pdf]"),
    ],
)
def test_documents_become_their_text_or_a_placeholder(source: dict[str, Any], expected: str) -> None:
    messages = chat(body([user({"type": "document", "source": source}, text("summarise"))]))["messages"]
    assert messages == [{"role": "user", "content": f"{expected}\nsummarise"}]


# -- assistant turns ---------------------------------------------------------------------------


def test_tool_use_becomes_tool_calls_with_json_string_arguments() -> None:
    args = {"command": "ls -la", "timeout": 5, "nested": {"x": [1, "é"]}}
    messages = chat(body([user(text("q")), assistant(text("Running."), tool_use("toolu_abc", "Bash", args))]))[
        "messages"
    ]
    assert messages[1]["content"] == "Running."
    (call,) = messages[1]["tool_calls"]
    assert call["id"] == "toolu_abc"
    assert call["type"] == "function"
    assert call["function"]["name"] == "Bash"
    assert isinstance(call["function"]["arguments"], str)
    assert json.loads(call["function"]["arguments"]) == args


@pytest.mark.parametrize(
    ("blocks", "expected"),
    [
        (
            [{"type": "thinking", "thinking": "hmm", "signature": "s"}, text("answer")],
            [{"role": "assistant", "content": "answer"}],
        ),
        ([{"type": "redacted_thinking", "data": "xx"}, text("answer")], [{"role": "assistant", "content": "answer"}]),
        ([{"type": "thinking", "thinking": "only thoughts", "signature": "s"}], []),
        (
            [
                {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {"query": "q"}},
                {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []},
                text("found"),
            ],
            [{"role": "assistant", "content": "found"}],
        ),
    ],
    ids=["thinking", "redacted", "only-thinking", "server-tools"],
)
def test_blocks_a_node_cannot_use_are_dropped(blocks: list[Any], expected: list[Any]) -> None:
    assert chat(body([user(text("q")), assistant(*blocks)]))["messages"][1:] == expected


def test_assistant_with_only_tool_calls_has_empty_content() -> None:
    (message,) = chat(body([user(text("q")), assistant(tool_use("toolu_1"))]))["messages"][1:]
    assert message["content"] == ""
    assert [c["id"] for c in message["tool_calls"]] == ["toolu_1"]


# -- tools and parameters ----------------------------------------------------------------------


def test_tools_become_functions_with_the_schema_untouched() -> None:
    schema_bytes = b'{"type":"object", "properties": {"path": {"type":"string","description":"\\u00e9"}},"z":1,"a":2}'
    raw = (
        b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi"}],"tools":['
        + (
            b'{"name":"Read","description":"reads","input_schema":'
            + schema_bytes
            + b',"cache_control":{"type":"ephemeral"}},'
            b'{"type":"web_search_20250305","name":"web_search","max_uses":5}]'
        )
        + b"}"
    )
    out = encode_chat_request(to_chat_request(decode_messages_request(raw), model_id=None, max_tokens_cap=10))
    assert b'"parameters":' + schema_bytes in out  # byte for byte, key order and escapes kept
    tools = json.loads(out)["tools"]
    assert tools == [
        {
            "type": "function",
            "function": {"name": "Read", "description": "reads", "parameters": json.loads(schema_bytes)},
        }
    ]


@pytest.mark.parametrize(
    ("tool_choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "any"}, "required"),
        ({"type": "none"}, "none"),
        ({"type": "tool", "name": "Read"}, {"type": "function", "function": {"name": "Read"}}),
        ({"type": "tool", "name": "web_search"}, "auto"),  # a dropped server tool cannot be forced
        (None, None),
    ],
)
def test_tool_choice(tool_choice: Any, expected: Any) -> None:
    tools = [{"name": "Read", "input_schema": SCHEMA}, {"type": "web_search_20250305", "name": "web_search"}]
    out = chat(body(tools=tools, tool_choice=tool_choice))
    assert out.get("tool_choice") == expected
    assert [t["function"]["name"] for t in out["tools"]] == ["Read"]


def test_disable_parallel_tool_use() -> None:
    tools = [{"name": "Read", "input_schema": SCHEMA}]
    out = chat(body(tools=tools, tool_choice={"type": "auto", "disable_parallel_tool_use": True}))
    assert out["parallel_tool_calls"] is False
    assert "parallel_tool_calls" not in chat(body(tools=tools, tool_choice={"type": "auto"}))


def test_only_server_tools_means_no_tools_and_no_tool_choice() -> None:
    out = chat(body(tools=[{"type": "web_search_20250305", "name": "web_search"}], tool_choice={"type": "any"}))
    assert "tools" not in out
    assert "tool_choice" not in out


@pytest.mark.parametrize(("max_tokens", "cap", "expected"), [(100, 8192, 100), (64000, 8192, 8192), (8192, 8192, 8192)])
def test_max_tokens_is_clamped_and_always_sent(max_tokens: int, cap: int, expected: int) -> None:
    assert chat(body(max_tokens=max_tokens), cap=cap)["max_tokens"] == expected


@pytest.mark.parametrize(
    ("model_id", "expected"), [(None, None), ("mlx-community/Qwen3-8B-4bit", "mlx-community/Qwen3-8B-4bit")]
)
def test_model_is_the_node_model_never_the_claude_name(model_id: str | None, expected: str | None) -> None:
    out = chat(body(model="claude-opus-4-8"), model_id=model_id)
    assert out.get("model") == expected
    assert (
        "claude"
        not in encode_chat_request(
            to_chat_request(decode_messages_request(encode(body())), model_id=model_id, max_tokens_cap=10)
        ).decode()
    )


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, {}),
        ({"temperature": 0.2, "top_p": 0.9, "top_k": 40}, {"temperature": 0.2, "top_p": 0.9, "top_k": 40}),
        ({"temperature": None, "top_p": None, "top_k": None}, {}),
        ({"stop_sequences": ["END", "###"]}, {"stop": ["END", "###"]}),
        ({"stop_sequences": []}, {}),
    ],
)
def test_sampling_parameters_only_when_given(fields: dict[str, Any], expected: dict[str, Any]) -> None:
    out = chat(body(**fields))
    for key in ("temperature", "top_p", "top_k", "stop"):
        assert out.get(key) == expected.get(key)
    assert "seed" not in out
    assert "max_completion_tokens" not in out


@pytest.mark.parametrize(("stream", "options"), [(True, {"include_usage": True}), (False, None)])
def test_stream_and_usage_reporting(stream: bool, options: Any) -> None:
    out = chat(body(stream=stream))
    assert out["stream"] is stream
    assert out.get("stream_options") == options


def test_unknown_fields_are_tolerated() -> None:
    out = chat(
        body(
            [
                {
                    "role": "user",
                    "content": [text("hi", cache_control={"type": "ephemeral"}, citations=None)],
                    "future": 1,
                }
            ],
            thinking={"type": "adaptive"},
            context_management={"edits": []},
            output_config={"effort": "high"},
            service_tier="auto",
            some_future_field={"deep": [1, 2]},
        )
    )
    assert out["messages"] == [{"role": "user", "content": "hi"}]


# -- decoding errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b'{"model": "m", "max_tokens": 5, "messages": [', "not valid JSON"),
        (b"\xff\xfe{}", "not valid JSON"),
        (b'{"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "\xff"}]}', "UTF-8"),
        (encode({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}), "`model`"),
        (encode({"model": "m", "max_tokens": 5}), "`messages`"),
        (encode({"model": "m", "messages": [{"role": "user", "content": "x"}]}), "`max_tokens`"),
        (encode(body([])), "$.messages"),
        (encode(body(max_tokens=0)), "$.max_tokens"),
        (encode(body(max_tokens="many")), "$.max_tokens"),
        (encode(body([{"role": "robot", "content": "x"}])), "$.messages[0].role"),
        (encode(body([user({"type": "video", "url": "x"})])), "unknown content block type 'video'"),
        (encode(body([user(text("a"), {"type": "hologram"})])), "$.messages[0].content[1].type"),
        (encode(body([user(tool_result("t", [{"type": "audio"}]))])), "'audio'"),
        (encode(body([user(text("a"))], system=[{"type": "image"}])), "'image'"),
        (b"[]", "Expected `object`"),
    ],
    ids=[
        "truncated",
        "binary",
        "non-utf8",
        "no-model",
        "no-messages",
        "no-max-tokens",
        "empty-messages",
        "zero-max-tokens",
        "max-tokens-type",
        "bad-role",
        "unknown-block",
        "unknown-block-path",
        "unknown-tool-result-block",
        "bad-system-block",
        "not-object",
    ],
)
def test_bad_requests_are_invalid_request_naming_the_problem(raw: bytes, needle: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        decode_messages_request(raw)
    assert needle in info.value.message
    assert info.value.status == 400


def test_count_tokens_needs_no_max_tokens() -> None:
    req = decode_count_tokens_request(encode({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
    assert estimate_tokens(req) > 0
    with pytest.raises(InvalidRequest):
        decode_count_tokens_request(encode({"model": "m", "messages": []}))


# -- metadata ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("user_id", "expected"),
    [
        (json.dumps({"device_id": "d", "account_uuid": "", "session_id": "0b7c-11"}), "0b7c-11"),
        (
            "user_3f9a_account_1c2d-77_session_8e1f0000-aaaa-bbbb-cccc-0123456789ab",
            "8e1f0000-aaaa-bbbb-cccc-0123456789ab",
        ),
        (json.dumps({"device_id": "d"}), None),
        ("{not json", None),
        ("someone@example.com", None),
        ("", None),
        (None, None),
    ],
)
def test_session_id_from_metadata(user_id: str | None, expected: str | None) -> None:
    req = decode_messages_request(encode(body(metadata={"user_id": user_id})))
    assert session_id_from_metadata(req) == expected


def test_session_id_without_metadata() -> None:
    assert session_id_from_metadata(decode_messages_request(encode(body()))) is None


# -- prefix hashing ----------------------------------------------------------------------------


def _parts(b: dict[str, Any]) -> list[bytes]:
    return prompt_parts(to_chat_request(decode_messages_request(encode(b)), model_id=None, max_tokens_cap=8192))


def test_prompt_parts_of_turn_n_are_a_prefix_of_turn_n_plus_1() -> None:
    """Billing header (cch differs per request) and moving cache_control markers do not disturb the prefix."""
    for n in range(1, 5):
        turn = _parts(claude_code_request("s-1", n))
        following = _parts(claude_code_request("s-1", n + 1))
        assert len(following) > len(turn)
        # the newest user message of turn n is the first message of the next round: same bytes
        assert following[: len(turn)] == turn


def test_prompt_parts_are_system_then_tools_then_one_item_per_message() -> None:
    b = claude_code_request("s-1", 3)
    chat_req = to_chat_request(decode_messages_request(encode(b)), model_id=None, max_tokens_cap=8192)
    parts = prompt_parts(chat_req)
    assert len(parts) == 1 + len(chat_req.messages)
    assert json.loads(parts[0])["role"] == "system"  # the order Qwen, Llama and GLM templates render
    assert len(json.loads(parts[1])) == len(TOOL_NAMES)
    assert [json.loads(p)["role"] for p in parts[2:]] == [m.__struct_config__.tag for m in chat_req.messages[1:]]
    assert prompt_parts(to_chat_request(decode_messages_request(encode(b)), model_id="x", max_tokens_cap=1)) == parts
    tools_first = prompt_parts(chat_req, tools_first=True)
    assert tools_first[:2] == [parts[1], parts[0]]
    assert tools_first[2:] == parts[2:]


def test_agents_that_share_tools_but_not_the_system_prompt_share_no_prefix() -> None:
    def blocks_of(system_prompt: str) -> tuple[str, ...]:
        b = claude_code_request("s-1", 1)
        b["system"] = [{"type": "text", "text": system_prompt}]
        chat_req = to_chat_request(decode_messages_request(encode(b)), model_id=None, max_tokens_cap=8192)
        return block_hashes(prompt_parts(chat_req), salt="p")

    one, other = blocks_of("You are agent one." * 10), blocks_of("You are agent two." * 10)
    assert len(one) > 10
    assert one[0] != other[0]  # the node renders the system prompt first: nothing in common


def test_message_bytes_depend_only_on_that_message() -> None:
    a = _parts(body([user(text("same")), assistant(text("x")), user(text("one"))]))
    b = _parts(body([user(text("same")), assistant(text("y")), user(text("one"))]))
    assert a[1] == b[1]
    assert a[2] != b[2]
    assert a[3] == b[3]


def test_native_prompt_parts_are_stable_across_turns() -> None:
    for n in range(1, 4):
        turn = native_prompt_parts(decode_messages_request(encode(claude_code_request("s-2", n))))
        following = native_prompt_parts(decode_messages_request(encode(claude_code_request("s-2", n + 1))))
        # the newest message of turn n carries cache_control, which is not part of the hashed bytes
        assert following[: len(turn)] == turn
        assert BILLING.split(":")[0].encode() not in turn[1]


# -- native bodies -----------------------------------------------------------------------------


@pytest.mark.parametrize(("model_id", "expected"), [(None, None), ("qwen3-coder", "qwen3-coder")])
def test_native_body_keeps_every_field(model_id: str | None, expected: str | None) -> None:
    original = claude_code_request("s-3", 2, max_tokens=64000)
    out = json.loads(to_native_body(encode(original), model_id=model_id, max_tokens_cap=8192))
    assert out.get("model") == expected
    assert out["max_tokens"] == 8192
    assert out["system"] == original["system"][1:]
    for key in set(original) - {"model", "max_tokens", "system"}:
        assert out[key] == original[key], key


@pytest.mark.parametrize(
    ("system", "expected"),
    [
        (BILLING + "\nBe brief.", "Be brief."),
        ("Be brief.", "Be brief."),
        ([text("Be brief.")], [text("Be brief.")]),
    ],
)
def test_native_body_drops_only_the_billing_header(system: Any, expected: Any) -> None:
    out = json.loads(to_native_body(encode(body(system=system, max_tokens=5)), model_id=None, max_tokens_cap=100))
    assert out["system"] == expected
    assert out["max_tokens"] == 5


def test_native_body_rejects_garbage() -> None:
    with pytest.raises(InvalidRequest):
        to_native_body(b"{nope", model_id=None, max_tokens_cap=10)


# -- the realistic request ---------------------------------------------------------------------


def test_claude_code_request_translates() -> None:
    original = claude_code_request("5f7e", 3, server_tool=True)
    raw = encode(original)
    assert len(raw) > 75_000
    req = decode_messages_request(raw)
    assert session_id_from_metadata(req) == "5f7e"
    out = json.loads(encode_chat_request(to_chat_request(req, model_id=None, max_tokens_cap=8192)))
    assert "model" not in out
    assert out["max_tokens"] == 8192
    assert [t["function"]["name"] for t in out["tools"]] == list(TOOL_NAMES)  # the server tool is gone
    assert out["messages"][0]["role"] == "system"
    assert not out["messages"][0]["content"].startswith("x-anthropic")
    assert "thinking" not in json.dumps(out["messages"])
    assert {m["role"] for m in out["messages"]} == {"system", "user", "assistant", "tool"}
    for message in out["messages"]:
        for call in message.get("tool_calls", []):
            assert any(m.get("tool_call_id") == call["id"] for m in out["messages"])


def test_billing_header_changes_nothing_the_node_sees() -> None:
    a = claude_code_request("s-4", 2)
    b = claude_code_request("s-4", 2)
    b["system"][0]["text"] = billing_header("another-session", 7)
    assert a["system"][0] != b["system"][0]
    assert chat(a) == chat(b)
    assert estimate_tokens(decode_messages_request(encode(a))) == estimate_tokens(decode_messages_request(encode(b)))


# -- count_tokens estimate ---------------------------------------------------------------------


def test_estimate_tokens_is_deterministic_and_grows_with_content() -> None:
    estimates = [estimate_tokens(decode_messages_request(encode(claude_code_request("s", n)))) for n in range(1, 5)]
    assert estimates == sorted(estimates)
    assert len(set(estimates)) == len(estimates)
    assert 15_000 < estimates[0] < 30_000  # ~80 KB of mostly tool schemas
    short = estimate_tokens(decode_messages_request(encode(body([user(text("hi"))]))))
    longer = estimate_tokens(decode_messages_request(encode(body([user(text("hi" * 100))]))))
    assert 0 < short < longer


# -- answers -----------------------------------------------------------------------------------


def completion(
    content: str | None = "Hello.",
    finish_reason: str | None = "stop",
    *,
    tool_calls: list[Any] | None = None,
    reasoning: str | None = None,
    usage: Any = None,
    **choice: Any,
) -> bytes:
    """A non-streaming answer shaped like mlx_lm.server's (every message field present)."""
    message = {"role": "assistant", "content": content, "reasoning": reasoning, "tool_calls": tool_calls or []}
    return encode(
        {
            "id": "chatcmpl-1",
            "system_fingerprint": "x",
            "object": "chat.completion",
            "model": "default_model",
            "created": 1,
            "choices": [{"index": 0, "finish_reason": finish_reason, "message": message, **choice}],
            "usage": usage
            if usage is not None
            else {
                "prompt_tokens": 100,
                "completion_tokens": 7,
                "total_tokens": 107,
                "prompt_tokens_details": {"cached_tokens": 60},
            },
        }
    )


def answer(raw: bytes, stop_sequences: list[str] | None = None) -> dict[str, Any]:
    resp = from_chat_completion(
        decode_completion(raw), model="claude-opus-4-8", message_id="msg_1", stop_sequences=stop_sequences or ()
    )
    out: dict[str, Any] = json.loads(msgspec.json.encode(resp))
    return out


def call(name: str, arguments: str, id_: str = "3f2a0000-0000-4000-8000-000000000000") -> dict[str, Any]:
    return {"function": {"name": name, "arguments": arguments}, "type": "function", "id": id_}


@pytest.mark.parametrize(
    ("raw", "stops", "stop_reason", "stop_sequence"),
    [
        (completion("hi", "stop"), None, "end_turn", None),
        (completion("hi", "length"), None, "max_tokens", None),
        (completion("", "tool_calls", tool_calls=[call("Read", "{}")]), None, "tool_use", None),
        (completion("", "stop", tool_calls=[call("Read", "{}")]), None, "tool_use", None),
        (completion("hi", "tool_calls"), None, "end_turn", None),  # no call was actually made
        (completion("hi", "content_filter"), None, "refusal", None),
        (completion("hi", None), None, "end_turn", None),
        (completion("hi", "abort"), None, "end_turn", None),
        (completion("hi", "stop", stop_reason="END"), ["END"], "stop_sequence", "END"),  # vLLM names it
        (completion("hi", "stop", stop_reason=151645), ["END"], "end_turn", None),  # vLLM: an eos token id
        (completion("hi END", "stop"), ["END"], "stop_sequence", "END"),  # a server that keeps the text
        (completion("hi", "stop"), ["END"], "end_turn", None),  # mlx_lm: the match was cut, cannot tell
    ],
)
def test_finish_reasons(raw: bytes, stops: list[str] | None, stop_reason: str, stop_sequence: str | None) -> None:
    out = answer(raw, stops)
    assert out["stop_reason"] == stop_reason
    assert out["stop_sequence"] == stop_sequence
    if stop_sequence:
        assert all(stop_sequence not in b.get("text", "") for b in out["content"])


def test_answer_shape_and_usage_with_cached_tokens() -> None:
    out = answer(completion("Hello."))
    assert out == {
        "type": "message",
        "id": "msg_1",
        "role": "assistant",
        "model": "claude-opus-4-8",
        "content": [{"type": "text", "text": "Hello."}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 40,
            "output_tokens": 7,
            "cache_read_input_tokens": 60,
            "cache_creation_input_tokens": 0,
        },
    }


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        ({"prompt_tokens": 10, "completion_tokens": 2}, (10, 2, 0)),
        ({"prompt_tokens": 10, "completion_tokens": 2, "prompt_tokens_details": None}, (10, 2, 0)),
        ({"prompt_tokens": 10, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": None}}, (10, 2, 0)),
        ({"prompt_tokens": 10, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 10}}, (0, 2, 10)),
        ({"prompt_tokens": None, "completion_tokens": None}, (0, 0, 0)),
    ],
)
def test_usage_tolerates_nulls(usage: dict[str, Any], expected: tuple[int, int, int]) -> None:
    u = answer(completion(usage=usage))["usage"]
    assert (u["input_tokens"], u["output_tokens"], u["cache_read_input_tokens"]) == expected


def test_reasoning_text_and_tool_calls_in_order() -> None:
    out = answer(
        completion(
            "I will read both.",
            "tool_calls",
            reasoning="The user wants files.",
            tool_calls=[call("Read", '{"path": "/a"}'), call("Bash", '{"command": "ls"}', id_="call_2")],
        )
    )
    kinds = [b["type"] for b in out["content"]]
    assert kinds == ["thinking", "text", "tool_use", "tool_use"]
    assert out["content"][0] == {
        "type": "thinking",
        "thinking": "The user wants files.",
        "signature": THINKING_SIGNATURE,
    }
    first, second = out["content"][2:]
    assert (first["name"], first["input"]) == ("Read", {"path": "/a"})
    assert (second["name"], second["input"]) == ("Bash", {"command": "ls"})
    assert first["id"].startswith("toolu_") and second["id"].startswith("toolu_")
    assert first["id"] != second["id"]
    assert out["stop_reason"] == "tool_use"


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ('{"a": 1}', {"a": 1}),
        ("", {}),
        ("   ", {}),
        (None, {}),
        ({"a": 1}, {"a": 1}),
        ('{"a": 1', {"_raw": '{"a": 1'}),
        ("[1, 2]", {"_raw": "[1, 2]"}),
    ],
    ids=["object", "empty", "blank", "null", "object-not-string", "truncated", "not-an-object"],
)
def test_tool_arguments_become_an_input_object(arguments: Any, expected: dict[str, Any]) -> None:
    tool_call = {"id": "c1", "type": "function", "function": {"name": "Read", "arguments": arguments}}
    out = answer(completion(None, "tool_calls", tool_calls=[tool_call]))
    assert out["content"] == [{"type": "tool_use", "id": out["content"][0]["id"], "name": "Read", "input": expected}]


def test_vllm_style_answer_with_nulls() -> None:
    raw = encode(
        {
            "id": "chatcmpl-x",
            "object": "chat.completion",
            "model": "qwen",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": None, "reasoning_content": None, "tool_calls": None},
                    "logprobs": None,
                    "finish_reason": "length",
                    "stop_reason": None,
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14, "prompt_tokens_details": None},
        }
    )
    out = answer(raw)
    assert out["content"] == []
    assert out["stop_reason"] == "max_tokens"
    assert out["usage"]["input_tokens"] == 5


def test_no_choices_is_an_empty_end_turn() -> None:
    out = answer(encode({"choices": [], "usage": None}))
    assert (out["content"], out["stop_reason"]) == ([], "end_turn")


def test_garbage_completion_raises_value_error() -> None:
    for raw in (b"<html>", b'{"choices": "nope"}', b"[]"):
        with pytest.raises(ValueError):
            decode_completion(raw)


def test_tool_use_id_round_trip() -> None:
    """The id Claude Code gets back is the id the node sees on both the call and its result."""
    first = answer(completion(None, "tool_calls", tool_calls=[call("Read", '{"path": "/a"}', id_="node-id")]))
    tool_block = first["content"][0]
    next_turn = body(
        [
            user(text("read /a")),
            {"role": "assistant", "content": first["content"]},
            user(tool_result(tool_block["id"], "contents of a")),
        ]
    )
    messages = chat(next_turn)["messages"]
    assert messages[1]["tool_calls"][0]["id"] == tool_block["id"]
    assert messages[2] == {"role": "tool", "tool_call_id": tool_block["id"], "content": "contents of a"}
    assert json.loads(messages[1]["tool_calls"][0]["function"]["arguments"]) == {"path": "/a"}
