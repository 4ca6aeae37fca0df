"""StreamTranslator: node chunks in, the Anthropic event stream a client accumulates out."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from proxy.answers import THINKING_SIGNATURE
from proxy.sse import SSEDecoder, encode_event
from proxy.stream import StreamTranslator
from proxy.wire.anthropic import MessageDeltaEvent
from proxy.wire.openai import decode_chunk


def mlx_chunk(
    content: str = "", *, reasoning: str = "", tool_calls: list[Any] | None = None, finish: str | None = None
) -> dict[str, Any]:
    """A chunk as mlx_lm.server writes it: every delta field present, empty when unused."""
    delta = {"role": "assistant", "content": content, "reasoning": reasoning, "tool_calls": tool_calls or []}
    return {
        "id": "chatcmpl-1",
        "system_fingerprint": "fp",
        "object": "chat.completion.chunk",
        "model": "default_model",
        "created": 1,
        "choices": [{"index": 0, "finish_reason": finish, "delta": delta}],
    }


def usage_chunk(prompt: int = 1000, completion: int = 12, cached: int | None = 900) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    if cached is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return {"id": "chatcmpl-1", "object": "chat.completion", "choices": [], "usage": usage}


def vllm_chunk(delta: dict[str, Any], finish: str | None = None, **choice: Any) -> dict[str, Any]:
    """A chunk as vLLM writes it: only what changed, nulls elsewhere."""
    return {
        "id": "chatcmpl-2",
        "object": "chat.completion.chunk",
        "model": "qwen",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, **choice}],
    }


def mlx_call(name: str, arguments: str, index: int = 0) -> dict[str, Any]:
    return {"function": {"name": name, "arguments": arguments}, "type": "function", "id": "3f2a-uuid", "index": index}


def run(chunks: list[dict[str, Any]], stop_sequences: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The whole client-visible stream, as the JSON events the client parses."""
    tr = StreamTranslator(model="claude-opus-4-8", message_id="msg_1", stop_sequences=stop_sequences)
    events = tr.start()
    for chunk in chunks:
        events += tr.feed(decode_chunk(json.dumps(chunk)))
    events += tr.finish()
    return [json.loads(msgspec.json.encode(e)) for e in events]


