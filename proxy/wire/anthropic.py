"""Anthropic Messages API wire types: the request Claude Code sends and the answers we give it.

Inbound structs ignore unknown fields (Claude Code adds fields all the time) and keep "absent"
(`UNSET`) apart from `null`; JSON nobody here needs to read (a tool's `input_schema`, a tool_use
`input`, `thinking`) stays `msgspec.Raw` and is passed on byte for byte. Content blocks are tagged
unions on `type`, so an unknown block type is a decode error naming the type and its path.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, Raw, UnsetType

from proxy.errors import InvalidRequest
from proxy.validate import check_sampling

# -- content blocks ----------------------------------------------------------------------------


class TextBlock(msgspec.Struct, tag="text", tag_field="type"):
    text: str


class ImageSource(msgspec.Struct, kw_only=True):
    """`base64` (media_type + data), `url` (url) or `file` (file_id)."""

    type: str
    media_type: str | UnsetType = UNSET
    data: str | UnsetType = UNSET
    url: str | UnsetType = UNSET


class ImageBlock(msgspec.Struct, tag="image", tag_field="type"):
    source: ImageSource


class DocumentSource(msgspec.Struct, kw_only=True):
    """`text` (data is the text), `content` (blocks), `base64` (a PDF), `url` or `file`."""

    type: str
    media_type: str | UnsetType = UNSET
    data: str | UnsetType = UNSET
    url: str | UnsetType = UNSET
    content: str | list[TextBlock | ImageBlock] | UnsetType = UNSET


class DocumentBlock(msgspec.Struct, tag="document", tag_field="type", kw_only=True):
    source: DocumentSource
    title: str | UnsetType | None = UNSET


class SearchResultBlock(msgspec.Struct, tag="search_result", tag_field="type", kw_only=True):
    source: str = ""
    title: str = ""
    content: list[TextBlock] = []


class ToolReferenceBlock(msgspec.Struct, tag="tool_reference", tag_field="type"):
    """What Claude Code's tool search returns inside a tool_result."""

    tool_name: str


ToolResultContent = TextBlock | ImageBlock | DocumentBlock | SearchResultBlock | ToolReferenceBlock


class ToolUseBlock(msgspec.Struct, tag="tool_use", tag_field="type"):
    id: str
    name: str
    input: Raw


class ToolResultBlock(msgspec.Struct, tag="tool_result", tag_field="type", kw_only=True):
    tool_use_id: str
    content: str | list[ToolResultContent] | UnsetType | None = UNSET
    is_error: bool | UnsetType | None = UNSET


class ThinkingBlock(msgspec.Struct, tag="thinking", tag_field="type"):
    thinking: str
    signature: str = ""


class RedactedThinkingBlock(msgspec.Struct, tag="redacted_thinking", tag_field="type"):
    data: str


class ServerToolUseBlock(msgspec.Struct, tag="server_tool_use", tag_field="type"):
    """A server tool (web search) Anthropic ran; a node has no such tool."""

    id: str
    name: str
    input: Raw


class WebSearchToolResultBlock(msgspec.Struct, tag="web_search_tool_result", tag_field="type"):
    tool_use_id: str
    content: Raw


ContentBlock = (
    TextBlock
    | ImageBlock
    | DocumentBlock
    | SearchResultBlock
    | ToolUseBlock
    | ToolResultBlock
    | ThinkingBlock
    | RedactedThinkingBlock
    | ServerToolUseBlock
    | WebSearchToolResultBlock
)

# -- request -----------------------------------------------------------------------------------


class Message(msgspec.Struct):
    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlock]


