"""OpenAI chat-completions wire types: the request we send a node and the answers it gives.

Outbound structs omit what is `UNSET` (so a field we do not mean to send never reaches the node);
messages are a tagged union on `role`, content parts on `type`. Inbound structs (responses and
stream chunks) default every field to `None`, because real servers send `null` or leave fields out
in every combination (mlx_lm.server sends `"reasoning": ""` and `"tool_calls": []` on every chunk,
vLLM sends `null`s, llama.cpp adds its own fields).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec
from msgspec import UNSET, Raw, UnsetType

# -- request -----------------------------------------------------------------------------------


class TextPart(msgspec.Struct, tag="text", tag_field="type"):
    text: str


class ImageURL(msgspec.Struct):
    url: str


class ImageURLPart(msgspec.Struct, tag="image_url", tag_field="type"):
    image_url: ImageURL


ContentPart = TextPart | ImageURLPart


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str  # a JSON string, as every OpenAI-compatible server expects


class ToolCall(msgspec.Struct, kw_only=True):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class SystemMessage(msgspec.Struct, tag="system", tag_field="role"):
    content: str


class UserMessage(msgspec.Struct, tag="user", tag_field="role"):
    content: str | list[ContentPart]


class AssistantMessage(msgspec.Struct, tag="assistant", tag_field="role", omit_defaults=True):
    content: str
    tool_calls: list[ToolCall] | UnsetType = UNSET


class ToolMessage(msgspec.Struct, tag="tool", tag_field="role"):
    tool_call_id: str
    content: str


ChatMessage = SystemMessage | UserMessage | AssistantMessage | ToolMessage


class FunctionDefinition(msgspec.Struct, omit_defaults=True):
    name: str
    description: str | UnsetType = UNSET
    parameters: Raw | UnsetType = UNSET  # the Anthropic input_schema, byte for byte


class FunctionTool(msgspec.Struct, tag="function", tag_field="type"):
    function: FunctionDefinition


class ToolChoiceName(msgspec.Struct):
    name: str


class ToolChoiceFunction(msgspec.Struct, tag="function", tag_field="type"):
    function: ToolChoiceName


class StreamOptions(msgspec.Struct):
    include_usage: bool = True


class ChatCompletionRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What we POST to `/v1/chat/completions`.

    Only `max_tokens` carries the output limit: mlx_lm.server reads `max_completion_tokens` first and
    falls back to `max_tokens`, while llama.cpp and older vLLM builds know `max_tokens` best. Sending
    one field means no server can pick a different limit from the one we chose. There is no `seed`
    field on purpose: a seed makes mlx_lm.server generate one request at a time.
    """

    model: str | UnsetType = UNSET  # omitted: the node serves the model it loaded
    messages: list[ChatMessage]
    max_tokens: int
    temperature: float | UnsetType = UNSET
    top_p: float | UnsetType = UNSET
    top_k: int | UnsetType = UNSET
    stop: list[str] | UnsetType = UNSET
    tools: list[FunctionTool] | UnsetType = UNSET
    tool_choice: Literal["auto", "required", "none"] | ToolChoiceFunction | UnsetType = UNSET
    parallel_tool_calls: bool | UnsetType = UNSET
    stream: bool  # always sent, even false
    stream_options: StreamOptions | UnsetType = UNSET


# -- responses ---------------------------------------------------------------------------------


class ChoiceDeltaToolCallFunction(msgspec.Struct):
    name: str | None = None
    # A JSON string (or a piece of one when streamed); a few servers send an object instead.
    arguments: str | dict[str, Any] | None = None


class ChoiceDeltaToolCall(msgspec.Struct):
    """A tool call in a chunk (`index` set) or in a whole message (`index` usually absent)."""

    index: int | None = None
    id: str | None = None
    type: str | None = None
    function: ChoiceDeltaToolCallFunction | None = None


class ChoiceDelta(msgspec.Struct):
    role: str | None = None
    content: str | None = None
    reasoning: str | None = None  # mlx_lm.server, vLLM ≥ 0.10, Ollama
    reasoning_content: str | None = None  # llama.cpp, older vLLM, LM Studio
    tool_calls: list[ChoiceDeltaToolCall] | None = None


class ChunkChoice(msgspec.Struct):
    index: int | None = None
    delta: ChoiceDelta | None = None
    finish_reason: str | None = None
    # vLLM: the stop string (or token id) that ended generation, when one did.
    stop_reason: str | int | None = None


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int | None = None


class CompletionUsage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    prompt_tokens_details: PromptTokensDetails | None = None


class ChatCompletionChunk(msgspec.Struct):
    id: str | None = None
    model: str | None = None
    choices: list[ChunkChoice] | None = None  # `[]` on the usage chunk
    usage: CompletionUsage | None = None


class ChatCompletionMessage(msgspec.Struct):
    role: str | None = None
    content: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ChoiceDeltaToolCall] | None = None


class Choice(msgspec.Struct):
    index: int | None = None
    message: ChatCompletionMessage | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None


class ChatCompletion(msgspec.Struct):
    id: str | None = None
    model: str | None = None
    choices: list[Choice] | None = None
    usage: CompletionUsage | None = None


_chunk_decoder = msgspec.json.Decoder(ChatCompletionChunk)
_completion_decoder = msgspec.json.Decoder(ChatCompletion)


def decode_chunk(data: bytes | str) -> ChatCompletionChunk:
    """One streamed chunk (the JSON after `data:`); msgspec errors (ValueError subclasses) on garbage."""
    try:
        return _chunk_decoder.decode(data)
    except RecursionError:
        raise msgspec.DecodeError("JSON is nested too deeply") from None


def decode_completion(body: bytes) -> ChatCompletion:
    """A whole non-streaming answer; msgspec errors (ValueError subclasses) on garbage."""
    try:
        return _completion_decoder.decode(body)
    except RecursionError:
        raise msgspec.DecodeError("JSON is nested too deeply") from None
