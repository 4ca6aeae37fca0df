"""Anthropic Messages ⇄ OpenAI chat completions, as plain functions over the wire structs.

Requests: `to_chat_request` (for chat-completions nodes such as mlx_lm.server) and `to_native_body`
(for nodes that speak the Messages API themselves). Both drop the `x-anthropic-billing-header`
system block, which differs per conversation and would sit at the very front of the prompt,
defeating every node's prefix cache. `prompt_parts` / `native_prompt_parts` give the bytes the
gateway hashes for prefix affinity. Answers live in `proxy.answers`, streams in `proxy.stream`.

Tool-use ids (`proxy.answers.new_tool_use_id`): every tool call a node makes gets a fresh
`toolu_<24 hex>` id, whatever id the node gave (mlx_lm.server invents uuids, some vLLM tool parsers
repeat `functions.<name>:0` across turns, and Claude Code needs ids unique within a conversation).
The id then travels unchanged: Claude Code sends it back as `tool_use.id` and
`tool_result.tool_use_id`, and the node receives it as the assistant's `tool_calls[].id` and the
tool message's `tool_call_id`, so the pair always matches.
"""

from __future__ import annotations

import math
from typing import Literal

import msgspec
from msgspec import UNSET, Raw, UnsetType

from proxy.errors import InvalidRequest
from proxy.wire.anthropic import (
    ContentBlock,
    DocumentBlock,
    ImageBlock,
    ImageSource,
    MessagesRequest,
    SearchResultBlock,
    TextBlock,
    Tool,
    ToolReferenceBlock,
    ToolResultBlock,
    ToolUseBlock,
)
from proxy.wire.openai import (
    AssistantMessage,
    ChatCompletionRequest,
    ChatMessage,
    ContentPart,
    FunctionCall,
    FunctionDefinition,
    FunctionTool,
    ImageURL,
    ImageURLPart,
    StreamOptions,
    SystemMessage,
    TextPart,
    ToolCall,
    ToolChoiceFunction,
    ToolChoiceName,
    ToolMessage,
    UserMessage,
)

BILLING_HEADER = "x-anthropic-billing-header:"
TOOL_ERROR_PREFIX = "[tool error] "
REMINDER_OPEN = "<system-reminder>"

_encode = msgspec.json.Encoder().encode

# -- request: Anthropic → chat completions -----------------------------------------------------


def system_text(system: str | list[TextBlock] | UnsetType | None) -> str:
    """The system prompt as one string, without the billing-header block."""
    if isinstance(system, str):
        if system.startswith(BILLING_HEADER):
            _, _, system = system.partition("\n")
        return system
    if not system:
        return ""
    return "\n\n".join([b.text for b in system if not b.text.startswith(BILLING_HEADER)])


def _image_placeholder(source: ImageSource) -> str:
    return f"[image omitted: {source.media_type if isinstance(source.media_type, str) else source.type}]"


def _image_part(source: ImageSource, images: bool) -> ContentPart:
    if images:
        if source.type == "base64" and isinstance(source.data, str) and isinstance(source.media_type, str):
            return ImageURLPart(ImageURL(f"data:{source.media_type};base64,{source.data}"))
        if source.type == "url" and isinstance(source.url, str):
            return ImageURLPart(ImageURL(source.url))
    return TextPart(_image_placeholder(source))


def _document_text(doc: DocumentBlock) -> str:
    """A document's own text (text or content sources); other sources (PDFs, files) become a placeholder."""
    src = doc.source
    if src.type == "text" and isinstance(src.data, str):
        body = src.data
    elif src.type == "content" and isinstance(src.content, str):
        body = src.content
    elif src.type == "content" and isinstance(src.content, list):
        body = "\n".join(b.text if isinstance(b, TextBlock) else _image_placeholder(b.source) for b in src.content)
    else:
        what = src.media_type if isinstance(src.media_type, str) else src.url if isinstance(src.url, str) else src.type
        body = f"[document omitted: {what}]"
    return f"[document: {doc.title}]\n{body}" if isinstance(doc.title, str) and doc.title else body


