"""OpenAI chat completion answers → Anthropic Messages answers (non-streaming), and the pieces the
stream translator shares: stop reasons, usage, tool-call inputs and ids. Pure functions."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import msgspec
from msgspec import Raw

from proxy.wire.anthropic import (
    MessagesResponse,
    ResponseBlock,
    StopReason,
    TextBlock,
    ThinkingBlock,
    ToolUseBlock,
    Usage,
)
from proxy.wire.openai import (
    ChatCompletion,
    CompletionUsage,
)

# Claude Code discards a streamed thinking block that never got a signature; nodes cannot sign, and
# nothing verifies it (thinking blocks are dropped when translating the next turn), so a constant does.
THINKING_SIGNATURE = "mlxmux-unsigned"

_encode = msgspec.json.Encoder().encode
_EMPTY_OBJECT = Raw(b"{}")


def new_tool_use_id() -> str:
    """A fresh Anthropic tool-use id, whatever id the node gave its call (see proxy.translate)."""
    return "toolu_" + secrets.token_hex(12)


def stop_reason_for(finish_reason: str | None, *, tool_calls: bool, stop_sequence: str | None) -> StopReason:
    """length → max_tokens; any tool call → tool_use; a matched stop sequence → stop_sequence;
    content_filter → refusal; everything else (stop, None, server-specific values) → end_turn.

    `finish_reason: "tool_calls"` with no tool call actually parsed is end_turn: a tool_use stop with
    no tool_use block would leave Claude Code waiting for a tool it was never given.
    """
    if finish_reason == "length":
        return "max_tokens"
    if tool_calls:
        return "tool_use"
    if stop_sequence is not None:
        return "stop_sequence"
    if finish_reason == "content_filter":
        return "refusal"
    return "end_turn"


def matched_stop_sequence(node_stop_reason: str | int | None, text: str, stop_sequences: Sequence[str]) -> str | None:
    """Which of `stop_sequences` ended generation, when that can be known.

    vLLM names the matched string in `choices[].stop_reason`; servers that keep the stop string in
    the output show it at the end of the text. mlx_lm.server (and llama.cpp) cut the matched text
    and report a plain `stop`, exactly as for end-of-sequence, so there it reads as end_turn.
    """
    if not stop_sequences:
        return None
    if isinstance(node_stop_reason, str) and node_stop_reason in stop_sequences:
        return node_stop_reason
    for stop in stop_sequences:
        if stop and text.endswith(stop):
            return stop
    return None


def usage_from(usage: CompletionUsage | None, output_tokens: int = 0) -> Usage:
    """input_tokens = prompt − cached, cache_read_input_tokens = cached, output_tokens = completion."""
    if usage is None:
        return Usage(output_tokens=output_tokens)
    prompt = usage.prompt_tokens or 0
    details = usage.prompt_tokens_details
    cached = min(prompt, details.cached_tokens or 0) if details is not None else 0
    completion = usage.completion_tokens if usage.completion_tokens is not None else output_tokens
    return Usage(input_tokens=prompt - cached, output_tokens=completion, cache_read_input_tokens=cached)


def tool_input(arguments: str | dict[str, Any] | None) -> Raw:
    """A tool call's arguments as the tool_use `input` object.

    Empty arguments are `{}`. Arguments that are not a JSON object are kept as `{"_raw": "<text>"}`
    so Claude Code's input validation reports the problem to the model with its own text in view.
    """
    if arguments is None:
        return _EMPTY_OBJECT
    if isinstance(arguments, dict):
        return Raw(_encode(arguments))
    if not arguments.strip():
        return _EMPTY_OBJECT
    try:
        value = msgspec.json.decode(arguments)
    except msgspec.DecodeError:
        value = None
    if isinstance(value, dict):
        return Raw(arguments.encode())
    return Raw(_encode({"_raw": arguments}))


def from_chat_completion(
    resp: ChatCompletion, *, model: str, message_id: str, stop_sequences: Sequence[str] = ()
) -> MessagesResponse:
    """A non-streaming node answer as a Messages response: thinking first, then text, then tool_use."""
    choice = resp.choices[0] if resp.choices else None
    message = choice.message if choice is not None else None
    finish_reason = choice.finish_reason if choice is not None else None
    content: list[ResponseBlock] = []
    stop_sequence = None
    calls = []
    if message is not None:
        reasoning = message.reasoning or message.reasoning_content
        if reasoning:
            content.append(ThinkingBlock(reasoning, THINKING_SIGNATURE))
        text = message.content or ""
        if finish_reason in ("stop", None):
            stop_sequence = matched_stop_sequence(choice.stop_reason if choice else None, text, stop_sequences)
            if stop_sequence is not None and text.endswith(stop_sequence):
                text = text[: -len(stop_sequence)]
        if text:
            content.append(TextBlock(text))
        calls = message.tool_calls or []
        for call in calls:
            function = call.function
            name = (function.name if function is not None else None) or ""
            arguments = function.arguments if function is not None else None
            content.append(ToolUseBlock(new_tool_use_id(), name, tool_input(arguments)))
    return MessagesResponse(
        id=message_id,
        model=model,
        content=content,
        stop_reason=stop_reason_for(finish_reason, tool_calls=bool(calls), stop_sequence=stop_sequence),
        stop_sequence=stop_sequence,
        usage=usage_from(resp.usage),
    )
