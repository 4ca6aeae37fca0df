"""Streaming translation: OpenAI chat-completion chunks in, Anthropic stream events out.

    tr = StreamTranslator(model=..., message_id=...)
    send(tr.start())                  # message_start, before the node says anything
    for chunk in node_chunks:
        send(tr.feed(chunk))          # content_block_start / _delta / _stop, as the node speaks
    send(tr.finish())                 # only when the node ended properly: message_delta, message_stop
    # or, when the node broke off:  send(tr.fail("overloaded_error", "…"))

Blocks open in the order the node speaks: reasoning (`delta.reasoning`, `delta.reasoning_content`)
as a thinking block, content as a text block, each new tool-call index as a tool_use block whose
arguments stream as `input_json_delta`. Tool calls arrive whole in one chunk (mlx_lm.server) or as
pieces keyed by `index` (vLLM, llama.cpp); both give exactly one tool_use block per call. Arguments
for an earlier call that arrive after a later block opened (no known server does this) are still sent,
tagged with that call's own block index, rather than dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from proxy.answers import (
    THINKING_SIGNATURE,
    matched_stop_sequence,
    new_tool_use_id,
    stop_reason_for,
    usage_from,
)
from proxy.wire.anthropic import (
    APIError,
    ContentBlockDeltaEvent,
    ContentBlockStartEvent,
    ContentBlockStopEvent,
    ErrorEvent,
    InputJSONDelta,
    MessageDelta,
    MessageDeltaEvent,
    MessagesResponse,
    MessageStartEvent,
    MessageStopEvent,
    SignatureDelta,
    StreamEvent,
    TextBlock,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    ToolUseBlock,
    Usage,
)
from proxy.wire.openai import ChatCompletionChunk, ChoiceDeltaToolCall, CompletionUsage

_encode = msgspec.json.Encoder().encode
_EMPTY_INPUT = msgspec.Raw(b"{}")


class StreamTranslator:
    """Turns one node stream into one Anthropic message stream (feed/finish, like httpx's LineDecoder)."""

    def __init__(self, *, model: str, message_id: str, stop_sequences: Sequence[str] = ()) -> None:
        self.model = model
        self.message_id = message_id
        self._stops = tuple(s for s in stop_sequences if s)
        self._tail_size = max((len(s) for s in self._stops), default=0)
        self._tail = ""  # the end of the text so far, to spot a stop sequence the node kept
        self._blocks = 0  # blocks opened so far; the open one (if any) is the last
        self._open: str | None = None  # type of the open block
        self._tools: dict[int, int] = {}  # node tool-call index → our block index
        self._last_tool: int | None = None
        self._finish_reason: str | None = None
        self._node_stop_reason: str | int | None = None
        self._usage: CompletionUsage | None = None
        self._content_chunks = 0  # stands in for output_tokens if the node never reports usage
        self._ended = False

    # -- what the relay needs to know ------------------------------------------------------

    @property
    def finished(self) -> bool:
        """The node sent a finish_reason."""
        return self._finish_reason is not None

    @property
    def started_content(self) -> bool:
        """A content block went out: retrying on another node would now duplicate content."""
        return self._blocks > 0

    @property
    def prompt_tokens(self) -> int:
        return (self._usage.prompt_tokens or 0) if self._usage is not None else 0

    @property
    def cached_tokens(self) -> int:
        return usage_from(self._usage).cache_read_input_tokens

    @property
    def output_tokens(self) -> int:
        return usage_from(self._usage, self._content_chunks).output_tokens

    # -- events ----------------------------------------------------------------------------

    def start(self) -> list[StreamEvent]:
        """`message_start` with zero usage (sent before the node has counted anything)."""
        message = MessagesResponse(id=self.message_id, model=self.model, content=[], usage=Usage())
        return [MessageStartEvent(message)]

    def feed(self, chunk: ChatCompletionChunk) -> list[StreamEvent]:
        events: list[StreamEvent] = []
        if chunk.usage is not None:
            self._usage = chunk.usage
        if not chunk.choices:
            return events
        choice = chunk.choices[0]
        delta = choice.delta
        if delta is not None:
            reasoning = delta.reasoning or delta.reasoning_content
            if reasoning:
                if self._open != "thinking":
                    self._open_block(events, "thinking", ThinkingBlock("", ""))
                events.append(ContentBlockDeltaEvent(self._blocks - 1, ThinkingDelta(reasoning)))
            if delta.content:
                if self._open != "text":
                    self._open_block(events, "text", TextBlock(""))
                events.append(ContentBlockDeltaEvent(self._blocks - 1, TextDelta(delta.content)))
                if self._tail_size:
                    self._tail = (self._tail + delta.content)[-self._tail_size :]
            if delta.tool_calls:
                for call in delta.tool_calls:
                    self._tool_call(call, events)
            if events:
                self._content_chunks += 1
        if choice.finish_reason:
            self._finish_reason = choice.finish_reason
        if choice.stop_reason is not None:
            self._node_stop_reason = choice.stop_reason
        return events

    def finish(self) -> list[StreamEvent]:
        """Close the open block, then `message_delta` (stop reason, usage) and `message_stop`."""
        if self._ended:
            return []
        self._ended = True
        events: list[StreamEvent] = []
        self._close_block(events)
        stop_sequence = None
        if self._finish_reason in ("stop", None):
            stop_sequence = matched_stop_sequence(self._node_stop_reason, self._tail, self._stops)
        stop_reason = stop_reason_for(self._finish_reason, tool_calls=bool(self._tools), stop_sequence=stop_sequence)
        usage = usage_from(self._usage, self._content_chunks)
        events.append(MessageDeltaEvent(MessageDelta(stop_reason, stop_sequence), usage))
        events.append(MessageStopEvent())
        return events

    def fail(self, error_type: str, message: str) -> list[StreamEvent]:
        """The `error` event that ends a broken stream (no stop reason is made up, no message_stop)."""
        self._ended = True
        return [ErrorEvent(APIError(error_type, message))]

    # -- blocks ----------------------------------------------------------------------------

    def _open_block(self, events: list[StreamEvent], kind: str, block: TextBlock | ThinkingBlock | ToolUseBlock) -> int:
        self._close_block(events)
        index = self._blocks
        self._blocks += 1
        self._open = kind
        events.append(ContentBlockStartEvent(index, block))
        return index

    def _close_block(self, events: list[StreamEvent]) -> None:
        if self._open is None:
            return
        index = self._blocks - 1
        if self._open == "thinking":
            # Claude Code drops a thinking block that was never signed.
            events.append(ContentBlockDeltaEvent(index, SignatureDelta(THINKING_SIGNATURE)))
        events.append(ContentBlockStopEvent(index))
        self._open = None

    def _tool_call(self, call: ChoiceDeltaToolCall, events: list[StreamEvent]) -> None:
        function = call.function
        name = function.name if function is not None else None
        arguments = function.arguments if function is not None else None
        if isinstance(arguments, dict):
            arguments = _encode(arguments).decode()
        index = call.index
        if index is None:
            # Not every server numbers its calls: a piece with neither id nor name continues the last call.
            if self._last_tool is not None and not call.id and not name:
                index = self._last_tool
            else:
                index = max(self._tools, default=-1) + 1
        block = self._tools.get(index)
        if block is None:
            block = self._open_block(events, "tool_use", ToolUseBlock(new_tool_use_id(), name or "", _EMPTY_INPUT))
            self._tools[index] = block
        self._last_tool = index
        if arguments:
            events.append(ContentBlockDeltaEvent(block, InputJSONDelta(arguments)))
