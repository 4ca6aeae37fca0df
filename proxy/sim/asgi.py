"""Low-level ASGI helpers for the simulated node: mlx-shaped responses, body reading, hanging up.

Headers are written with mlx_lm.server's spelling (`Content-type`, then the CORS headers; `Content-Length`
only where mlx sends one: a non-streaming completion). Hanging up without a response (or mid-body) is not
part of ASGI: both servers the sim runs under (`proxy.sim.http10` and uvicorn) expose the TCP transport on
`send.__self__.transport`; `close_transport` closes it (FIN), `reset_transport` aborts it (RST). Under
another server they return False and the caller falls back to raising (the server then answers 500 or closes).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from starlette.types import Receive, Send

from proxy.sim.http10 import reset_transport as _reset

JSON = b"application/json"
CORS = [
    (b"Access-Control-Allow-Origin", b"*"),
    (b"Access-Control-Allow-Methods", b"*"),
    (b"Access-Control-Allow-Headers", b"*"),
]


class DropConnection(Exception):
    """Close the client's connection now, with whatever was sent so far (mlx's failure modes).

    `reset`: abort with a TCP reset instead of a normal close (a connection broken mid-stream).
    """

    def __init__(self, *, reset: bool = False) -> None:
        super().__init__("reset" if reset else "close")
        self.reset = reset


class ResponseEnded(Exception):
    """The response was ended early on purpose (a fault); stop generating."""


def mlx_headers(
    content_type: bytes = JSON, *, length: int | None = None, cors: bool = True
) -> list[tuple[bytes, bytes]]:
    """Response headers as mlx_lm.server writes them (`_set_completion_headers`, then maybe a length)."""
    headers = [(b"Content-type", content_type), *(CORS if cors else [])]
    if length is not None:
        headers.append((b"Content-Length", str(length).encode()))
    return headers


async def send_response(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes = JSON,
    *,
    length: bool = False,
    cors: bool = True,
    reason: str | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """One whole response. Without `length` the body ends when the connection closes (mlx's errors, /health)."""
    if headers is None:
        headers = mlx_headers(content_type, length=len(body) if length else None, cors=cors)
    start: dict[str, Any] = {"type": "http.response.start", "status": status, "headers": headers}
    if reason:
        start["reason"] = reason
    await send(start)
    await send({"type": "http.response.body", "body": body})


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client went away first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def wait_disconnect(receive: Receive) -> None:
    """Return when the client goes away (call it once the body was read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def _transport(send: Send) -> Any:
    return getattr(getattr(send, "__self__", None), "transport", None)


def close_transport(send: Send) -> bool:
    """Close the TCP connection under this request; False if the server does not expose it."""
    transport = _transport(send)
    if transport is None or not hasattr(transport, "close"):
        return False
    transport.close()
    return True


def reset_transport(send: Send) -> bool:
    """Abort the TCP connection under this request with a reset; False if the server does not expose it."""
    transport = _transport(send)
    return transport is not None and _reset(transport)


async def drop(send: Send, receive: Receive, *, reset: bool = False) -> None:
    """Close (or reset) the connection with no more bytes and wait until the server notices."""
    if not (reset_transport(send) if reset else close_transport(send)):
        raise RuntimeError("sim fault: cannot close the connection under this server")
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(wait_disconnect(receive), 2.0)
