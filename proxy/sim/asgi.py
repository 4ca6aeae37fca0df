"""Low-level ASGI helpers for the simulated node: plain responses, body reading, hanging up.

Hanging up without a response (or mid-body) is not part of ASGI. uvicorn's `send` is a bound method of
its request cycle, which holds the TCP transport; `close_transport` closes that. Under another server
it returns False and the caller falls back to raising (the server then answers 500 or closes).
"""

from __future__ import annotations

import asyncio
import contextlib

from starlette.types import Receive, Send

CORS = [
    (b"access-control-allow-origin", b"*"),
    (b"access-control-allow-methods", b"*"),
    (b"access-control-allow-headers", b"*"),
]


class DropConnection(Exception):
    """Close the client's connection now, with whatever was sent so far (mlx's failure modes)."""


class ResponseEnded(Exception):
    """The response was ended early on purpose (a fault); stop generating."""


async def send_response(
    send: Send, status: int, body: bytes, content_type: bytes = b"application/json", cors: bool = True
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (CORS if cors else [])})
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


def close_transport(send: Send) -> bool:
    """Close the TCP connection under this request; False if the server does not expose it (not uvicorn)."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    if transport is None or not hasattr(transport, "close"):
        return False
    transport.close()
    return True


async def drop(send: Send, receive: Receive) -> None:
    """Close the connection with no more bytes and wait until the server notices."""
    if not close_transport(send):
        raise RuntimeError("sim fault: cannot close the connection under this server")
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(wait_disconnect(receive), 2.0)