def _search_result_text(block: SearchResultBlock) -> str:
    return "\n".join([block.title, block.source, *(b.text for b in block.content)])


def _tool_result_text(block: ToolResultBlock) -> str:
    """Tool-result content as text (nodes take text only in tool messages); `is_error` becomes a prefix."""
    content = block.content
    if isinstance(content, str):
        text = content
    elif isinstance(content, list):
        pieces = []
        for part in content:
            if isinstance(part, TextBlock):
                pieces.append(part.text)
            elif isinstance(part, ImageBlock):
                pieces.append(_image_placeholder(part.source))
            elif isinstance(part, DocumentBlock):
                pieces.append(_document_text(part))
            elif isinstance(part, SearchResultBlock):
                pieces.append(_search_result_text(part))
            elif isinstance(part, ToolReferenceBlock):
                pieces.append(f"[tool reference: {part.tool_name}]")
        text = "\n".join(pieces)
    else:
        text = ""
    return TOOL_ERROR_PREFIX + text if block.is_error is True else text


def _user_content(parts: list[ContentPart]) -> str | list[ContentPart]:
    """Consecutive text parts joined; all-text content becomes a plain string (mlx_lm takes text only)."""
    if all(type(p) is TextPart for p in parts):
        return "\n".join([p.text for p in parts if isinstance(p, TextPart)])
    out: list[ContentPart] = []
    for part in parts:
        if isinstance(part, TextPart) and out and isinstance(out[-1], TextPart):
            out[-1] = TextPart(out[-1].text + "\n" + part.text)
        else:
            out.append(part)
    return out


def _user_messages(blocks: list[ContentBlock], images: bool, out: list[ChatMessage]) -> None:
    """Tool results first, as `tool` messages in order, then the rest of the turn as one user message."""
    parts: list[ContentPart] = []
    for block in blocks:
        if isinstance(block, TextBlock):
            parts.append(TextPart(block.text))
        elif isinstance(block, ToolResultBlock):
            out.append(ToolMessage(block.tool_use_id, _tool_result_text(block)))
        elif isinstance(block, ImageBlock):
            parts.append(_image_part(block.source, images))
        elif isinstance(block, DocumentBlock):
            parts.append(TextPart(_document_text(block)))
        elif isinstance(block, SearchResultBlock):
            parts.append(TextPart(_search_result_text(block)))
        # thinking, redacted_thinking, server tool blocks: nothing a node can use
    if parts:
        out.append(UserMessage(_user_content(parts)))


def _assistant_message(blocks: list[ContentBlock]) -> AssistantMessage | None:
    """Text joined as it was generated, tool_use as tool_calls; thinking dropped (nodes cannot verify it)."""
    texts: list[str] = []
    calls: list[ToolCall] = []
    for block in blocks:
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolUseBlock):
            calls.append(ToolCall(id=block.id, function=FunctionCall(block.name, str(block.input, "utf-8"))))
    text = "".join(texts)
    if calls:
        return AssistantMessage(text, calls)
    return AssistantMessage(text) if text else None


def _system_message_text(content: str | list[ContentBlock]) -> str:
    if isinstance(content, str):
        return system_text(content)
    return system_text([b for b in content if isinstance(b, TextBlock)])


def _function_tools(tools: list[Tool] | UnsetType | None) -> list[FunctionTool]:
    """Client tools only: server tools (web_search …) have no input_schema and no node can run them."""
    if not tools:
        return []
    return [
        FunctionTool(
            FunctionDefinition(t.name, t.description if isinstance(t.description, str) else UNSET, t.input_schema)
        )
        for t in tools
        if isinstance(t.input_schema, Raw)
    ]


def _late_system_message(text: str) -> UserMessage:
    if text.lstrip().startswith(REMINDER_OPEN):
        return UserMessage(text)
    return UserMessage(f"{REMINDER_OPEN}\n{text}\n</system-reminder>")


