"""`POST /v1/messages`: decode, hash the prompt, route, and answer (streaming or not).

Routing and failover: each attempt asks the gateway for a node (excluding nodes that already
failed this request); a node failure before any content reached the client is retried on
another node, up to `routing.max_attempts`. A node's 4xx is not retried: it is the request.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from proxy.answers import from_chat_completion
from proxy.attempts import (
    Attempt,
    Prepared,
    deadline_failure,
    end_request,
    native_usage,
    past_deadline,
    request_deadline,
    with_failover,
)
from proxy.config import ServerConfig
from proxy.errors import BodyTimeout, ClientDisconnected, GatewayError, InvalidRequest, RequestTooLarge
from proxy.gateway import Gateway
from proxy.joined import JoinedResponse
from proxy.joins import Generation
from proxy.logs import RequestRecord
from proxy.relay import RelayResponse
from proxy.translate import (
    encode_chat_request,
    estimate_tokens,
    prompt_parts,
    to_chat_request,
    to_native_body,
    tokens_of_bytes,
)
from proxy.upstream import NodeFailure
from proxy.validate import session_key_part
from proxy.wire.anthropic import (
    MessagesRequest,
    decode_count_tokens_request,
    decode_messages_request,
    session_id_from_metadata,
)
from proxy.wire.openai import decode_completion
from state.prefix import block_hashes

_json = msgspec.json.Encoder()


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The request body, refusing (413) as soon as it is known to exceed `limit` bytes, and (400) when
    it has not all arrived within `timeout` seconds: uvicorn itself waits for a trickling body forever.
    A client that hangs up before its body is complete raises ClientDisconnected (`client_cancel`)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"request body is {int(declared)} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestTooLarge(f"request body exceeds the limit of {limit} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise BodyTimeout(f"request body not received within {timeout:g}s ({size} bytes arrived)") from None
    except ClientDisconnect:
        raise ClientDisconnected(f"the client hung up after {size} bytes of its request body") from None
    return b"".join(chunks)


def check_limits(body: MessagesRequest, server: ServerConfig) -> None:
    """Refuse (400) more messages or tools than the configured limits: each costs event-loop time to translate."""
    if len(body.messages) > server.max_messages:
        raise InvalidRequest(f"messages: {len(body.messages)} messages; the limit is {server.max_messages}")
    if isinstance(body.tools, list) and len(body.tools) > server.max_tools:
        raise InvalidRequest(f"tools: {len(body.tools)} tools; the limit is {server.max_tools}")


def session_key(request: Request, body: MessagesRequest) -> str | None:
    """Binding key: the conversation's session id, plus the agent id for a subagent's own conversation.

    Each part is used as it is when it is printable ASCII of at most 128 characters, else hashed to
    `h:<32 hex>` (`proxy.validate.session_key_part`): the key is forwarded as the `x-session-id` header
    and used in store keys and logs, so it must never carry CR/LF, non-ASCII or megabytes.
    """
    h = request.headers
    session = h.get("x-claude-code-session-id") or h.get("x-session-id") or session_id_from_metadata(body)
    if not session:
        return None
    agent = h.get("x-claude-code-agent-id")
    key = session_key_part(session)
    return f"{key}/{session_key_part(agent)}" if agent else key


def prepare(gw: Gateway, request: Request, raw: bytes) -> Prepared:
    body = decode_messages_request(raw)
    settings = gw.settings
    check_limits(body, settings.server)
    pool = settings.pool_for(body.model)
    chat = to_chat_request(body, model_id=None, max_tokens_cap=settings.server.max_tokens_cap)
    parts = prompt_parts(chat, tools_first=gw.cluster.prompt_order(pool) == "tools-first")
    routing = settings.routing
    # Bounded work per request: only the first max_request_blocks blocks are hashed, matched and recorded.
    blocks = block_hashes(parts, salt=pool, block_size=routing.block_size, max_blocks=routing.max_request_blocks)
    size = sum([len(p) for p in parts])
    tokens = tokens_of_bytes(size, gw.bytes_per_token(pool))
    window = gw.cluster.max_window(pool)
    if window is not None and tokens > window:
        # Anthropic's own words for it, which Claude Code knows (docs/operations.md#context-windows).
        raise InvalidRequest(f"prompt is too long: {tokens} tokens > {window} maximum")
    return Prepared(
        raw=raw,
        body=body,
        chat=chat,
        pool=pool,
        blocks=blocks,
        session=session_key(request, body),
        message_id=f"msg_{uuid.uuid4().hex[:24]}",
        request_id=request.scope.get("state", {}).get("request_id", ""),
        received=time.monotonic(),
        prompt_bytes=size,
        tokens=tokens,
    )


def upstream_request(gw: Gateway, prep: Prepared, node_id: str) -> tuple[str, bytes]:
    """Path and body for this node: translated chat completions, or the native Messages body."""
    node = gw.cluster.nodes[node_id]
    cap = gw.settings.server.max_tokens_cap
    if node.protocol == "anthropic":
        return "/v1/messages", to_native_body(prep.raw, model_id=node.model, max_tokens_cap=cap)
    chat = prep.chat
    if node.images or node.late_system != "user":
        chat = to_chat_request(
            prep.body, model_id=node.model, max_tokens_cap=cap, images=node.images, late_system=node.late_system
        )
    else:
        chat = msgspec.structs.replace(chat, model=node.model if node.model is not None else msgspec.UNSET)
    return "/v1/chat/completions", encode_chat_request(chat)


async def messages(request: Request) -> Response | RelayResponse | JoinedResponse:
    gw: Gateway = request.app.state.gateway
    scope = request.scope
    record = RequestRecord(scope.get("state", {}).get("request_id", ""), scope["method"], scope["path"])
    status: int | str | None = "client_cancel"
    try:
        raw = await read_body(request, gw.settings.server.max_body_bytes, gw.settings.server.body_timeout_s)
        prep = prepare(gw, request, raw)
        prep.record = record
        record.session, record.model = prep.session, prep.body.model
        if prep.body.stream:
            joined = await gw.joins.begin(prep)
            status = None  # the response logs the request when it ends
            if joined is None or isinstance(joined, Generation):
                return RelayResponse(gw, prep, upstream_request, generation=joined)
            return JoinedResponse(
                gw, prep, joined, lambda resumed: RelayResponse(gw, prep, upstream_request, resumed=resumed)
            )
        response = await complete(gw, prep)
        status = response.status_code
        return response
    except ClientDisconnected:
        status = "client_cancel"
        raise
    except GatewayError as exc:
        status, record.error = exc.status, exc.message
        raise
    except Exception:
        status = 500
        raise
    finally:
        if status is not None:
            end_request(gw, record, status)


async def complete(gw: Gateway, prep: Prepared) -> Response:
    """A non-streaming request: one whole answer from the first node that gives one, each within
    `timeouts.first_byte_s`, all before the request's deadline (`timeouts.stream_deadline_s`)."""
    deadline = request_deadline(gw, prep)

    async def answer(attempt: Attempt) -> Response:
        node_id = attempt.decision.node_id
        path, body = upstream_request(gw, prep, node_id)
        limit = gw.settings.timeouts.first_byte_s
        try:
            data = await gw.cluster.clients[node_id].post(
                path,
                body,
                timeout=max(0.0, min(limit, deadline - time.monotonic())),
                headers=prep.upstream_headers,
                max_bytes=gw.settings.server.max_answer_bytes,
            )
        except NodeFailure as failure:
            if failure.kind == "timeout" and past_deadline(deadline):
                raise deadline_failure(gw, node_id) from None
            raise
        if gw.cluster.nodes[node_id].protocol == "anthropic":
            native = _native_answer(data, prep, node_id, attempt)
            await attempt.succeed()
            return Response(native, media_type="application/json")
        try:
            completion = decode_completion(data)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
            raise NodeFailure("protocol", f"node {node_id} sent an invalid completion") from None
        result = from_chat_completion(
            completion, model=prep.body.model, message_id=prep.message_id, stop_sequences=_stops(prep.body)
        )
        attempt.prompt_tokens = result.usage.input_tokens + (result.usage.cache_read_input_tokens or 0)
        attempt.cached_tokens = result.usage.cache_read_input_tokens or 0
        attempt.completion_tokens = result.usage.output_tokens
        await attempt.succeed()
        return Response(_json.encode(result), media_type="application/json")

    return await with_failover(gw, prep, answer, stop=lambda: past_deadline(deadline))


