"""Streaming answers: an ASGI response that relays a node's stream to the client as Anthropic SSE.

Timeline of one streaming request:
  1. route, open the upstream request; wait up to `server.accept_wait_s` for the node's
     response headers so a node that refuses at once becomes a real HTTP status (529, 400 …);
  2. send 200 + `message_start` (at the latest after accept_wait_s) and `event: ping` whenever
     the client has heard nothing for `server.ping_interval_s` (long Mac prefills);
  3. translate chunks to events as they arrive and write them at once (no buffering);
  4. a node failure before any content was written → next node (same stream, same message);
     after content → an Anthropic `error` event ends the stream (never a fake end_turn).
The client disconnecting cancels the relay, which closes the upstream response at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import msgspec
from starlette.types import Receive, Scope, Send

from proxy.errors import (
    ClusterUnavailable,
    GatewayError,
    InvalidRequest,
    Overloaded,
    UpstreamError,
    UpstreamTimeout,
    error_body,
    error_headers,
)
from proxy.gateway import Gateway
from proxy.logs import RequestRecord, log_access
from proxy.sse import PING, SSEDecoder, encode_event
from proxy.stream import StreamTranslator
from proxy.upstream import NodeFailure, NodeStream
from proxy.wire.anthropic import MessagesRequest
from proxy.wire.openai import ChatCompletionRequest, decode_chunk
from state.types import Decision, Outcome

log = logging.getLogger("mlxmux.relay")
T = TypeVar("T")


@dataclass(slots=True)
class Prepared:
    """A decoded, hashed request ready to route."""

    raw: bytes
    body: MessagesRequest
    chat: ChatCompletionRequest
    pool: str
    blocks: tuple[str, ...]
    session: str | None
    message_id: str
    request_id: str
    received: float
    record: RequestRecord = field(default_factory=RequestRecord)

    @property
    def upstream_headers(self) -> dict[str, str]:
        """Sent to the node: the conversation key (`x-session-id`), for nodes or proxies that use it."""
        return {"x-session-id": self.session} if self.session else {}


@dataclass(slots=True)
class Attempt:
    """One try of a request on one node; reports its outcome to the store exactly once."""

    gw: Gateway
    prep: Prepared
    decision: Decision
    started: float = field(default_factory=time.monotonic)
    ttft_ms: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    done: bool = False

    def __post_init__(self) -> None:
        record = self.prep.record
        record.node, record.reason = self.decision.node_id, self.decision.reason
        record.attempts += 1

    def first_token(self) -> None:
        if not self.ttft_ms:
            self.ttft_ms = (time.monotonic() - self.started) * 1000

    async def _finish(self, outcome: Outcome, status: str) -> None:
        if self.done:
            return
        self.done = True
        node, o, record = self.decision.node_id, outcome, self.prep.record
        record.ttft_ms, record.prompt_tokens, record.cached_tokens = o.ttft_ms, o.prompt_tokens, o.cached_tokens
        self.gw.metrics.attempt_ended(
            node, status, self.decision.reason, o.ttft_ms / 1000, o.total_ms / 1000, o.prompt_tokens, o.cached_tokens
        )
        await self.gw.finish(self.decision.lease, outcome)

    async def succeed(self) -> None:
        total = (time.monotonic() - self.started) * 1000
        outcome = Outcome(True, self.ttft_ms or total, total, "", self.prompt_tokens, self.cached_tokens)
        await self._finish(outcome, "200")
        await self.gw.health.report_request(self.decision.node_id, None, self.ttft_ms)

    async def fail(self, failure: NodeFailure) -> None:
        total = (time.monotonic() - self.started) * 1000
        # Once content reached the client the stream ends with an error event, not an HTTP status.
        status = "stream_error" if self.ttft_ms else str(failure_error(failure).status)
        await self._finish(Outcome(False, self.ttft_ms, total, failure.kind), status)
        await self.gw.health.report_request(self.decision.node_id, failure)
        log.warning("node %s failed request %s: %s", self.decision.node_id, self.prep.request_id, failure.message)

    async def abandon(self) -> None:
        """The client went away (or the server is stopping): free the lease, blame no node."""
        total = (time.monotonic() - self.started) * 1000
        with contextlib.suppress(Exception):
            await asyncio.shield(self._finish(Outcome(False, self.ttft_ms, total, "client_cancel"), "client_cancel"))


async def with_failover(
    gw: Gateway, prep: Prepared, run: Callable[[Attempt], Awaitable[T]], *, stop: Callable[[], bool] = lambda: False
) -> T:
    """Route the request and `run` an attempt on the chosen node; after a retryable node failure, again on
    another node (the failed ones excluded), up to `routing.max_attempts`, unless `stop()` says no more.

    Raises ClusterUnavailable when no node was routable at all, else the client-facing error of the last
    node failure. An attempt the client abandons (cancellation) frees its lease and blames no node.
    """
    tried: list[str] = []
    last: NodeFailure | None = None
    for _ in range(gw.settings.routing.max_attempts):
        try:
            decision = await gw.route(prep.pool, prep.blocks, prep.session, tried)
        except ClusterUnavailable:
            if last is None:
                raise
            break
        if last is not None:
            gw.metrics.retries.labels(last.kind).inc()
        attempt = Attempt(gw, prep, decision)
        try:
            return await run(attempt)
        except NodeFailure as failure:
            await attempt.fail(failure)
            tried.append(decision.node_id)
            last = failure
            if stop() or not failure.retryable:
                break
        except BaseException:
            await attempt.abandon()
            raise
    assert last is not None
    raise failure_error(last)


def failure_error(failure: NodeFailure) -> GatewayError:
    """What the client sees when a node failed and no other node could take the request."""
    if failure.kind == "http_4xx":
        return InvalidRequest(f"the node rejected the request: {failure.message}")
    if failure.kind == "timeout":
        return UpstreamTimeout(failure.message)
    if failure.kind == "protocol":
        return UpstreamError(failure.message)
    return Overloaded(failure.message)


def end_request(gw: Gateway, record: RequestRecord, status: int | str) -> None:
    """A /v1/messages request is over: its access line, and the count of a request that reached no node."""
    if not record.attempts:
        gw.metrics.requests.labels("", str(status), "").inc()
    log_access(record, status, gw.settings.server.log_session_ids)


UpstreamRequest = Callable[[Gateway, Prepared, str], tuple[str, bytes]]


async def _wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class RelayResponse:
    """ASGI response for a streaming /v1/messages request."""

    def __init__(self, gw: Gateway, prep: Prepared, upstream_request: UpstreamRequest) -> None:
        self.gw = gw
        self.prep = prep
        self.upstream_request = upstream_request
        self.settings = gw.settings
        self.headers_sent = False
        self.content_sent = False
        self.last_write = 0.0
        self._send: Send | None = None
        self._lock = asyncio.Lock()  # the relay and the pinger both write
        self._pinger: asyncio.Task[None] | None = None
        self.status: int | str = "client_cancel"
        """What the client got: an HTTP status, `stream_error`, or `client_cancel` while unfinished."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._send = send
        relay = asyncio.ensure_future(self._run())
        watch = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait({relay, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            tasks = [relay, watch] + ([self._pinger] if self._pinger else [])
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            end_request(self.gw, self.prep.record, self.status)

    # -- writing to the client -------------------------------------------------------------

    async def _start(self) -> None:
        if self.headers_sent:
            return
        assert self._send is not None
        self.headers_sent = True
        await self._send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),
                ],
            }
        )
        start = StreamTranslator(model=self.prep.body.model, message_id=self.prep.message_id).start()
        await self._write(b"".join(encode_event(e) for e in start))
        self._pinger = asyncio.ensure_future(self._ping_while_silent())

    async def _ping_while_silent(self) -> None:
        """`event: ping` whenever the client has heard nothing for ping_interval_s (long prefills)."""
        every = self.settings.server.ping_interval_s
        while True:
            await asyncio.sleep(max(0.0, self.last_write + every - time.monotonic()))
            if time.monotonic() - self.last_write >= every:
                await self._write(PING)

    async def _write(self, data: bytes) -> None:
        assert self._send is not None
        async with self._lock:
            self.last_write = time.monotonic()
            await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def _end(self) -> None:
        assert self._send is not None
        await self._stop_pinger()
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _stop_pinger(self) -> None:
        if self._pinger is not None:
            self._pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pinger
            self._pinger = None

    async def _error(self, error: GatewayError) -> None:
        """End the exchange with an error: a real HTTP status if nothing was sent yet, else an event."""
        assert self._send is not None
        self.status = "stream_error" if self.headers_sent else error.status
        if not self.headers_sent:
            self.headers_sent = True
            headers = error_headers(error)
            await self._send({"type": "http.response.start", "status": error.status, "headers": headers})
            body = error_body(error.type, error.message, self.prep.request_id)
            await self._send({"type": "http.response.body", "body": body, "more_body": False})
            return
        kind = "overloaded_error" if error.retryable else "api_error"
        if error.status < 500 and not error.retryable:
            kind = error.type
        tr = StreamTranslator(model=self.prep.body.model, message_id=self.prep.message_id)
        await self._write(b"".join(encode_event(e) for e in tr.fail(kind, error.message)))
        await self._end()

    async def _wait(self, task: asyncio.Future[T], limit: float, since: float, node_id: str) -> T:
        """Await `task` (opening a node's response), starting the response after accept_wait_s (the
        pinger then keeps the client hearing from us).

        Raises NodeFailure('timeout') if the node stays silent for `limit` seconds after `since`.
        """
        accept_at = self.prep.received + self.settings.server.accept_wait_s
        while True:
            wake = since + limit if self.headers_sent else min(accept_at, since + limit)
            done, _ = await asyncio.wait({task}, timeout=max(0.0, wake - time.monotonic()))
            if done:
                return task.result()
            if time.monotonic() >= since + limit:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                raise NodeFailure("timeout", f"node {node_id} sent nothing for {limit:g}s")
            if not self.headers_sent:
                await self._start()

    # -- the relay -------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            # Once content has reached the client nothing is retried: the stream ends with an error event.
            await with_failover(self.gw, self.prep, self._attempt, stop=lambda: self.content_sent)
            self.status = 200
        except GatewayError as exc:
            await self._error(exc)
        except Exception:
            log.exception("relay failed for request %s", self.prep.request_id)
            await self._error(UpstreamError("internal error while relaying the stream"))

    async def _attempt(self, attempt: Attempt) -> None:
        node_id = attempt.decision.node_id
        node = self.gw.cluster.nodes[node_id]
        path, body = self.upstream_request(self.gw, self.prep, node_id)
        client = self.gw.cluster.clients[node_id]
        timeouts = self.settings.timeouts
        opening = asyncio.ensure_future(client.open_stream(path, body, self.prep.upstream_headers))
        try:
            stream = await self._wait(opening, timeouts.first_byte_s, attempt.started, node_id)
        except BaseException:
            opening.cancel()
            raise
        try:
            await self._start()
            if node.protocol == "anthropic":
                await self._relay_native(stream, attempt)
            else:
                await self._relay_chat(stream, attempt)
        except BaseException:
            await stream.aclose()
            raise
        try:
            await self._end()
        finally:
            await stream.release()
        await attempt.succeed()

    async def _chunks(self, stream: NodeStream, attempt: Attempt) -> AsyncIterator[bytes]:
        """Yield the node's bytes, enforcing silence limits (the pinger speaks to the client meanwhile)."""
        timeouts = self.settings.timeouts
        since = attempt.started
        loop = asyncio.get_running_loop()
        while True:
            limit = timeouts.between_chunks_s if self.content_sent else timeouts.first_byte_s
            try:
                async with asyncio.timeout_at(loop.time() + (since + limit - time.monotonic())):
                    chunk = await stream.next_chunk()
            except TimeoutError:
                raise NodeFailure("timeout", f"node {attempt.decision.node_id} sent nothing for {limit:g}s") from None
            if not chunk:
                return
            since = time.monotonic()
            yield chunk

    async def _relay_chat(self, stream: NodeStream, attempt: Attempt) -> None:
        node_id = attempt.decision.node_id
        stops = self.prep.body.stop_sequences if isinstance(self.prep.body.stop_sequences, list) else ()
        tr = StreamTranslator(model=self.prep.body.model, message_id=self.prep.message_id, stop_sequences=stops)
        decoder = SSEDecoder()
        done = False
        async for chunk in self._chunks(stream, attempt):
            out: list[bytes] = []
            self._bound_event(decoder, chunk, node_id)
            for msg in decoder.feed(chunk):
                if msg.comment is not None:
                    if time.monotonic() - self.last_write >= 1.0:
                        out.append(PING)  # node keepalive during prefill: let the client hear it
                    continue
                if msg.data is None:
                    continue
                if msg.data == "[DONE]":
                    done = True
                    break
                try:
                    parsed = decode_chunk(msg.data)
                except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
                    raise NodeFailure("protocol", f"node {node_id} sent an invalid stream chunk") from None
                out.extend(encode_event(e) for e in tr.feed(parsed))
            if tr.started_content and not self.content_sent:
                self.content_sent = True
                attempt.first_token()
            if out:
                await self._write(b"".join(out))
            if done:
                break
        if not (done or tr.finished):
            raise NodeFailure("stream_cut", f"node {node_id} ended the stream before finishing")
        attempt.prompt_tokens, attempt.cached_tokens = tr.prompt_tokens, tr.cached_tokens
        await self._write(b"".join(encode_event(e) for e in tr.finish()))

    async def _relay_native(self, stream: NodeStream, attempt: Attempt) -> None:
        """Pass a native Anthropic stream through, swallowing the node's message_start (ours went first)."""
        node_id = attempt.decision.node_id
        decoder = SSEDecoder()
        stopped = False
        async for chunk in self._chunks(stream, attempt):
            out: list[bytes] = []
            self._bound_event(decoder, chunk, node_id)
            for msg in decoder.feed(chunk):
                if msg.data is None:
                    continue
                name = msg.event or ""
                if name == "message_start":
                    self._native_usage(msg.data, attempt)
                    continue
                if name == "error" and not self.content_sent:
                    raise NodeFailure("http_5xx", f"node {node_id} reported an error before any content")
                if name == "content_block_start" and not self.content_sent:
                    self.content_sent = True
                    attempt.first_token()
                if name == "message_delta":
                    self._native_usage(msg.data, attempt)
                stopped = stopped or name in ("message_stop", "error")
                out.append(b"event: %s\ndata: %s\n\n" % (name.encode(), msg.data.encode()))
            if out:
                await self._write(b"".join(out))
        if not stopped:
            raise NodeFailure("stream_cut", f"node {node_id} ended the stream before message_stop")

    def _bound_event(self, decoder: SSEDecoder, chunk: bytes, node_id: str) -> None:
        """A node streaming one endless line or event would make the decoder hold it all: fail it first."""
        limit = self.settings.server.max_answer_bytes
        if decoder.pending + len(chunk) > limit:
            raise NodeFailure("protocol", f"node {node_id} sent a stream event over {limit} bytes")

    @staticmethod
    def _native_usage(data: str, attempt: Attempt) -> None:
        with contextlib.suppress(msgspec.DecodeError, RecursionError, ValueError, TypeError):
            event = msgspec.json.decode(data)
            if isinstance(event, dict):
                usage = (event.get("message") or {}).get("usage") or event.get("usage") or {}
                if isinstance(usage, dict):
                    cached = int(usage.get("cache_read_input_tokens") or 0)
                    fresh = int(usage.get("input_tokens") or 0)
                    if cached or fresh:
                        attempt.cached_tokens = cached
                        attempt.prompt_tokens = cached + fresh