def to_chat_request(
    req: MessagesRequest,
    *,
    model_id: str | None,
    max_tokens_cap: int,
    images: bool = False,
    late_system: Literal["user", "system"] = "user",
) -> ChatCompletionRequest:
    """The chat-completions request for `req` (see the module docstring and docs/architecture.md).

    `model_id` is the id the node serves, or None to omit `model` (a Claude name is never forwarded:
    mlx_lm.server would try to load it). `max_tokens` is always sent, clamped to `max_tokens_cap`
    (mlx_lm.server stops at 512 without it). `images=False` turns images into short placeholders.

    `role: system` messages in the middle of the conversation stay in place, as a user message wrapped
    in `<system-reminder>` tags by default: the official Qwen chat templates (Qwen3.5 and later, and
    many Qwen-based models) raise "System message must be at the beginning" for any other system
    message, which mlx_lm.server answers with an error. `late_system="system"` keeps them as system
    messages for templates that accept that.
    """
    messages: list[ChatMessage] = []
    system = system_text(req.system)
    if system:
        messages.append(SystemMessage(system))
    for message in req.messages:
        content = message.content
        if message.role == "user":
            if isinstance(content, str):
                messages.append(UserMessage(content))
            else:
                _user_messages(content, images, messages)
        elif message.role == "assistant":
            if isinstance(content, str):
                if content:
                    messages.append(AssistantMessage(content))
            elif (assistant := _assistant_message(content)) is not None:
                messages.append(assistant)
        elif text := _system_message_text(content):
            leading = not messages or late_system == "system"
            messages.append(SystemMessage(text) if leading else _late_system_message(text))

    chat = ChatCompletionRequest(
        model=model_id if model_id is not None else UNSET,
        messages=messages,
        max_tokens=min(req.max_tokens, max_tokens_cap),
        stream=req.stream,
    )
    if req.stream:
        chat.stream_options = StreamOptions(include_usage=True)
    if isinstance(req.temperature, float | int):
        chat.temperature = req.temperature
    if isinstance(req.top_p, float | int):
        chat.top_p = req.top_p
    if isinstance(req.top_k, int):
        chat.top_k = req.top_k
    if req.stop_sequences:
        chat.stop = list(req.stop_sequences)
    tools = _function_tools(req.tools)
    if tools:
        chat.tools = tools
        choice = req.tool_choice
        if choice:
            if choice.type == "any":
                chat.tool_choice = "required"
            elif choice.type == "tool" and isinstance(choice.name, str):
                # A forced tool the node does not have (a dropped server tool) cannot be forced.
                named = any(t.function.name == choice.name for t in tools)
                chat.tool_choice = ToolChoiceFunction(ToolChoiceName(choice.name)) if named else "auto"
            else:
                chat.tool_choice = "none" if choice.type == "none" else "auto"
            if choice.disable_parallel_tool_use is True:
                chat.parallel_tool_calls = False
    return chat


def encode_chat_request(chat: ChatCompletionRequest) -> bytes:
    return _encode(chat)


def prompt_parts(chat: ChatCompletionRequest, *, tools_first: bool = False) -> list[bytes]:
    """Deterministic bytes of the prompt, in the order the node's chat template renders it: the leading
    system message, then the tools list, then each other message (`tools_first`: the tools before the
    system message, for templates that render them so).

    The common templates (Qwen, Llama, GLM, …) render the system prompt first and the tools after it, so
    two agents that share tools but not their system prompt share no prefix on the node, and must not
    look related to the router. Each message's bytes depend on that message alone, so turn N+1 of a
    conversation starts with exactly turn N's items (what prefix-affinity hashing relies on).
    """
    messages = chat.messages
    lead = 1 if messages and isinstance(messages[0], SystemMessage) else 0
    tools = _encode(chat.tools) if isinstance(chat.tools, list) else b"[]"
    system = [_encode(m) for m in messages[:lead]]
    parts = [tools, *system] if tools_first else [*system, tools]
    parts.extend([_encode(m) for m in messages[lead:]])
    return parts