def _stops(body: MessagesRequest) -> list[str]:
    return list(body.stop_sequences) if isinstance(body.stop_sequences, list) else []


def _native_answer(answer: bytes, prep: Prepared, node_id: str, attempt: Attempt) -> bytes:
    """A native node's Messages answer, with the model name the client asked for (its usage booked)."""
    try:
        data = msgspec.json.decode(answer)
    except (msgspec.DecodeError, RecursionError):
        raise NodeFailure("protocol", f"node {node_id} sent invalid JSON") from None
    if not isinstance(data, dict) or data.get("type") != "message":
        raise NodeFailure("protocol", f"node {node_id} sent something that is not a message")
    data["model"] = prep.body.model
    native_usage(data.get("usage"), attempt)
    return _json.encode(data)


async def count_tokens(request: Request) -> Response:
    gw: Gateway = request.app.state.gateway
    raw = await read_body(request, gw.settings.server.max_body_bytes, gw.settings.server.body_timeout_s)
    body = decode_count_tokens_request(raw)
    check_limits(body, gw.settings.server)
    pool = gw.settings.pool_for(body.model)
    tokens = await native_count(gw, pool, raw)
    if tokens is None:
        tokens = estimate_tokens(body, gw.bytes_per_token(pool))
    return Response(_json.encode({"input_tokens": tokens}), media_type="application/json")


async def native_count(gw: Gateway, pool: str, raw: bytes) -> int | None:
    """The exact count from a routable native node of the pool (llama-server, vLLM and LM Studio serve
    `/v1/messages/count_tokens`), or None when the pool has none or none answered in time."""
    for candidate in gw.cluster.candidates(pool):
        node = gw.cluster.nodes[candidate.node_id]
        if node.protocol != "anthropic":
            continue
        fields = msgspec.json.decode(to_native_body(raw, model_id=node.model, max_tokens_cap=1))
        fields.pop("max_tokens", None)  # count_tokens takes none
        try:
            answer = await gw.cluster.clients[node.id].post(
                "/v1/messages/count_tokens", _json.encode(fields), timeout=gw.settings.health.timeout_s, max_bytes=65536
            )
            count = msgspec.json.decode(answer).get("input_tokens")
        except (NodeFailure, msgspec.DecodeError, AttributeError, RecursionError):
            continue
        if isinstance(count, int) and count >= 0:
            return count
    return None
