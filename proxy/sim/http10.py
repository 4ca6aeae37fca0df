"""An HTTP/1.0 server for the simulated node, on the wire like mlx_lm.server's `BaseHTTPRequestHandler`.

What a client sees, as from the real server (mlx-lm 0.32.2, measured):

- one request per connection; the status line says `HTTP/1.0`, then `Server: BaseHTTP/0.6 Python/...` and
  `Date:`, then the handler's headers. Whatever the request's version, the server closes the connection
  after every response;
- a body without `Content-Length` (streams, errors, `/health`, `/v1/models`) ends when the server closes the
  socket: there is no chunked encoding, so a client knows a stream is complete only from `data: [DONE]`;
- the close comes a moment after the last byte (`close_delay_s`, `--close-delay-ms`; the real server takes
  about 0.1 ms, more after an error whose traceback it prints first).

The app is plain ASGI (`proxy.sim.app.SimApp`), so the same app also runs under uvicorn (`--http 1.1`).
Two things ASGI has no word for are reached through `send.__self__` (see `proxy.sim.asgi`): closing the
connection with no response or mid-body (`transport`), and a custom reason phrase in the status line (the
`reason` key of `http.response.start`, as `BaseHTTPRequestHandler.send_error` writes for 501).

The server reads the request head (at most 64 KiB) and a body of `Content-Length` bytes; a request without
that header gets an empty body (mlx answers 411 itself). After the body it keeps reading and discarding:
end of file means the client went away, which `receive()` reports as `http.disconnect` (the real server only
notices when a write fails; the sim stops generating at once).
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import logging
import platform
import signal
import socket
import struct
from email.utils import formatdate
from typing import Any

from starlette.types import ASGIApp, Message

log = logging.getLogger("mlxmux.sim")

SERVER_HEADER = f"BaseHTTP/0.6 Python/{platform.python_version()}"
MAX_HEAD_BYTES = 65536


def reason_phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


class Connection:
    """One client connection: one request, one response, then close. Its `send`/`receive` go to the app."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, close_delay_s: float) -> None:
        self.reader = reader
        self.writer = writer
        self.close_delay_s = close_delay_s
        self.body = b""
        self._body_taken = False
        self._started = False
        self._gone = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None

    @property
    def transport(self) -> asyncio.BaseTransport:
        """The TCP transport, for `proxy.sim.asgi.close_transport` (closing mid-response on purpose)."""
        return self.writer.transport

    async def run(self, app: ASGIApp, server: tuple[str, int]) -> None:
        scope = await self._read_request(server)
        if scope is None:
            return
        self._watcher = asyncio.ensure_future(self._watch())
        try:
            await app(scope, self.receive, self.send)
        finally:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self._finish()

    async def _read_request(self, server: tuple[str, int]) -> dict[str, Any] | None:
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return None
        lines = head[:-4].decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            await self._plain_error(400, f"Bad request syntax ({lines[0]!r})")
            return None
        method, target, version = parts
        headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name.strip().lower().encode("latin-1"), value.strip().encode("latin-1")))
        length = next((v for k, v in headers if k == b"content-length"), None)
        if length is not None and length.isdigit():
            try:
                self.body = await self.reader.readexactly(int(length))
            except (asyncio.IncompleteReadError, ConnectionError):
                return None
        path, _, query = target.partition("?")
        peer = self.writer.get_extra_info("peername") or ("", 0)
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": version.removeprefix("HTTP/"),
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode("latin-1"),
            "query_string": query.encode("latin-1"),
            "root_path": "",
            "headers": headers,
            "client": (peer[0], peer[1]),
            "server": server,
        }

    async def _watch(self) -> None:
        """Read (and drop) whatever else the client sends; end of file means it went away."""
        with contextlib.suppress(ConnectionError, OSError):
            while await self.reader.read(65536):
                pass
        self._gone.set()

    async def receive(self) -> Message:
        if not self._body_taken:
            self._body_taken = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self._gone.is_set() or self.writer.transport.is_closing():
            return  # the client left or the app hung up: nothing more to write (as uvicorn does)
        if message["type"] == "http.response.start":
            status = int(message["status"])
            reason = message.get("reason") or reason_phrase(status)
            lines = [f"HTTP/1.0 {status} {reason}", f"Server: {SERVER_HEADER}", f"Date: {formatdate(usegmt=True)}"]
            lines += [f"{k.decode('latin-1')}: {v.decode('latin-1')}" for k, v in message.get("headers", [])]
            self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
            self._started = True
        elif message["type"] == "http.response.body":
            body = message.get("body", b"")
            if body:
                self.writer.write(body)
        await self._drain()

    async def _drain(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, OSError):
            self._gone.set()

    async def _finish(self) -> None:
        """After the response: a moment, then close (FIN). No response at all: close at once."""
        if self._started and not self._gone.is_set() and not self.writer.transport.is_closing():
            await self._drain()
            if self.close_delay_s > 0:
                await asyncio.sleep(self.close_delay_s)
        self.close()

    async def _plain_error(self, status: int, message: str) -> None:
        """What `BaseHTTPRequestHandler.send_error` writes for a request it cannot parse."""
        body = error_page(status, message)
        headers = error_page_headers(body)
        await self.send({"type": "http.response.start", "status": status, "reason": message, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})
        await self._finish()

    def close(self) -> None:
        if not self.writer.transport.is_closing():
            self.writer.close()


