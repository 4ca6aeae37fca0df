"""The simulated node's tokenizer and chat template (pure: no I/O).

A token is a 4-byte cell. Text is encoded as UTF-8 and cut into cells, the last one padded with NUL
bytes; special markers (start/end of a message, think, tool call) are one cell each, starting with 0xFF,
a byte UTF-8 never produces. So a rendered prompt is plain `bytes`, its token count is `len // 4`, and
prefix caching compares bytes.

The template is deterministic and shaped like a real one (Qwen-style): a system block holding the tools'
JSON first, then the leading system message; then every message between role markers; then the
generation prompt. A text reply the node generates (`generated_cells`) is byte-identical to how the next
request renders that assistant message, so turn N+1's prompt starts with turn N's prompt plus the node's
reply, which is what makes mlx_lm.server's prompt cache pay off across turns.

Two things re-render differently, as on the real server with Qwen3-Coder's template:

- an assistant message with text *and* tool calls: the template puts a separator (`TOOL_SEP`, Qwen's extra
  newline) between the text and the first call, which the model did not generate. The next prompt then
  leaves the previous entry just after the reply's text: that entry is not a prefix of the new one and stays
  in the cache (a tool-using conversation holds an extra, dead entry per such turn until the LRU drops it);
- reasoning from earlier turns is not rendered back (Qwen3), so a reasoning reply is only cached up to its
  prompt.

`prompt_segments` cuts a prompt the way mlx_lm.server does before prefill (system part, the rest), which
decides where it saves checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import msgspec

from proxy.sim.cache import TOKEN_BYTES, EntryKind, common_prefix_tokens, token_count

IM_START = b"\xffIMS"
IM_END = b"\xffIME"
THINK_START = b"\xffTHS"
THINK_END = b"\xffTHE"
TOOL_START = b"\xffTCS"
TOOL_END = b"\xffTCE"
# What the template writes between an assistant message's text and its first tool call (the model does not).
TOOL_SEP = b"\n\0\0\0"

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


def render_prompt(conv: Conversation, *, add_generation_prompt: bool = True) -> bytes:
    """Render a conversation into prompt token cells, ending with the generation prompt unless told not to."""
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
        if m.tool_calls and m.content:
            out.append(TOOL_SEP)
        out += [tool_call_cells(c) for c in m.tool_calls]
        out += [IM_END, text_cells("\n")]
    if add_generation_prompt:
        out += [IM_START, text_cells("assistant\n")]
    return b"".join(out)


Segment = tuple[EntryKind, int]


def prompt_segments(conv: Conversation | None, prompt: bytes) -> list[Segment]:
    """How mlx_lm.server cuts a prompt for prefill: (kind, end token) per segment, ends increasing.

    A chat prompt whose last message is a user message is cut where the leading system messages end (found,
    as mlx does, by rendering them with an empty user message and comparing; no cut when that render is a
    prefix of the prompt) into a "system" and a "user" segment; any other prompt (a tool result last, a text
    completion) is one "assistant" segment. The node saves a checkpoint of the cache at the end of every
    segment but the last token of the prompt (see `proxy.sim.engine`).
    """
    n = token_count(prompt)
    if conv is None or not conv.messages or conv.messages[-1].role != "user":
        return [("assistant", n)]
    messages = conv.messages
    leading = 0
    while leading < len(messages) and messages[leading].role == "system":
        leading += 1
    segments: list[Segment] = []
    sys_end = 0
    if leading:
        head = Conversation(conv.tools, conv.tool_names, (*messages[:leading], Message("user", "")))
        rendered = render_prompt(head, add_generation_prompt=False)
        common = common_prefix_tokens(rendered, prompt)
        sys_end = common if common < min(token_count(rendered), n) else 0
        if 0 < sys_end < n:
            segments.append(("system", sys_end))
    if sys_end < n:
        segments.append(("user", n))
    return segments


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
    if not body["messages"]:
        raise TemplateError("Cannot apply chat template to an empty conversation. Provide at least one message.")
    for m in body["messages"]:
        if not isinstance(m, dict):
            raise TemplateError("each message must be an object")
        role = str(m.get("role", ""))
        messages.append(Message(role, content_text(m.get("content")), _tool_calls(m.get("tool_calls"))))
    tools, names = _tool_defs(body.get("tools"))
    return Conversation(tools, names, tuple(messages))


# name in the message, body key, expected types, minimum, maximum, whitelist: mlx_lm.server's checks, in its order.
_PARAMETERS: tuple[tuple[str, str, tuple[type, ...], float | None, float | None, tuple[Any, ...]], ...] = (
    ("stream", "stream", (bool,), None, None, ()),
    ("max_tokens", "", (int,), 1, None, ()),
    ("temperature", "temperature", (float, int), 0, None, ()),
    ("top_p", "top_p", (float, int), 0, 1, ()),
    ("top_k", "top_k", (int,), 0, None, ()),
    ("min_p", "min_p", (float, int), 0, 1, ()),
    ("num_draft_tokens", "num_draft_tokens", (int,), 0, None, ()),
    ("repetition_penalty", "repetition_penalty", (float, int), 0, None, ()),
    ("repetition_context_size", "repetition_context_size", (int,), 0, None, ()),
    ("presence_penalty", "presence_penalty", (float, int), None, None, ()),
    ("presence_context_size", "presence_context_size", (int,), 0, None, ()),
    ("frequency_penalty", "frequency_penalty", (float, int), None, None, ()),
    ("frequency_context_size", "frequency_context_size", (int,), 0, None, ()),
    ("logprobs", "logprobs", (bool,), None, None, ()),
    ("top_logprobs", "top_logprobs", (int,), 0, 11, (-1,)),
    ("xtc_probability", "xtc_probability", (float,), 0, 1, ()),
    ("xtc_threshold", "xtc_threshold", (float,), 0, 1, ()),
    ("requested_model", "model", (str,), None, None, ()),
)
_OPTIONAL: tuple[tuple[str, str, type], ...] = (("adapter", "adapters", str), ("seed", "seed", int))


def _type_names(types: tuple[type, ...]) -> str:
    return types[0].__name__ if len(types) == 1 else str(tuple(t.__name__ for t in types))


def _check_parameter(
    name: str, value: Any, types: tuple[type, ...], lo: float | None, hi: float | None, allowed: tuple[Any, ...]
) -> str | None:
    # Python's isinstance: a bool passes as an int, as it does in mlx_lm.server.
    number: Any = value
    if not isinstance(value, types):
        return f"{name} must be of type {_type_names(types)}"
    if number in allowed:
        return None
    if lo is not None and number < lo:
        return f"{name} must be at least {lo}"
    if hi is not None and number > hi:
        return f"{name} must be at most {hi}"
    return None


def bad_request(body: Any, *, chat: bool) -> str | None:
    """Why mlx_lm.server answers 400 `{"error": ...}` to this body, or None when it passes.

    Its checks, in its order: the body is an object; each sampling parameter that is sent has the right type
    and range (`max_tokens`, that is `max_completion_tokens` or else `max_tokens`, at least 1; `xtc_*` must be
    floats; a bool passes as an int); then `messages` (chat) or `prompt` (text) is present, and `messages` is
    a list of objects. Failures it finds later (an empty `messages`, a bad template, an unknown model) are 404s.
    """
    if not isinstance(body, dict):
        return "Request should be a JSON dictionary"
    for name, key, types, lo, hi, allowed in _PARAMETERS:
        if key == "":
            value = body.get("max_completion_tokens")
            if value is None:
                value = body.get("max_tokens", 512)
        elif key in body:
            value = body[key]
        else:
            continue
        if (problem := _check_parameter(name, value, types, lo, hi, allowed)) is not None:
            return problem
    for name, key, kind in _OPTIONAL:
        if body.get(key) is not None and not isinstance(body[key], kind):
            return f"{name} must be of type {kind.__name__}"
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            return "logit_bias must be of type dict"
        try:
            [(int(k), float(v)) for k, v in bias.items()]
        except (TypeError, ValueError):
            return "logit_bias must be a dict of int to float"
    if not chat:
        return None if "prompt" in body else "Request did not contain a prompt"
    if "messages" not in body:
        return "Request did not contain messages"
    messages = body["messages"]
    if isinstance(messages, str | dict) and messages:
        return "'str' object has no attribute 'get'"
    if isinstance(messages, str | dict):
        return None
    if not isinstance(messages, list):
        return f"'{type(messages).__name__}' object is not iterable"
    for m in messages:
        if not isinstance(m, dict):
            return f"'{type(m).__name__}' object has no attribute 'get'"
    return None


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
