"""The response of a resent request that joined the answer in flight (proxy.joins explains joining)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.attempts import Prepared, end_request
from proxy.errors import GatewayError, error_body, error_headers
from proxy.gateway import Gateway
from proxy.joins import End, JoinSource
from proxy.relay import SSE_HEADERS, wait_disconnect
from proxy.sse import PING, encode_event
from proxy.stream import StreamTranslator

log = logging.getLogger("mlxmux.joins")

TakeOver = Callable[[bool], ASGIApp]
"""Given whether message_start already went out: the response that asks a node instead."""


class JoinedResponse:
    """The ASGI response of a copy that joined an answer in flight: the owner's events as they come, and
    `ping` while there are none for `server.ping_interval_s`."""

    def __init__(self, gw: Gateway, prep: Prepared, source: JoinSource, take_over: TakeOver) -> None:
        self.gw = gw
        self.prep = prep
        self.source = source
        self.take_over = take_over
        """The response that takes over when the answer is lost before any content reached this client."""
        self.status: int | str = "client_cancel"
        self.sent = 0
        """Events of the answer written to this client (the first is message_start)."""
        self.headers_sent = False
        self.taking_over = False
        self.last_write = 0.0
        self._send: Send | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._send = send
        record = self.prep.record
        record.reason = "joined"
        run = asyncio.ensure_future(self._run())
        watch = asyncio.ensure_future(wait_disconnect(receive))
        try:
            await asyncio.wait({run, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (run, watch):
                task.cancel()
            await asyncio.gather(run, watch, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.shield(self.source.leave())
        if self.taking_over and not watch.done():
            log.info("request %s: the answer it joined was lost; asking a node", self.prep.request_id)
            await self.take_over(self.headers_sent)(scope, receive, send)
            return
        end_request(self.gw, record, self.status)

    async def _run(self) -> None:
        every = self.gw.settings.server.ping_interval_s
        while True:
            silence = time.monotonic() - self.last_write
            batch = await self.source.next(self.sent, max(0.05, every - silence) if self.headers_sent else every)
            if batch is None:
                if self.headers_sent and time.monotonic() - self.last_write >= every:
                    await self._write(PING)
                continue
            for event in batch.events:
                await self._write(event)
                self.sent += 1
            end = batch.end
            if end is not None and self.sent >= end.n:
                await self._finish(end)
                return
            if batch.gone:
                await self._lost()
                return

    async def _finish(self, end: End) -> None:
        if end.status in (200, "stream_error"):
            self.status = end.status
            await self._close()
        elif isinstance(end.status, int) and not self.headers_sent:
            # the owner's answer was an HTTP error before any event: the same one
            error = GatewayError(end.message, retry_after=end.retry_after)
            error.status, error.type = end.status, end.type
            assert self._send is not None
            self.headers_sent = True
            await self._send({"type": "http.response.start", "status": end.status, "headers": error_headers(error)})
            body = error_body(end.type, end.message, self.prep.request_id)
            await self._send({"type": "http.response.body", "body": body, "more_body": False})
            self.status = end.status
        else:
            await self._lost()

    async def _lost(self) -> None:
        """The answer will not be finished (its owner went away): ask a node, or, if content already reached
        this client, end with an error event it retries."""
        if self.sent <= 1:
            self.taking_over = True
            return
        tr = StreamTranslator(model=self.prep.body.model, message_id=self.prep.message_id)
        message = "the answer this request joined was lost (its gateway replica went away); retry"
        await self._write(b"".join(encode_event(e) for e in tr.fail("overloaded_error", message)))
        await self._close()
        self.status = "stream_error"

    async def _write(self, data: bytes) -> None:
        assert self._send is not None
        if not self.headers_sent:
            self.headers_sent = True
            await self._send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
        self.last_write = time.monotonic()
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def _close(self) -> None:
        assert self._send is not None
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})