def error_page(status: int, message: str) -> bytes:
    """The HTML body `BaseHTTPRequestHandler.send_error` sends (e.g. 501 for a method mlx does not handle)."""
    from http.server import BaseHTTPRequestHandler

    explain = BaseHTTPRequestHandler.responses.get(http.HTTPStatus(status), ("", ""))[1]
    page = BaseHTTPRequestHandler.error_message_format % {
        "code": status,
        "message": message,
        "explain": explain,
    }
    return page.encode("utf-8", "replace")


def error_page_headers(body: bytes) -> list[tuple[bytes, bytes]]:
    return [
        (b"Connection", b"close"),
        (b"Content-Type", b"text/html;charset=utf-8"),
        (b"Content-Length", str(len(body)).encode()),
    ]


def reset_transport(transport: Any) -> bool:
    """Abort a TCP connection with a reset (RST) instead of a normal close; False if not a socket transport."""
    sock = transport.get_extra_info("socket") if hasattr(transport, "get_extra_info") else None
    if sock is None or not hasattr(transport, "abort"):
        return False
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
    return True


class Http10Server:
    """Serve an ASGI app over HTTP/1.0 (`BaseHTTPRequestHandler` manners); `uvicorn.Server`'s small interface.

    `await server.serve()` runs until `should_exit` is set (or SIGINT/SIGTERM with `capture_signals`);
    `started` is True once it listens; `run()` is `asyncio.run(serve())`. On exit, requests still running get
    `graceful_s` to finish, then are cancelled.
    """

    def __init__(
        self,
        app: ASGIApp,
        host: str,
        port: int,
        *,
        close_delay_s: float = 0.005,
        capture_signals: bool = True,
        graceful_s: float = 1.0,
    ) -> None:
        self.app = app
        self.host = host
        self.port = port
        self.close_delay_s = close_delay_s
        self.capture_signals = capture_signals
        self.graceful_s = graceful_s
        self.started = False
        self._exit = asyncio.Event()
        self.sockets: list[Any] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        conn = Connection(reader, writer, self.close_delay_s)
        try:
            await conn.run(self.app, (self.host, self.port))
        except asyncio.CancelledError:
            pass
        except Exception:
            log.exception("sim node: error while serving a request")
        finally:
            conn.close()
            if task is not None:
                self._tasks.discard(task)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM) if self.capture_signals else ()
        for sig in signals:
            loop.add_signal_handler(sig, self._exit.set)
        server = await asyncio.start_server(
            self._connection, self.host, self.port, limit=MAX_HEAD_BYTES, backlog=1024, reuse_address=True
        )
        self.sockets = [s._sock if hasattr(s, "_sock") else s for s in server.sockets]
        self.started = True
        try:
            await self._exit.wait()
        finally:
            server.close()
            if self._tasks:
                _, pending = await asyncio.wait(set(self._tasks), timeout=self.graceful_s)
                for t in pending:
                    t.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
            for sig in signals:
                loop.remove_signal_handler(sig)

    @property
    def should_exit(self) -> bool:
        return self._exit.is_set()

    @should_exit.setter
    def should_exit(self, value: bool) -> None:
        if value:
            self._exit.set()
        else:
            self._exit.clear()

    def run(self) -> None:
        asyncio.run(self.serve())
