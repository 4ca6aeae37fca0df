"""The one module that talks to inference nodes (httpx).

One pooled `httpx.AsyncClient` per node. Errors are classified here into the small vocabulary
the rest of the gateway uses (`NodeFailure.kind`): connect, timeout, http_5xx, http_4xx,
protocol. Streams are always closed by the caller (`NodeStream.aclose`), including when the
client goes away, so an abandoned generation stops on the node at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import httpx
import msgspec

from proxy.config import NodeConfig, TimeoutConfig


class NodeFailure(Exception):
    """A node did not serve a request. `kind` is connect, timeout, http_5xx, http_4xx or protocol."""

    def __init__(self, kind: str, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status

    @property
    def retryable(self) -> bool:
        """Another node may succeed: everything but a 4xx (a bad request is bad everywhere)."""
        return self.kind != "http_4xx"


def node_error_message(status: int, body: bytes) -> str:
    """The node's own words from an error body: mlx `{"error": "..."}`, OpenAI or Anthropic shapes, or text."""
    text = body[:2000].decode("utf-8", "replace").strip()
    try:
        data = msgspec.json.decode(body[:65536])
    except (msgspec.DecodeError, RecursionError):
        return text or f"node answered HTTP {status}"
    if isinstance(data, dict):
        err = data.get("error", data.get("message"))
        if isinstance(err, dict):
            err = err.get("message", err)
        if err:
            return str(err)[:2000]
    return text or f"node answered HTTP {status}"


class NodeStream:
    """An open streaming response from a node: iterate raw bytes, then `aclose()`."""

    def __init__(self, response: httpx.Response, client: NodeClient) -> None:
        self.response = response
        self._client = client
        self._iter = response.aiter_raw()

    async def next_chunk(self) -> bytes:
        """The next bytes the node sent; b"" at a clean end. Raises NodeFailure if the connection breaks."""
        try:
            return await self._iter.__anext__()
        except StopAsyncIteration:
            return b""
        except httpx.TransportError as exc:
            raise NodeFailure("stream_cut", f"node {self._client.node.id} broke the stream: {exc!r}") from None

    async def aclose(self) -> None:
        await self.response.aclose()

    async def release(self, grace: float = 0.5) -> None:
        """Close after a finished stream, first reading what is left of the body (the last chunk
        marker, after `data: [DONE]`) for up to `grace` seconds, so the connection goes back to the
        pool instead of being dropped: the next request skips a TCP connect."""
        try:
            async with asyncio.timeout(grace):
                async for _ in self._iter:
                    pass
        except (TimeoutError, httpx.HTTPError):
            pass
        finally:
            await self.response.aclose()


class NodeClient:
    """HTTP client for one node."""

    def __init__(
        self, node: NodeConfig, timeouts: TimeoutConfig, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.node = node
        self.timeouts = timeouts
        headers = {"user-agent": "mlxmux"}
        if node.api_key:
            headers["authorization"] = f"Bearer {node.api_key}"
        # Reads are bounded by the caller (first-byte vs between-chunk silence), not by httpx.
        timeout = httpx.Timeout(connect=timeouts.connect_s, read=None, write=60.0, pool=timeouts.connect_s)
        # Idle pooled connections are dropped after 2 s, before servers close them (uvicorn-based nodes
        # after 5 s): reusing one the server is closing loses the request ("disconnected without a response").
        limits = httpx.Limits(
            max_connections=max(64, node.max_concurrency * 8), max_keepalive_connections=32, keepalive_expiry=2.0
        )
        self._client = httpx.AsyncClient(
            base_url=node.url, headers=headers, timeout=timeout, limits=limits, transport=transport
        )

    def _classify(self, exc: httpx.HTTPError) -> NodeFailure:
        nid = self.node.id
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
            return NodeFailure("connect", f"node {nid} is unreachable: {type(exc).__name__}")
        if isinstance(exc, httpx.TimeoutException):
            return NodeFailure("timeout", f"node {nid} timed out")
        return NodeFailure("protocol", f"node {nid} failed: {type(exc).__name__}: {exc}")

    async def _check(self, response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        try:
            body = await asyncio.wait_for(response.aread(), timeout=5.0)
        except (httpx.HTTPError, TimeoutError):
            body = b""
        finally:
            await response.aclose()
        kind = "http_4xx" if response.status_code < 500 else "http_5xx"
        raise NodeFailure(kind, node_error_message(response.status_code, body), status=response.status_code)

    async def open_stream(self, path: str, body: bytes, headers: Mapping[str, str] | None = None) -> NodeStream:
        """POST and return once the node's response headers arrive (status checked)."""
        request = self._client.build_request(
            "POST", path, content=body, headers={"content-type": "application/json", **(headers or {})}
        )
        try:
            try:
                response = await self._client.send(request, stream=True)
            except httpx.RemoteProtocolError:
                # A pooled connection the node had just closed: it never saw the request. Once more, on a
                # fresh connection (a node that really hangs up on every request fails again, and is blamed).
                response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise self._classify(exc) from None
        await self._check(response)
        return NodeStream(response, self)

    async def post(
        self,
        path: str,
        body: bytes,
        *,
        timeout: float,
        headers: Mapping[str, str] | None = None,
        max_bytes: int = 64 * 1024 * 1024,
    ) -> bytes:
        """POST and read the whole (bounded) response body within `timeout` seconds."""
        stream: NodeStream | None = None
        try:
            async with asyncio.timeout(timeout):
                stream = await self.open_stream(path, body, headers)
                chunks: list[bytes] = []
                size = 0
                while chunk := await stream.next_chunk():
                    size += len(chunk)
                    if size > max_bytes:
                        raise NodeFailure("protocol", f"node {self.node.id} sent a response over {max_bytes} bytes")
                    chunks.append(chunk)
            return b"".join(chunks)
        except TimeoutError:
            raise NodeFailure("timeout", f"node {self.node.id} sent no complete answer in {timeout:g}s") from None
        finally:
            if stream is not None:
                await stream.aclose()

    async def get(self, path: str, *, timeout: float, max_bytes: int = 1024 * 1024) -> tuple[int, bytes]:
        """GET for probes: (status, body), the body cut at `max_bytes` (a model list is a few KB; a node
        answering something huge must not fill the gateway's memory). Raises NodeFailure on transport
        errors and timeouts."""
        try:
            async with asyncio.timeout(timeout), self._client.stream("GET", path, timeout=timeout) as r:
                body = bytearray()
                async for chunk in r.aiter_bytes():  # decoded: a node may gzip its model list
                    body += chunk
                    if len(body) >= max_bytes:
                        break
                return r.status_code, bytes(body[:max_bytes])
        except httpx.HTTPError as exc:
            raise self._classify(exc) from None
        except TimeoutError:
            raise NodeFailure("timeout", f"node {self.node.id} did not answer GET {path} in {timeout:g}s") from None

    async def aclose(self) -> None:
        await self._client.aclose()
