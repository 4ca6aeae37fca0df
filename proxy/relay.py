"""Streaming answers: an ASGI response that relays a node's stream to the client as Anthropic SSE.

Timeline of one streaming request:
  1. route, open the upstream request; wait up to `server.accept_wait_s` for the node's
     response headers so a node that refuses at once becomes a real HTTP status (529, 400 …);
  2. send 200 + `message_start` (at the latest after accept_wait_s) and `event: ping` whenever
     the client has heard nothing for `server.ping_interval_s` (long Mac prefills);
  3. translate chunks to events as they arrive and write them at once (no buffering);
  4. a node failure before any content was written → next node (same stream, same message);
     after content → an Anthropic `error` event ends the stream (never a fake end_turn).
  5. the node finished (chat: `[DONE]` or a finish_reason; native: message_stop) → the success is booked,
     then the last events go out and the node's connection is closed, without waiting for an HTTP/1.0
     node (mlx_lm.server) to close its socket.
The whole request, all attempts included, must be over by its deadline (`timeouts.stream_deadline_s` after
it arrived): a node still streaming then (dribbling bytes, keepalives forever) fails as a node timeout
and the stream ends with an `error` event; nothing is retried.
The client disconnecting cancels the relay, which closes the upstream response at once — unless the
answer was already finished (step 5): a client hanging up after the last byte cancels nothing; or copies of
the request joined the answer (proxy.joins): then it goes on for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, TypeVar

import msgspec
from starlette.types import Message, Receive, Scope, Send

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
from proxy.errors import GatewayError, UpstreamError, error_body, error_headers
from proxy.gateway import Gateway
from proxy.progress import prefill_progress
from proxy.sse import PING, SSEDecoder, encode_event
from proxy.stream import StreamTranslator
from proxy.upstream import NodeFailure, NodeStream
from proxy.wire.openai import decode_chunk

if TYPE_CHECKING:
    from proxy.joins import Generation

log = logging.getLogger("mlxmux.relay")
T = TypeVar("T")


UpstreamRequest = Callable[[Gateway, Prepared, str], tuple[str, bytes]]


FINISH_GRACE_S = 5.0
"""How long a finished stream may take to book its success, write its last bytes and close the node."""


SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


async def wait_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class RelayResponse:
    """ASGI response for a streaming /v1/messages request."""

    def __init__(
        self,
        gw: Gateway,
        prep: Prepared,
        upstream_request: UpstreamRequest,
        *,
        generation: Generation | None = None,
        resumed: bool = False,
    ) -> None:
        self.gw = gw
        self.prep = prep
        self.upstream_request = upstream_request
        self.settings = gw.settings
        self.generation = generation
        """The answer copies of this request may join (proxy.joins): every event written goes there too."""
        self.client_gone = False
        """The client went away while copies that joined still wait: the relay goes on, writing to them only."""
        self.headers_sent = resumed
        """True from the start when a joined copy takes over: its client already has message_start."""
        self.content_sent = False
        self.last_write = 0.0
        self._send: Send | None = None
        self._lock = asyncio.Lock()  # the relay and the pinger both write
        self._pinger: asyncio.Task[None] | None = None
        self.status: int | str = "client_cancel"
        """What the client got: an HTTP status, `stream_error`, or `client_cancel` while unfinished."""
        self.finishing = False
        """The node finished its answer (its success is booked first): a client hanging up now cancels nothing."""
        self.error_sent = False
        """An `error` event already went out (a native node's own): no second one."""
        self._booking: asyncio.Future[None] | None = None
        self.deadline = request_deadline(gw, prep)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._send = send
        relay = asyncio.ensure_future(self._run())
        watch = asyncio.ensure_future(wait_disconnect(receive))
        # Past the deadline the relay ends the stream itself (a node timeout); this backstop only stops one
        # stuck writing to a client that reads nothing, which is then that client's cancel.
        backstop = self.deadline + FINISH_GRACE_S - time.monotonic()
        try:
            await asyncio.wait(
                {relay, watch},
                timeout=None if math.isinf(backstop) else max(0.0, backstop),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if watch.done() and not relay.done() and not self.finishing and self.generation is not None:
                # The client went away: the answer goes on while copies of the request wait for it.
                self.client_gone = True
                await self.gw.joins.serve_others(self.generation, relay)
            if self.finishing and not relay.done():
                # The answer is complete; the client (or uvicorn, once the last byte is out) reported the
                # hang-up first. Let the relay end its own way: it only writes the tail and closes the node.
                await asyncio.wait({relay}, timeout=FINISH_GRACE_S)
        finally:
            tasks = [relay, watch] + ([self._pinger] if self._pinger else [])
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._booking is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(self._booking), FINISH_GRACE_S)
            if self.generation is not None:
                self.gw.joins.done(self.generation, self.status)
            end_request(self.gw, self.prep.record, "client_cancel" if self.client_gone else self.status)

    # -- writing to the client -------------------------------------------------------------

    async def _start(self) -> None:
        if not self.headers_sent:
            self.headers_sent = True
            await self._to_client({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            start = StreamTranslator(model=self.prep.body.model, message_id=self.prep.message_id).start()
            await self._write(b"".join(encode_event(e) for e in start))
        if self._pinger is None:
            self._pinger = asyncio.ensure_future(self._ping_while_silent())

    async def _to_client(self, message: Message) -> None:
        assert self._send is not None
        if not self.client_gone:
            await self._send(message)

    async def _ping_while_silent(self) -> None:
        """`event: ping` whenever the client has heard nothing for ping_interval_s (long prefills)."""
        every = self.settings.server.ping_interval_s
        while True:
            await asyncio.sleep(max(0.0, self.last_write + every - time.monotonic()))
            if time.monotonic() - self.last_write >= every:
                await self._write(PING)

    async def _write(self, data: bytes) -> None:
        if self.generation is not None and data is not PING:
            self.generation.append(data)
        async with self._lock:
            self.last_write = time.monotonic()
            await self._to_client({"type": "http.response.body", "body": data, "more_body": True})

    async def _end(self) -> None:
        await self._stop_pinger()
        await self._to_client({"type": "http.response.body", "body": b"", "more_body": False})

    async def _stop_pinger(self) -> None:
        if self._pinger is not None:
            self._pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pinger
            self._pinger = None

    async def _error(self, error: GatewayError) -> None:
        """End the exchange with an error: a real HTTP status if nothing was sent yet, else an event."""
        self.status = "stream_error" if self.headers_sent else error.status
        self.prep.record.error = error.message
        if not self.headers_sent:
            self.headers_sent = True
            if self.generation is not None:
                self.generation.fail(error)
            headers = error_headers(error)
            await self._to_client({"type": "http.response.start", "status": error.status, "headers": headers})
            body = error_body(error.type, error.message, self.prep.request_id)
            await self._to_client({"type": "http.response.body", "body": body, "more_body": False})
            return
        if self.error_sent:
            await self._end()
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

        Raises NodeFailure('timeout') if the node stays silent for `limit` seconds after `since`, or
        the request's deadline passes first.
        """
        accept_at = self.prep.received + self.settings.server.accept_wait_s
        give_up = min(since + limit, self.deadline)
        while True:
            wake = give_up if self.headers_sent else min(accept_at, give_up)
            done, _ = await asyncio.wait({task}, timeout=max(0.0, wake - time.monotonic()))
            if done:
                return task.result()
            if time.monotonic() >= give_up:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                if give_up == self.deadline:
                    raise deadline_failure(self.gw, node_id)
                raise NodeFailure("timeout", f"node {node_id} sent nothing for {limit:g}s")
            if not self.headers_sent:
                await self._start()

    # -- the relay -------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            # Once content has reached the client nothing is retried: the stream ends with an error event.
            # Nor once the deadline has passed.
            await with_failover(self.gw, self.prep, self._attempt, stop=self._no_more_attempts)
            self.status = 200
        except GatewayError as exc:
            await self._error(exc)
        except Exception:
            log.exception("relay failed for request %s", self.prep.request_id)
            await self._error(UpstreamError("internal error while relaying the stream"))

    def _no_more_attempts(self) -> bool:
        return self.content_sent or past_deadline(self.deadline)

    async def _attempt(self, attempt: Attempt) -> None:
        node_id = attempt.decision.node_id
        node = self.gw.cluster.nodes[node_id]
        path, body = self.upstream_request(self.gw, self.prep, node_id)
        client = self.gw.cluster.clients[node_id]
        timeouts = self.settings.timeouts
        if self.generation is not None:
            attempt.progress.waiting = self.generation.waiting
        opening = asyncio.ensure_future(client.open_stream(path, body, self.prep.upstream_headers))
        try:
            stream = await self._wait(opening, timeouts.first_byte_s, attempt.started, node_id)
        except BaseException:
            opening.cancel()
            raise
        try:
            await self._start()
            if node.protocol == "anthropic":
                tail = await self._relay_native(stream, attempt)
            else:
                tail = await self._relay_chat(stream, attempt)
        except BaseException:
            await stream.aclose()
            raise
        await self._complete(attempt, stream, tail)

    async def _complete(self, attempt: Attempt, stream: NodeStream, tail: bytes) -> None:
        """The node finished its answer (chat: `[DONE]` or a finish_reason; native: message_stop).

        The success is booked first, exactly once and shielded from cancellation, then `tail` (the
        message_delta/message_stop the client has not seen yet) is written and the response ended: a
        client that hangs up the moment it has the last byte, or a node that closes its socket a little
        after `[DONE]` (mlx_lm.server's HTTP/1.0), cannot turn a success into a cancel or a failure.
        """
        self.finishing = True
        self.status = 200
        self._booking = asyncio.ensure_future(attempt.succeed())
        try:
            try:
                await asyncio.shield(self._booking)
            except Exception:  # the books, not the answer, are at fault: the client still gets its end
                log.exception("could not book the success of request %s", self.prep.request_id)
            await self._write(tail)
            await self._end()
        finally:
            await stream.release()

    async def _chunks(self, stream: NodeStream, attempt: Attempt) -> AsyncIterator[bytes]:
        """Yield the node's bytes, enforcing silence limits and the request's deadline (the pinger speaks to
        the client meanwhile): a node dribbling bytes or keepalives cannot hold the request forever."""
        timeouts = self.settings.timeouts
        since = attempt.started
        loop = asyncio.get_running_loop()
        node_id = attempt.decision.node_id
        while True:
            limit = timeouts.between_chunks_s if self.content_sent else timeouts.first_byte_s
            give_up = min(since + limit, self.deadline)
            try:
                async with asyncio.timeout_at(loop.time() + (give_up - time.monotonic())):
                    chunk = await stream.next_chunk()
            except TimeoutError:
                if give_up == self.deadline:
                    raise deadline_failure(self.gw, node_id) from None
                raise NodeFailure("timeout", f"node {node_id} sent nothing for {limit:g}s") from None
            if not chunk:
                return
            since = time.monotonic()
            yield chunk

    async def _relay_chat(self, stream: NodeStream, attempt: Attempt) -> bytes:
        """Translate the node's chat stream; returns the closing events (message_delta, message_stop),
        written once the success is booked."""
        node_id = attempt.decision.node_id
        stops = self.prep.body.stop_sequences if isinstance(self.prep.body.stop_sequences, list) else ()
        tr = StreamTranslator(model=self.prep.body.model, message_id=self.prep.message_id, stop_sequences=stops)
        decoder = SSEDecoder()
        done = False
        try:
            async for chunk in self._chunks(stream, attempt):
                out: list[bytes] = []
                self._bound_event(decoder, chunk, node_id)
                for msg in decoder.feed(chunk):
                    if msg.comment is not None:
                        if (reported := prefill_progress(msg.comment)) is not None:
                            attempt.progress.prefill(*reported)
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
                if tr.started_content:
                    attempt.progress.token()
                    if not self.content_sent:
                        self.content_sent = True
                        attempt.first_token()
                if out:
                    await self._write(b"".join(out))
                if done:
                    break
        except NodeFailure:
            if not tr.finished:
                raise
            # The node had sent its finish_reason: whatever breaks after it (the socket, the usage
            # chunk) leaves a complete answer.
        if not (done or tr.finished):
            raise NodeFailure("stream_cut", f"node {node_id} ended the stream before finishing")
        attempt.prompt_tokens, attempt.cached_tokens = tr.prompt_tokens, tr.cached_tokens
        attempt.completion_tokens = tr.output_tokens
        return b"".join(encode_event(e) for e in tr.finish())

    async def _relay_native(self, stream: NodeStream, attempt: Attempt) -> bytes:
        """Pass a native Anthropic stream through, swallowing the node's message_start (ours went first).

        Returns the node's message_stop event (written once the success is booked) as soon as it
        arrives, whatever the node's socket does after it. A node's `error` event is passed through and
        fails the attempt (before any content: another node is tried).
        """
        node_id = attempt.decision.node_id
        decoder = SSEDecoder()
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
                if name == "content_block_delta":
                    attempt.progress.token()
                if name == "content_block_start" and not self.content_sent:
                    self.content_sent = True
                    attempt.first_token()
                if name == "message_delta":
                    self._native_usage(msg.data, attempt)
                event = b"event: %s\ndata: %s\n\n" % (name.encode(), msg.data.encode())
                if name == "message_stop":
                    if out:
                        await self._write(b"".join(out))
                    return event
                if name == "error":
                    await self._write(b"".join([*out, event]))
                    self.error_sent = True
                    raise NodeFailure("http_5xx", f"node {node_id} reported an error mid-stream")
                out.append(event)
            if out:
                await self._write(b"".join(out))
        raise NodeFailure("stream_cut", f"node {node_id} ended the stream before message_stop")

    def _bound_event(self, decoder: SSEDecoder, chunk: bytes, node_id: str) -> None:
        """A node streaming one endless line or event would make the decoder hold it all: fail it first."""
        limit = self.settings.server.max_answer_bytes
        if decoder.pending + len(chunk) > limit:
            raise NodeFailure("protocol", f"node {node_id} sent a stream event over {limit} bytes", oversized=True)

    @staticmethod
    def _native_usage(data: str, attempt: Attempt) -> None:
        with contextlib.suppress(msgspec.DecodeError, RecursionError, ValueError, TypeError):
            event = msgspec.json.decode(data)
            if isinstance(event, dict):
                message = event.get("message")
                usage = (message.get("usage") if isinstance(message, dict) else None) or event.get("usage")
                native_usage(usage, attempt)