def accumulate(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Rebuild the final message the way the Anthropic SDK does, checking the event grammar on the way."""
    assert events[0]["type"] == "message_start"
    message: dict[str, Any] = events[0]["message"]
    blocks: list[dict[str, Any]] = []
    partial: dict[int, str] = {}
    open_index: int | None = None
    for event in events[1:]:
        kind = event["type"]
        if kind == "content_block_start":
            assert open_index is None, "a block started while another was open"
            assert event["index"] == len(blocks), "block indexes must count up from 0"
            blocks.append(dict(event["content_block"]))
            open_index = event["index"]
        elif kind == "content_block_delta":
            assert event["index"] == open_index
            block, delta = blocks[event["index"]], event["delta"]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "thinking_delta":
                block["thinking"] += delta["thinking"]
            elif delta["type"] == "signature_delta":
                block["signature"] = delta["signature"]
            elif delta["type"] == "input_json_delta":
                partial[event["index"]] = partial.get(event["index"], "") + delta["partial_json"]
        elif kind == "content_block_stop":
            assert open_index is not None and event["index"] == open_index
            if blocks[open_index]["type"] == "tool_use":
                blocks[open_index]["input"] = json.loads(partial.get(open_index) or "{}")
            open_index = None
        elif kind == "message_delta":
            assert open_index is None
            message.update(event["delta"])
            message["usage"] = event["usage"]
        elif kind == "message_stop":
            assert event is events[-1]
    assert events[-1]["type"] == "message_stop"
    message["content"] = blocks
    return message


def test_message_start_comes_first_with_zero_usage() -> None:
    (start,) = [
        json.loads(msgspec.json.encode(e)) for e in StreamTranslator(model="claude-x", message_id="msg_9").start()
    ]
    assert start == {
        "type": "message_start",
        "message": {
            "type": "message",
            "id": "msg_9",
            "role": "assistant",
            "model": "claude-x",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": 0,
                "output_tokens": 0,
                "cache_read_input_tokens": 0,
                "cache_creation_input_tokens": 0,
            },
        },
    }


def test_text_stream() -> None:
    events = run([mlx_chunk("Hel"), mlx_chunk("lo"), mlx_chunk(""), mlx_chunk("", finish="stop"), usage_chunk()])
    assert [e["type"] for e in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[1]["content_block"] == {"type": "text", "text": ""}
    message = accumulate(events)
    assert message["content"] == [{"type": "text", "text": "Hello"}]
    assert message["stop_reason"] == "end_turn"
    assert message["stop_sequence"] is None
    assert message["usage"] == {
        "input_tokens": 100,
        "output_tokens": 12,
        "cache_read_input_tokens": 900,
        "cache_creation_input_tokens": 0,
    }


def test_whole_tool_call_in_one_chunk_like_mlx() -> None:
    args = '{"command": "ls -la", "description": "List files"}'
    events = run(
        [mlx_chunk("Listing."), mlx_chunk(tool_calls=[mlx_call("Bash", args)]), mlx_chunk(finish="tool_calls")]
    )
    starts = [e for e in events if e["type"] == "content_block_start"]
    assert [s["content_block"]["type"] for s in starts] == ["text", "tool_use"]
    tool = starts[1]["content_block"]
    assert tool["id"].startswith("toolu_") and tool["name"] == "Bash" and tool["input"] == {}
    deltas = [e["delta"] for e in events if e["type"] == "content_block_delta" and e["index"] == 1]
    assert deltas == [{"type": "input_json_delta", "partial_json": args}]
    message = accumulate(events)
    assert message["content"][1]["input"] == {"command": "ls -la", "description": "List files"}
    assert message["stop_reason"] == "tool_use"


def test_tool_call_arguments_in_pieces_like_vllm() -> None:
    pieces = ['{"pa', 'th": "/', "src/a.py", '"}']
    chunks = [vllm_chunk({"role": "assistant", "content": ""})]
    chunks.append(
        vllm_chunk(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "chatcmpl-tool-1",
                        "type": "function",
                        "function": {"name": "Read", "arguments": ""},
                    }
                ]
            }
        )
    )
    chunks += [vllm_chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}) for p in pieces]
    chunks.append(vllm_chunk({}, finish="tool_calls"))
    events = run(chunks)
    assert sum(e["type"] == "content_block_start" for e in events) == 1  # never a duplicate tool_use block
    partials = [e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta"]
    assert partials == pieces  # every piece streamed, none dropped
    message = accumulate(events)
    assert message["content"] == [
        {"type": "tool_use", "id": message["content"][0]["id"], "name": "Read", "input": {"path": "/src/a.py"}}
    ]
    assert message["stop_reason"] == "tool_use"


def test_two_tool_calls_in_pieces() -> None:
    chunks = [
        vllm_chunk({"tool_calls": [{"index": 0, "id": "a", "function": {"name": "Read", "arguments": '{"path"'}}]}),
        vllm_chunk({"tool_calls": [{"index": 0, "function": {"arguments": ': "/a"}'}}]}),
        vllm_chunk({"tool_calls": [{"index": 1, "id": "b", "function": {"name": "Grep", "arguments": ""}}]}),
        vllm_chunk({"tool_calls": [{"index": 1, "function": {"arguments": '{"pattern": "x"}'}}]}),
        vllm_chunk({}, finish="tool_calls"),
    ]
    message = accumulate(run(chunks))
    assert [(b["name"], b["input"]) for b in message["content"]] == [
        ("Read", {"path": "/a"}),
        ("Grep", {"pattern": "x"}),
    ]
    assert len({b["id"] for b in message["content"]}) == 2


def test_two_whole_tool_calls_in_one_chunk_like_mlx() -> None:
    calls = [mlx_call("Read", '{"path": "/a"}', 0), mlx_call("Read", '{"path": "/b"}', 1)]
    message = accumulate(run([mlx_chunk(tool_calls=calls, finish="tool_calls"), usage_chunk()]))
    assert [b["input"] for b in message["content"]] == [{"path": "/a"}, {"path": "/b"}]


def test_tool_calls_without_index() -> None:
    chunks = [
        vllm_chunk({"tool_calls": [{"id": "a", "function": {"name": "Read", "arguments": '{"path": '}}]}),
        vllm_chunk({"tool_calls": [{"function": {"arguments": '"/a"}'}}]}),
        vllm_chunk({"tool_calls": [{"id": "b", "function": {"name": "Read", "arguments": {"path": "/b"}}}]}),
        vllm_chunk({}, finish="tool_calls"),
    ]
    message = accumulate(run(chunks))
    assert [b["input"] for b in message["content"]] == [{"path": "/a"}, {"path": "/b"}]


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])
def test_reasoning_then_text(field: str) -> None:
    chunks = [
        vllm_chunk({field: "Think"}),
        vllm_chunk({field: "ing."}),
        vllm_chunk({"content": "Answer."}),
        vllm_chunk({}, finish="stop"),
    ]
    events = run(chunks)
    message = accumulate(events)
    assert message["content"] == [
        {"type": "thinking", "thinking": "Thinking.", "signature": THINKING_SIGNATURE},
        {"type": "text", "text": "Answer."},
    ]
    start = next(e for e in events if e["type"] == "content_block_start")
    assert start["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    # the signature arrives just before the thinking block closes
    stop_at = next(i for i, e in enumerate(events) if e["type"] == "content_block_stop")
    assert events[stop_at - 1]["delta"] == {"type": "signature_delta", "signature": THINKING_SIGNATURE}


def test_mlx_reasoning_chunks() -> None:
    message = accumulate(run([mlx_chunk(reasoning="hmm"), mlx_chunk("ok"), mlx_chunk(finish="stop")]))
    assert [b["type"] for b in message["content"]] == ["thinking", "text"]


def test_text_then_tool_then_text_opens_new_blocks() -> None:
    chunks = [
        mlx_chunk("a"),
        mlx_chunk(tool_calls=[mlx_call("Read", "{}")]),
        mlx_chunk("b"),
        mlx_chunk(finish="tool_calls"),
    ]
    message = accumulate(run(chunks))
    assert [b["type"] for b in message["content"]] == ["text", "tool_use", "text"]


@pytest.mark.parametrize(
    ("finish", "stop_reason"),
    [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("tool_calls", "end_turn"),
        ("content_filter", "refusal"),
        (None, "end_turn"),
    ],
)
def test_finish_reasons(finish: str | None, stop_reason: str) -> None:
    chunks = [mlx_chunk("x")] + ([mlx_chunk(finish=finish)] if finish else [])
    assert accumulate(run(chunks))["stop_reason"] == stop_reason


def test_length_with_a_tool_call_is_max_tokens() -> None:
    chunks = [mlx_chunk(tool_calls=[mlx_call("Read", "{}")]), mlx_chunk(finish="length")]
    assert accumulate(run(chunks))["stop_reason"] == "max_tokens"


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([vllm_chunk({"content": "hi"}), vllm_chunk({}, finish="stop", stop_reason="###")], "###"),
        ([vllm_chunk({"content": "hi #"}), vllm_chunk({"content": "##"}), vllm_chunk({}, finish="stop")], "###"),
        ([mlx_chunk("hi"), mlx_chunk(finish="stop")], None),  # mlx cut the match: indistinguishable from EOS
    ],
    ids=["vllm-stop-reason", "kept-in-text", "mlx"],
)
def test_stop_sequence(chunks: list[dict[str, Any]], expected: str | None) -> None:
    message = accumulate(run(chunks, stop_sequences=("###",)))
    assert message["stop_sequence"] == expected
    assert message["stop_reason"] == ("stop_sequence" if expected else "end_turn")


def test_usage_chunk_with_empty_choices_and_properties() -> None:
    tr = StreamTranslator(model="m", message_id="msg_1")
    tr.start()
    assert not tr.started_content and not tr.finished
    assert tr.feed(decode_chunk(json.dumps(mlx_chunk("")))) == []  # mlx's empty first chunk shows nothing
    assert not tr.started_content
    tr.feed(decode_chunk(json.dumps(mlx_chunk("hi"))))
    assert tr.started_content and not tr.finished
    tr.feed(decode_chunk(json.dumps(mlx_chunk(finish="stop"))))
    assert tr.finished
    assert tr.feed(decode_chunk(json.dumps(usage_chunk(prompt=500, completion=3, cached=450)))) == []
    assert (tr.prompt_tokens, tr.cached_tokens, tr.output_tokens) == (500, 450, 3)
    delta = next(e for e in tr.finish() if isinstance(e, MessageDeltaEvent))
    assert json.loads(msgspec.json.encode(delta))["usage"] == {
        "input_tokens": 50,
        "output_tokens": 3,
        "cache_read_input_tokens": 450,
        "cache_creation_input_tokens": 0,
    }
    assert tr.finish() == []  # a second finish adds nothing


def test_output_tokens_counted_when_the_node_reports_no_usage() -> None:
    message = accumulate(run([mlx_chunk("a"), mlx_chunk("b"), mlx_chunk("c"), mlx_chunk(finish="stop")]))
    assert message["usage"]["output_tokens"] == 3
    assert message["usage"]["input_tokens"] == 0


def test_reasoning_counts_as_started_content() -> None:
    tr = StreamTranslator(model="m", message_id="msg_1")
    tr.feed(decode_chunk(json.dumps(vllm_chunk({"reasoning_content": "x"}))))
    assert tr.started_content


def test_fail_ends_with_an_error_event_only() -> None:
    tr = StreamTranslator(model="m", message_id="msg_1")
    tr.start()
    tr.feed(decode_chunk(json.dumps(mlx_chunk("partial"))))
    events = [json.loads(msgspec.json.encode(e)) for e in tr.fail("overloaded_error", "node mac1 went away")]
    assert events == [{"type": "error", "error": {"type": "overloaded_error", "message": "node mac1 went away"}}]


def test_through_sse_like_the_relay() -> None:
    """Encoded, decoded by the client: every event name matches its JSON type; the text survives."""
    tr = StreamTranslator(model="m", message_id="msg_1")
    events = tr.start()
    for chunk in [mlx_chunk("Grüße "), mlx_chunk("🎉"), mlx_chunk(tool_calls=[mlx_call("Read", '{"p": "ä"}')])]:
        events += tr.feed(decode_chunk(json.dumps(chunk).encode()))
    events += tr.finish()
    wire = b"".join(encode_event(e) for e in events)
    decoder = SSEDecoder()
    messages = [m for i in range(0, len(wire), 7) for m in decoder.feed(wire[i : i + 7])] + decoder.flush()
    parsed = [json.loads(m.data or "") for m in messages]
    assert [m.event for m in messages] == [p["type"] for p in parsed]
    message = accumulate(parsed)
    assert message["content"][0]["text"] == "Grüße 🎉"
    assert message["content"][1]["input"] == {"p": "ä"}


@pytest.mark.parametrize("data", ["<html>", "[1]", '{"choices": 5}', b"\xff"])
def test_garbage_chunks_raise_value_error(data: str | bytes) -> None:
    with pytest.raises(ValueError):
        decode_chunk(data)
