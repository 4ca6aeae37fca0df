"""OpenAI chat/text completion responses shaped the way mlx_lm.server shapes them (pure: no I/O).

What a client of mlx_lm.server sees, and this reproduces:

- every chunk is `data: {json}\\n\\n`: id `chatcmpl-<uuid>` (`cmpl-<uuid>` for text), `system_fingerprint`,
  `object` `chat.completion.chunk` (`text_completion`), `model` as requested (`default_model` when the
  request named none), `created`, and one choice `{index, finish_reason, delta}`; the delta always carries
  `role`, `content`, `reasoning` and `tool_calls` (empty string / list when unused);
- one chunk per generated token that shows something; tool calls arrive whole, with an `index`, in one
  chunk; then a last chunk with the finish reason and empty text;
- with `stream_options.include_usage`, a usage chunk with `choices: []` (its `object` is
  `chat.completion`), `usage.prompt_tokens_details.cached_tokens`; then `data: [DONE]`;
- during prefill, SSE comments `: keepalive N/M`;
- non-streaming: one `chat.completion` (`text_completion`) object with `usage`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgspec

from proxy.sim.engine import Finished, Keepalive, Started
from proxy.sim.script import Piece

SYSTEM_FINGERPRINT = "0.0.0-sim"
DONE = b"data: [DONE]\n\n"
GARBAGE = b"data: <sim garbage> this line is not JSON {\n\n"

_encode = msgspec.json.encode


def sse(data: Any) -> bytes:
    return b"data: " + _encode(data) + b"\n\n"


def usage(f: Finished) -> dict[str, Any]:
    return {
        "prompt_tokens": f.prompt_tokens,
        "completion_tokens": f.completion_tokens,
        "total_tokens": f.prompt_tokens + f.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": f.cached_tokens},
    }


class ChatResponder:
    """Turns generation events into mlx_lm.server's chat (or text) completion stream or body."""

    def __init__(self, *, model: str, stream: bool, text: bool = False, stream_options: Any = None) -> None:
        self.model = model
        self.stream = stream
        self.text = text
        self.stream_options = stream_options
        self.id = f"{'cmpl' if text else 'chatcmpl'}-{uuid.uuid4()}"
        self.created = int(time.time())
        self.object = "text_completion" if text else ("chat.completion.chunk" if stream else "chat.completion")
        self._content: list[str] = []
        self._reasoning: list[str] = []
        self._tool_calls: list[dict[str, Any]] = []

    def started(self, ev: Started) -> list[bytes]:
        return []

    def keepalive(self, ev: Keepalive) -> bytes:
        return f": keepalive {ev.processed}/{ev.total}\n\n".encode()

    def _response(self, finish_reason: str | None, content: str, reasoning: str, calls: list[Any]) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason}
        if self.text:
            choice["text"] = content
        elif self.stream:
            delta: dict[str, Any] = {"role": "assistant"}
            if content:
                delta["content"] = content
            if reasoning:
                delta["reasoning"] = reasoning
            if calls:
                delta["tool_calls"] = calls
            choice["delta"] = delta
        else:
            message: dict[str, Any] = {"role": "assistant", "content": content or None}
            if reasoning:
                message["reasoning"] = reasoning
            if calls:
                message["tool_calls"] = calls
            choice["message"] = message
        return {
            "id": self.id,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "object": self.object,
            "model": self.model,
            "created": self.created,
            "choices": [choice],
        }

    def piece(self, p: Piece) -> list[bytes]:
        """The SSE chunks for one generated token (streaming), or nothing while accumulating."""
        call: dict[str, Any] | None = None
        if p.tool_call is not None:
            call = {
                "function": {"name": p.tool_call.name, "arguments": p.tool_call.arguments},
                "type": "function",
                "id": str(uuid.uuid4()),
            }
            if self.stream:
                call["index"] = len(self._tool_calls)
            self._tool_calls.append(call)
        elif p.kind == "content":
            self._content.append(p.text)
        elif p.kind == "reasoning":
            self._reasoning.append(p.text)
        if not self.stream or not (p.text or call):
            return []
        if call is not None:
            return [sse(self._response(None, "", "", [call]))]
        if p.kind == "reasoning":
            return [sse(self._response(None, "", p.text, []))]
        return [sse(self._response(None, p.text, "", []))]

    def finished(self, f: Finished) -> list[bytes]:
        """The stream's tail: last chunk, usage chunk when asked for, `[DONE]`.

        Like mlx, `stream_options` without `include_usage` fails after the last chunk: the stream ends
        there, without `[DONE]` (the caller sees a list that does not end with DONE).
        """
        out = [sse(self._response(f.finish_reason, "", "", []))]
        opts = self.stream_options
        if opts is not None:
            if not isinstance(opts, dict) or "include_usage" not in opts:
                return out  # mlx raises here (KeyError / TypeError): no usage, no [DONE]
            if opts["include_usage"]:
                out.append(
                    sse(
                        {
                            "id": self.id,
                            "system_fingerprint": SYSTEM_FINGERPRINT,
                            "object": "chat.completion",
                            "model": self.model,
                            "created": self.created,
                            "choices": [],
                            "usage": usage(f),
                        }
                    )
                )
        out.append(DONE)
        return out

    def body(self, f: Finished) -> bytes:
        """The whole non-streaming response."""
        response = self._response(f.finish_reason, "".join(self._content), "".join(self._reasoning), self._tool_calls)
        response["usage"] = usage(f)
        return _encode(response)

    def garbage(self) -> bytes:
        return GARBAGE if self.stream else b"<html><body>sim garbage: not JSON</body></html>"