class Tool(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A client tool (with `input_schema`) or a server tool such as `web_search_20250305` (without)."""

    name: str
    type: str | UnsetType | None = UNSET
    description: str | UnsetType | None = UNSET
    input_schema: Raw | UnsetType = UNSET


class ToolChoice(msgspec.Struct, kw_only=True):
    type: Literal["auto", "any", "none", "tool"]
    name: str | UnsetType = UNSET
    disable_parallel_tool_use: bool | UnsetType | None = UNSET


class Metadata(msgspec.Struct):
    user_id: str | UnsetType | None = UNSET


class MessagesRequest(msgspec.Struct, kw_only=True):
    model: str
    messages: Annotated[list[Message], Meta(min_length=1)]
    max_tokens: Annotated[int, Meta(ge=1)]
    system: str | list[TextBlock] | UnsetType | None = UNSET
    tools: list[Tool] | UnsetType | None = UNSET
    tool_choice: ToolChoice | UnsetType | None = UNSET
    stop_sequences: list[str] | UnsetType | None = UNSET
    temperature: float | UnsetType | None = UNSET
    top_p: float | UnsetType | None = UNSET
    top_k: int | UnsetType | None = UNSET
    stream: bool = False
    metadata: Metadata | UnsetType | None = UNSET
    thinking: Raw | UnsetType = UNSET


class CountTokensRequest(MessagesRequest, kw_only=True):
    """`/v1/messages/count_tokens` bodies carry no `max_tokens`."""

    max_tokens: int = 0


# -- response ----------------------------------------------------------------------------------


class Usage(msgspec.Struct, kw_only=True):
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0


ResponseBlock = TextBlock | ThinkingBlock | ToolUseBlock

StopReason = Literal[
    "end_turn", "max_tokens", "stop_sequence", "tool_use", "pause_turn", "refusal", "model_context_window_exceeded"
]


class MessagesResponse(msgspec.Struct, tag="message", tag_field="type", kw_only=True):
    id: str
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ResponseBlock]
    stop_reason: StopReason | None = None
    stop_sequence: str | None = None
    usage: Usage


# -- stream events -----------------------------------------------------------------------------


class TextDelta(msgspec.Struct, tag="text_delta", tag_field="type"):
    text: str


class InputJSONDelta(msgspec.Struct, tag="input_json_delta", tag_field="type"):
    partial_json: str


class ThinkingDelta(msgspec.Struct, tag="thinking_delta", tag_field="type"):
    thinking: str


class SignatureDelta(msgspec.Struct, tag="signature_delta", tag_field="type"):
    signature: str


class MessageStartEvent(msgspec.Struct, tag="message_start", tag_field="type"):
    message: MessagesResponse


class ContentBlockStartEvent(msgspec.Struct, tag="content_block_start", tag_field="type"):
    index: int
    content_block: ResponseBlock


class ContentBlockDeltaEvent(msgspec.Struct, tag="content_block_delta", tag_field="type"):
    index: int
    delta: TextDelta | InputJSONDelta | ThinkingDelta | SignatureDelta


class ContentBlockStopEvent(msgspec.Struct, tag="content_block_stop", tag_field="type"):
    index: int


class MessageDelta(msgspec.Struct):
    stop_reason: StopReason | None = None
    stop_sequence: str | None = None


class MessageDeltaEvent(msgspec.Struct, tag="message_delta", tag_field="type"):
    delta: MessageDelta
    usage: Usage


class MessageStopEvent(msgspec.Struct, tag="message_stop", tag_field="type"):
    pass


class PingEvent(msgspec.Struct, tag="ping", tag_field="type"):
    pass


class APIError(msgspec.Struct):
    type: str
    message: str


class ErrorEvent(msgspec.Struct, tag="error", tag_field="type"):
    error: APIError


StreamEvent = (
    MessageStartEvent
    | ContentBlockStartEvent
    | ContentBlockDeltaEvent
    | ContentBlockStopEvent
    | MessageDeltaEvent
    | MessageStopEvent
    | PingEvent
    | ErrorEvent
)

# -- decoding ----------------------------------------------------------------------------------

_request_decoder = msgspec.json.Decoder(MessagesRequest)
_count_decoder = msgspec.json.Decoder(CountTokensRequest)
_UNKNOWN_BLOCK = re.compile(r"Invalid value '(.*)' - at `(\$\.(?:messages|system)\[[^`]*\.type)`")


def _decode(
    decoder: msgspec.json.Decoder[MessagesRequest] | msgspec.json.Decoder[CountTokensRequest], body: bytes
) -> MessagesRequest:
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as exc:
        text = str(exc)
        unknown = _UNKNOWN_BLOCK.fullmatch(text)
        if unknown:
            text = f"unknown content block type '{unknown[1]}' - at `{unknown[2]}`"
        raise InvalidRequest(text) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    except UnicodeDecodeError:
        raise InvalidRequest("the request body is not valid UTF-8") from None
    except RecursionError:
        # msgspec stops at Python's recursion limit (about 1000 levels of arrays or objects).
        raise InvalidRequest("the request body is nested too deeply") from None


def decode_messages_request(body: bytes) -> MessagesRequest:
    """Decode a `/v1/messages` body and check what Anthropic checks beyond the types (sampling ranges);
    InvalidRequest names the problem and the field."""
    req = _decode(_request_decoder, body)
    check_sampling(req.temperature, req.top_p, req.top_k)
    return req


def decode_count_tokens_request(body: bytes) -> MessagesRequest:
    """Decode a `/v1/messages/count_tokens` body (like a messages body, `max_tokens` optional)."""
    return _decode(_count_decoder, body)


# `user_<hash>_account_<uuid>_session_<uuid>` (older Claude Code).
_LEGACY_USER_ID = re.compile(r"user_.*_session_([0-9A-Za-z-]+)")


class _UserId(msgspec.Struct):
    session_id: str | None = None


_user_id_decoder = msgspec.json.Decoder(_UserId)
MAX_USER_ID = 4096
"""Longest `metadata.user_id` looked into (Claude Code's is about 200 characters)."""


def session_id_from_metadata(req: MessagesRequest) -> str | None:
    """The Claude Code session id hidden in `metadata.user_id`, if any (as sent: the caller makes it safe).

    A user_id over MAX_USER_ID characters, not JSON of the expected shape, or nested too deeply gives None.
    """
    meta = req.metadata
    if not isinstance(meta, Metadata) or not isinstance(meta.user_id, str) or not meta.user_id:
        return None
    user_id = meta.user_id
    if len(user_id) > MAX_USER_ID:
        return None
    if user_id[0] == "{":
        try:
            return _user_id_decoder.decode(user_id).session_id or None
        except (msgspec.DecodeError, UnicodeError, RecursionError):
            return None
    legacy = _LEGACY_USER_ID.fullmatch(user_id)
    return legacy[1] if legacy else None
