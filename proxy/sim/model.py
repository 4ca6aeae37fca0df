"""The simulated node's tokenizer and chat template (pure: no I/O).

A token is a 4-byte cell. Text is encoded as UTF-8 and cut into cells, the last one padded with NUL
bytes; special markers (start/end of a message, think, tool call) are one cell each, starting with 0xFF,
a byte UTF-8 never produces. So a rendered prompt is plain `bytes`, its token count is `len // 4`, and
prefix caching compares bytes.

The template is deterministic and shaped like a real one (Qwen-style): a system block holding the tools'
JSON first, then the leading system message; then every message between role markers; then the
generation prompt. The assistant turn the node generates (`generated_cells`) is byte-identical to how the
next request renders that assistant message, so turn N+1's prompt starts with turn N's prompt plus the
node's reply, exactly what makes mlx_lm.server's prompt cache pay off across turns. As on Qwen3, reasoning
from earlier turns is not rendered back, so a reasoning reply is only cached up to its prompt.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import msgspec

from proxy.sim.cache import TOKEN_BYTES

IM_START = b"\xffIMS"
IM_END = b"\xffIME"
THINK_START = b"\xffTHS"
THINK_END = b"\xffTHE"
TOOL_START = b"\xffTCS"
TOOL_END = b"\xffTCE"

_sorted_json = msgspec.json.Encoder(order="sorted")

SegmentKind = Literal["reasoning", "content", "tool", "marker"]


class ToolCall(msgspec.Struct, frozen=True):
    """A tool call: name and arguments as a canonical (key-sorted) JSON string."""

    name: str
    arguments: str


class Message(msgspec.Struct, frozen=True):
    """One chat message after parsing: content is plain text."""

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()


class Conversation(msgspec.Struct, frozen=True):
    """What the template renders: tool definitions (canonical JSON) and messages."""

    tools: tuple[str, ...]
    tool_names: tuple[str, ...]
    messages: tuple[Message, ...]


class TemplateError(Exception):
    """The request cannot be rendered (mlx_lm.server answers with an HTTP error and `{"error": ...}`)."""


def text_cells(text: str) -> bytes:
    """Encode text into whole 4-byte cells (the last one NUL-padded)."""
    raw = text.encode("utf-8")
    pad = -len(raw) % TOKEN_BYTES
    return raw + b"\0" * pad if pad else raw


def canonical_json(value: Any) -> str:
    """Key-sorted compact JSON, so equal objects always render to equal bytes."""
    return _sorted_json.encode(value).decode("utf-8")


def tool_call_cells(call: ToolCall) -> bytes:
    body = '{"arguments":' + call.arguments + ',"name":' + canonical_json(call.name) + "}"
    return TOOL_START + text_cells(body) + TOOL_END


def render_prompt(conv: Conversation) -> bytes:
    """Render a conversation into prompt token cells, ending with the generation prompt."""
    out: list[bytes] = []
    messages: Sequence[Message] = conv.messages
    system_text: str | None = None
    if messages and messages[0].role == "system":
        system_text = messages[0].content
        messages = messages[1:]
    if conv.tools or system_text is not None:
        out += [IM_START, text_cells("system\n")]
        if conv.tools:
            out.append(text_cells("# Tools\n"))
            out += [text_cells(t + "\n") for t in conv.tools]
        if system_text is not None:
            out.append(text_cells(system_text))
        out += [IM_END, text_cells("\n")]
    for m in messages:
        out += [IM_START, text_cells(m.role + "\n"), text_cells(m.content)]
        out += [tool_call_cells(c) for c in m.tool_calls]
        out += [IM_END, text_cells("\n")]
    out += [IM_START, text_cells("assistant\n")]
    return b"".join(out)


def generated_cells(reasoning: str, content: str, tool_calls: Iterable[ToolCall]) -> list[tuple[SegmentKind, bytes]]:
    """The assistant turn a node generates, as (kind, cells) segments in order.

    kind is "reasoning", "content", "tool" or "marker"; the concatenated cells are what the cache stores
    after the prompt.
    """
    segments: list[tuple[SegmentKind, bytes]] = []
    if reasoning:
        segments += [("marker", THINK_START), ("reasoning", text_cells(reasoning)), ("marker", THINK_END)]
    segments.append(("content", text_cells(content)))
    segments += [("tool", tool_call_cells(c)) for c in tool_calls]
    segments.append(("marker", IM_END))
    return segments


# --- OpenAI chat request -> Conversation -------------------------------------------------------------------


def content_text(content: Any) -> str:
    """Message content as mlx_lm.server reads it: a string, null, or a list of text parts only."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[str] = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise TemplateError("Only 'text' content type is supported.")
            parts.append(str(part.get("text", "")))
        return "".join(parts)
    return str(content)