# -- request: native Messages nodes ------------------------------------------------------------


class _BlockHead(msgspec.Struct):
    type: str | None = None
    text: str | None = None


_native_decoder = msgspec.json.Decoder(dict[str, Raw])
_system_decoder = msgspec.json.Decoder(str | list[Raw] | None)
_head_decoder = msgspec.json.Decoder(_BlockHead)
_int_decoder = msgspec.json.Decoder(int)


def _is_billing_block(raw: Raw) -> bool:
    try:
        head = _head_decoder.decode(raw)
    except msgspec.DecodeError:
        return False
    return head.type == "text" and head.text is not None and head.text.startswith(BILLING_HEADER)


def to_native_body(body: bytes, *, model_id: str | None, max_tokens_cap: int) -> bytes:
    """The original Messages body for a native node: every field kept (as raw JSON) except `model`
    (set to `model_id`, or removed when None), the billing-header system block (dropped) and
    `max_tokens` (clamped to the cap, or set to it when absent)."""
    try:
        fields = _native_decoder.decode(body)
        if model_id is None:
            fields.pop("model", None)
        else:
            fields["model"] = Raw(_encode(model_id))
        max_tokens = _int_decoder.decode(fields["max_tokens"]) if "max_tokens" in fields else max_tokens_cap
        fields["max_tokens"] = Raw(_encode(min(max_tokens, max_tokens_cap)))
        if "system" in fields:
            system = _system_decoder.decode(fields["system"])
            if isinstance(system, str) and system.startswith(BILLING_HEADER):
                fields["system"] = Raw(_encode(system.partition("\n")[2]))
            elif isinstance(system, list) and any(_is_billing_block(b) for b in system):
                fields["system"] = Raw(_encode([b for b in system if not _is_billing_block(b)]))
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidRequest(f"the request body cannot be forwarded: {exc}") from None
    return _encode(fields)


def native_prompt_parts(req: MessagesRequest) -> list[bytes]:
    """Like `prompt_parts`, for requests forwarded natively: tools, system (no billing header), each message.

    Only the fields the structs decode are encoded, so `cache_control` markers (which Claude Code
    moves to the newest message every turn) do not disturb the prefix.
    """
    parts = [_encode(req.tools) if isinstance(req.tools, list) else b"[]", _encode(system_text(req.system))]
    parts.extend([_encode(m) for m in req.messages])
    return parts


DEFAULT_BYTES_PER_TOKEN = 4.0
"""Until a pool's nodes have reported usage: about 4 bytes of translated prompt per token."""


def prompt_bytes(req: MessagesRequest) -> int:
    """Bytes of the translated prompt (`prompt_parts` of the chat request a node would get)."""
    chat = to_chat_request(req, model_id=None, max_tokens_cap=1)
    return sum([len(p) for p in prompt_parts(chat)])


def estimate_tokens(req: MessagesRequest, bytes_per_token: float = DEFAULT_BYTES_PER_TOKEN) -> int:
    """A `/v1/messages/count_tokens` answer without a tokenizer: the translated prompt's bytes divided by
    the pool's bytes per token, as calibrated from its nodes' own `prompt_tokens` reports.

    The bytes are `prompt_parts` of the chat request a node would get (billing header dropped, images
    as placeholders), whose JSON framing stands in for each message's template overhead. Deterministic,
    and it never shrinks when content is added.
    """
    return tokens_of_bytes(prompt_bytes(req), bytes_per_token)


def tokens_of_bytes(size: int, bytes_per_token: float = DEFAULT_BYTES_PER_TOKEN) -> int:
    """Tokens of `size` bytes of translated prompt at the pool's calibrated bytes per token (at least 1)."""
    return max(1, math.ceil(size / max(0.5, bytes_per_token)))
