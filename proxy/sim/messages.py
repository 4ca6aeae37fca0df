"""Native Anthropic Messages API for the simulated node (`--anthropic`), as llama.cpp/vLLM/LM Studio offer.

Requests are rendered with the same template and cache as chat completions (tools converted to the
OpenAI function shape first, so a gateway's translated request and the native one render alike).
Streams follow the Messages API: `message_start` (usage with `cache_read_input_tokens`), `ping` during
prefill, per block `content_block_start` / `content_block_delta` / `content_block_stop` (thinking,
text, tool_use with one `input_json_delta`), `message_delta`, `message_stop`.
"""

from __future__ import annotations

import uuid
from typing import Any

import msgspec

from proxy.sim.engine import Finished, Keepalive, Started
from proxy.sim.model import Conversation, Message, TemplateError, ToolCall, canonical_json
from proxy.sim.script import Piece

_encode = msgspec.json.encode

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_body(status: int, message: str) -> bytes:
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    return _encode({"type": "error", "error": {"type": kind, "message": message}})


def _text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(b.get("text", "")) for b in content if isinstance(b, dict) and b.get("type") == "text")
    raise TemplateError("content must be a string or a list of blocks")


def messages_conversation(body: dict[str, Any]) -> Conversation:
    """Parse an Anthropic Messages request into the node's Conversation."""
    out: list[Message] = []
    system = body.get("system")
    if system:
        out.append(Message("system", _text(system)))
    raw_messages = body.get("messages")
    if not isinstance(raw_messages, list):
        raise TemplateError("messages: field required")
    for m in raw_messages:
        if not isinstance(m, dict):
            raise TemplateError("each message must be an object")
        role = str(m.get("role", ""))
        content = m.get("content")
        if not isinstance(content, list):
            out.append(Message(role, _text(content)))
            continue
        texts: list[str] = []
        calls: list[ToolCall] = []
        for block in content:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "tool_result":
                result = _text(block.get("content"))
                out.append(Message("tool", f"[error] {result}" if block.get("is_error") else result))
            elif kind == "tool_use":
                calls.append(ToolCall(str(block.get("name", "")), canonical_json(block.get("input") or {})))
            elif kind == "text":
                texts.append(str(block.get("text", "")))
        if texts or calls or role != "user":
            out.append(Message(role, "".join(texts), tuple(calls)))
    tools: list[dict[str, Any]] = []
    names: list[str] = []
    for t in body.get("tools") or []:
        if isinstance(t, dict) and "name" in t:
            fn = {"name": t["name"], "description": t.get("description"), "parameters": t.get("input_schema")}
            tools.append({"type": "function", "function": fn})
            names.append(str(t["name"]))
    return Conversation(tuple(canonical_json(t) for t in tools), tuple(names), tuple(out))


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _encode(data) + b"\n\n"


class MessagesResponder:
    """Turns generation events into an Anthropic Messages stream or body."""

    def __init__(self, *, model: str, stream: bool) -> None:
        self.model = model
        self.stream = stream
        self.id = f"msg_{uuid.uuid4().hex[:24]}"
        self._blocks: list[dict[str, Any]] = []
        self._open: str | None = None  # kind of the open streaming block
        self._started: Started | None = None

    def _usage(self, prompt: int, cached: int, output: int) -> dict[str, int]:
        return {
            "input_tokens": prompt - cached,
            "output_tokens": output,
            "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": 0,
        }

    def started(self, ev: Started) -> list[bytes]:
        self._started = ev
        message: dict[str, Any] = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": self._usage(ev.prompt_tokens, ev.cached_tokens, 0),
        }
        return [_event("message_start", {"type": "message_start", "message": message})]

    def keepalive(self, ev: Keepalive) -> bytes:
        return _event("ping", {"type": "ping"})

    def _close_block(self) -> list[bytes]:
        if self._open is None:
            return []
        out = []
        index = len(self._blocks) - 1
        if self._open == "thinking":
            delta = {"type": "signature_delta", "signature": "sim"}
            out.append(_event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}))
        out.append(_event("content_block_stop", {"type": "content_block_stop", "index": index}))
        self._open = None
        return out

    def _open_block(self, block: dict[str, Any]) -> list[bytes]:
        out = self._close_block()
        self._blocks.append(block)
        self._open = block["type"]
        start = dict(block, input={}) if block["type"] == "tool_use" else dict(block, **_EMPTY[block["type"]])
        index = len(self._blocks) - 1
        out.append(
            _event("content_block_start", {"type": "content_block_start", "index": index, "content_block": start})
        )
        return out

    def piece(self, p: Piece) -> list[bytes]:
        out: list[bytes] = []
        if p.tool_call is not None:
            block = {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": p.tool_call.name}
            block["input"] = msgspec.json.decode(p.tool_call.arguments)
            out += self._open_block(block)
            delta = {"type": "input_json_delta", "partial_json": p.tool_call.arguments}
            out.append(_delta(len(self._blocks) - 1, delta))
            out += self._close_block()
        elif p.text and p.kind in ("content", "reasoning"):
            kind = "text" if p.kind == "content" else "thinking"
            if self._open != kind:
                out += self._open_block(
                    {"type": kind, kind: "", **({"signature": "sim"} if kind == "thinking" else {})}
                )
            self._blocks[-1][kind] += p.text
            delta = (
                {"type": "text_delta", "text": p.text}
                if kind == "text"
                else {"type": "thinking_delta", "thinking": p.text}
            )
            out.append(_delta(len(self._blocks) - 1, delta))
        return out if self.stream else []

    def finished(self, f: Finished) -> list[bytes]:
        out = self._close_block()
        delta = {"stop_reason": _stop_reason(f), "stop_sequence": f.stop_sequence}
        usage = self._usage(f.prompt_tokens, f.cached_tokens, f.completion_tokens)
        out.append(_event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage}))
        out.append(_event("message_stop", {"type": "message_stop"}))
        return out

    def body(self, f: Finished) -> bytes:
        return _encode(
            {
                "id": self.id,
                "type": "message",
                "role": "assistant",
                "model": self.model,
                "content": self._blocks,
                "stop_reason": _stop_reason(f),
                "stop_sequence": f.stop_sequence,
                "usage": self._usage(f.prompt_tokens, f.cached_tokens, f.completion_tokens),
            }
        )

    def garbage(self) -> bytes:
        return b"event: message_start\ndata: <sim garbage> not JSON {\n\n" if self.stream else b"<sim garbage>"


_EMPTY: dict[str, dict[str, str]] = {"text": {"text": ""}, "thinking": {"thinking": "", "signature": ""}}


def _delta(index: int, delta: dict[str, Any]) -> bytes:
    return _event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})


def _stop_reason(f: Finished) -> str:
    if f.stop_sequence is not None:
        return "stop_sequence"
    return STOP_REASONS.get(f.finish_reason, "end_turn")