def _tool_calls(raw: Any) -> tuple[ToolCall, ...]:
    if not raw:
        return ()
    if not isinstance(raw, list):
        raise TemplateError("'tool_calls' must be a list")
    calls: list[ToolCall] = []
    for item in raw:
        fn = item.get("function") if isinstance(item, dict) else None
        if not isinstance(fn, dict):
            raise TemplateError("tool call without 'function'")
        args = fn.get("arguments")
        if not args:
            args_obj: Any = {}
        elif not isinstance(args, str):
            # mlx_lm.server json.loads() the arguments: anything but a string is a TypeError.
            raise TemplateError(f"the JSON object must be str, bytes or bytearray, not {type(args).__name__}")
        else:
            try:
                args_obj = msgspec.json.decode(args)
            except msgspec.DecodeError as exc:
                raise TemplateError(f"invalid tool call arguments: {exc}") from None
        calls.append(ToolCall(str(fn.get("name", "")), canonical_json(args_obj)))
    return tuple(calls)


def _tool_defs(raw: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if not raw or not isinstance(raw, list):
        return (), ()
    names: list[str] = []
    for t in raw:
        fn = t.get("function") if isinstance(t, dict) else None
        names.append(str(fn.get("name", "")) if isinstance(fn, dict) else "")
    return tuple(canonical_json(t) for t in raw), tuple(names)


def chat_conversation(body: dict[str, Any]) -> Conversation:
    """Parse an OpenAI chat completions body (already validated) into a Conversation."""
    messages: list[Message] = []
    for m in body["messages"]:
        if not isinstance(m, dict):
            raise TemplateError("each message must be an object")
        role = str(m.get("role", ""))
        messages.append(Message(role, content_text(m.get("content")), _tool_calls(m.get("tool_calls"))))
    tools, names = _tool_defs(body.get("tools"))
    return Conversation(tools, names, tuple(messages))


def _check(ok: bool, message: str) -> str | None:
    return None if ok else message


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def invalid_parameters(body: Any, *, chat: bool) -> str | None:
    """Why mlx_lm.server would reject this body before answering at all (it then closes the connection).

    Returns None when the body passes. Mirrors its checks: body is an object, `messages`/`prompt` present,
    `stream` a boolean, `max_tokens` a non-negative integer, sampling numbers in range, `model` a string.
    """
    if not isinstance(body, dict):
        return "Request should be dict"
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens", 512)
    top_logprobs = body.get("top_logprobs", -1)
    checks = [
        _check(isinstance(body.get("stream", False), bool), "stream must be a boolean"),
        _check(
            isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens >= 0,
            "max_tokens must be a non-negative integer",
        ),
        _check(_is_num(t := body.get("temperature", 0.0)) and t >= 0, "temperature must be a non-negative float"),
        _check(_is_num(p := body.get("top_p", 1.0)) and 0 <= p <= 1, "top_p must be a float between 0 and 1"),
        _check(_is_num(mp := body.get("min_p", 0.0)) and 0 <= mp <= 1, "min_p must be a float between 0 and 1"),
        _check(isinstance(k := body.get("top_k", 0), int) and k >= 0, "top_k must be a non-negative integer"),
        _check(isinstance(body.get("logprobs", False), bool), "logprobs must be a boolean"),
        _check(top_logprobs == -1 or (_is_num(top_logprobs) and 0 < top_logprobs <= 10), "bad top_logprobs"),
        _check(isinstance(body.get("model", ""), str), "model must be a string"),
        _check(isinstance(body.get("seed", 0), int | None), "seed must be an integer"),
    ]
    if chat:
        checks.append(_check(isinstance(body.get("messages"), list), "Request did not contain messages"))
    else:
        checks.append(_check(isinstance(body.get("prompt"), str), "Request did not contain a prompt"))
    return next((c for c in checks if c is not None), None)


def max_tokens_of(body: dict[str, Any]) -> int:
    """`max_completion_tokens` beats `max_tokens`; 512 when neither is sent."""
    value = body.get("max_completion_tokens")
    if value is None:
        value = body.get("max_tokens", 512)
    return int(value)


def stop_words_of(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop") or []
    if isinstance(stop, str):
        return [stop]
    return [s for s in stop if isinstance(s, str) and s] if isinstance(stop, list) else []
