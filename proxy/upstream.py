"""The one module that talks to inference nodes (httpx).

One pooled `httpx.AsyncClient` per node (and a small one of its own for probes, so probes never wait
behind a full request pool). Errors are classified here into the small vocabulary the rest of the
gateway uses (`NodeFailure.kind`), and each kind says whose fault it was (`NodeFailure.blames_node`):

    kind            whose fault         what it is
    connect         the node            refused, reset or unreachable while connecting
    timeout         the node            no answer (headers, bytes, a whole body) in time
    http_5xx        the node            it answered 5xx
    stream_cut      the node            the connection broke, or the stream ended unfinished
    protocol        the node            it broke HTTP or sent something that is not a valid answer
    http_4xx        the request         the node refused the request
    request_header  the request         a header taken from the client's request cannot be sent
    pool_wait       the gateway         every pooled connection to the node was busy (the gateway is full)
    gateway         the gateway         its own HTTP client refused (bad URL, local protocol error,
                                        out of sockets or file descriptors)

Only the node's own failures count against its health. Streams are always closed by the caller
(`NodeStream.aclose`), including when the client goes away, so an abandoned generation stops on the
node at once.
"""

from __future__ import annotations

import asyncio
import errno
import re
import socket
from collections.abc import Iterator, Mapping
from urllib.parse import urlsplit

import httpx
import msgspec

from proxy.config import NodeConfig, TimeoutConfig, redact_credentials, redact_url
from proxy.loop import GATEWAY_ID, HOP_HEADER

NODE_KINDS = frozenset({"connect", "timeout", "http_5xx", "stream_cut", "protocol"})
"""Failure kinds the node caused: only these count against its health."""
GATEWAY_KINDS = frozenset({"pool_wait", "gateway"})
"""Failure kinds the gateway caused: they count against nothing; another node (its own pool, URL) may work."""
REQUEST_KINDS = frozenset({"http_4xx", "request_header"})
"""Failure kinds the request caused: they count against nothing and are not retried (bad everywhere)."""

# A header value that every HTTP/1.1 stack sends and reads back unchanged: visible ASCII and inner spaces.
_SENDABLE_HEADER = re.compile(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?")
# OS errors while connecting that mean the gateway's machine ran out of something, not that the node is away.
_LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.EADDRNOTAVAIL})
# OS errors while connecting that say the node's host cannot be reached over the network.
_UNREACHABLE_ERRNOS = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN})


class NodeFailure(Exception):
    """A request was not served on a node. `kind` says what happened and whose fault it was (module doc).

    The message goes to clients, logs and the node's health record (`last_error`, /cluster): any
    user:password of a URL in it (an httpx error, a node's error page) is replaced by `***`."""

    def __init__(self, kind: str, message: str, *, status: int | None = None, oversized: bool = False) -> None:
        message = redact_credentials(message)
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.oversized = oversized
        """The node sent more than the gateway accepts (an answer or event over its cap): no request asks
        for that, so it never makes two nodes' failures "the same way"."""

    @property
    def blames_node(self) -> bool:
        """Whether the node caused it (connect, timeout, 5xx, broken stream or answer): only then it
        counts against the node's health. A 4xx, the gateway's own errors and a full pool never do."""
        return self.kind in NODE_KINDS

    @property
    def retryable(self) -> bool:
        """Another node may succeed: not after a 4xx or an unsendable client header (bad everywhere)."""
        return self.kind not in REQUEST_KINDS


def unsendable_header(headers: Mapping[str, str]) -> str | None:
    """The name of the first header whose value cannot be sent as it is (control characters such as
    CR/LF, non-ASCII, leading or trailing spaces, empty), else None."""
    for name, value in headers.items():
        if not _SENDABLE_HEADER.fullmatch(value):
            return name
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and its causes (httpx wraps httpcore's error, which wraps the OS error)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _local_os_error(exc: BaseException) -> OSError | None:
    """An OSError in the exception's chain that the gateway's own machine raised (no free socket or fd)."""
    return next((e for e in _chain(exc) if isinstance(e, OSError) and e.errno in _LOCAL_ERRNOS), None)


def connect_error_message(node_id: str, url: str, exc: BaseException, connect_s: float) -> str:
    """Why a connection to a node failed, in words that say where to look: a name that does not resolve
    (DNS), a port nobody listens on (refused), a host that does not answer (timeout) or cannot be reached.
    The URL is shown with any user:password replaced by `***`."""
    shown = redact_url(url)
    for cause in _chain(exc):
        if isinstance(cause, socket.gaierror):
            host = urlsplit(url).hostname
            return f"node {node_id}: cannot resolve host {host!r} (DNS: {cause.strerror}) in {shown}"
        if isinstance(cause, ConnectionRefusedError):
            return f"node {node_id}: connection refused at {shown} (no server listening on that port)"
        if isinstance(cause, OSError) and cause.errno in _UNREACHABLE_ERRNOS:
            return f"node {node_id}: {cause.strerror or 'host unreachable'} for {shown}"
    if isinstance(exc, httpx.ConnectTimeout):
        return f"node {node_id}: no connection within {connect_s:g}s to {shown} (host down, asleep or firewalled)"
    return f"node {node_id}: cannot connect to {shown}: {exc}"


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

    @property
    def reusable(self) -> bool:
        """The connection can go back to the pool once the body is read: HTTP/1.1 without `connection:
        close`. mlx_lm.server speaks HTTP/1.0: its body ends only when it closes the socket, which may be
        a while after `data: [DONE]`; there is nothing worth waiting for."""
        r = self.response
        return r.http_version == "HTTP/1.1" and "close" not in r.headers.get("connection", "").lower()

    async def release(self, grace: float = 0.5) -> None:
        """Close after a finished stream. A reusable connection is first drained of what is left of the
        body (the last chunk marker, after `data: [DONE]`) for up to `grace` seconds, so it goes back to
        the pool instead of being dropped: the next request skips a TCP connect. Any other is closed at once."""
        if not self.reusable:
            await self.response.aclose()
            return
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
        # The hop header lets a gateway that receives this request see that it came from a gateway (proxy.loop).
        headers = {"user-agent": "mlxmux", HOP_HEADER: GATEWAY_ID}
        if node.api_key:
            headers["authorization"] = f"Bearer {node.api_key}"
        # Reads are bounded by the caller (first-byte vs between-chunk silence), not by httpx.
        timeout = httpx.Timeout(connect=timeouts.connect_s, read=None, write=60.0, pool=timeouts.connect_s)
        # Idle pooled connections are dropped after 2 s, before servers close them (uvicorn-based nodes
        # after 5 s): reusing one the server is closing loses the request ("disconnected without a response").
        limits = httpx.Limits(
            max_connections=max(64, node.max_concurrency * 8), max_keepalive_connections=32, keepalive_expiry=2.0
        )
        self.max_connections = limits.max_connections
        self._client = httpx.AsyncClient(
            base_url=node.url, headers=headers, timeout=timeout, limits=limits, transport=transport
        )
        # Probes get their own few connections: a pool full of long streams must not fail the probes.
        self._probe_client = httpx.AsyncClient(
            base_url=node.url,
            headers=headers,
            timeout=timeout,
            limits=httpx.Limits(max_connections=4, max_keepalive_connections=0),
            transport=transport,
        )

    def _classify(self, exc: Exception) -> NodeFailure:
        nid = self.node.id
        if isinstance(exc, httpx.PoolTimeout):
            return NodeFailure(
                "pool_wait",
                f"the gateway is at its limit of {self.max_connections} connections to node {nid} "
                f"and none came free within {self.timeouts.connect_s:g}s",
            )
        local = _local_os_error(exc)
        if local is not None:
            return NodeFailure("gateway", f"the gateway could not open a connection to node {nid}: {local}")
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return NodeFailure("connect", connect_error_message(nid, self.node.url, exc, self.timeouts.connect_s))
        if isinstance(exc, httpx.TimeoutException):
            return NodeFailure("timeout", f"node {nid} timed out")
        if isinstance(exc, httpx.LocalProtocolError | httpx.UnsupportedProtocol | httpx.InvalidURL | httpx.ProxyError):
            return NodeFailure("gateway", f"the gateway could not send the request to node {nid}: {exc}")
        if isinstance(exc, httpx.HTTPError):
            return NodeFailure("protocol", f"node {nid} failed: {type(exc).__name__}: {exc}")
        return NodeFailure("gateway", f"the gateway could not send the request to node {nid}: {exc!r}")

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
        """POST and return once the node's response headers arrive (status checked). `headers` come from the
        client's request: one that cannot be sent as it is fails as `request_header` (nothing is sent)."""
        bad = unsendable_header(headers or {})
        if bad is not None:
            raise NodeFailure("request_header", f"the {bad} header cannot be forwarded: not printable ASCII")
        try:
            request = self._client.build_request(
                "POST", path, content=body, headers={"content-type": "application/json", **(headers or {})}
            )
        except (httpx.InvalidURL, UnicodeError, ValueError) as exc:
            raise self._classify(exc) from None
        try:
            try:
                response = await self._client.send(request, stream=True)
            except httpx.RemoteProtocolError:
                # A pooled connection the node had just closed: it never saw the request. Once more, on a
                # fresh connection (a node that really hangs up on every request fails again, and is blamed).
                response = await self._client.send(request, stream=True)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
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
                        raise NodeFailure(
                            "protocol", f"node {self.node.id} sent a response over {max_bytes} bytes", oversized=True
                        )
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
            async with asyncio.timeout(timeout), self._probe_client.stream("GET", path, timeout=timeout) as r:
                body = bytearray()
                async for chunk in r.aiter_bytes():  # decoded: a node may gzip its model list
                    body += chunk
                    if len(body) >= max_bytes:
                        break
                return r.status_code, bytes(body[:max_bytes])
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise self._classify(exc) from None
        except TimeoutError:
            raise NodeFailure("timeout", f"node {self.node.id} did not answer GET {path} in {timeout:g}s") from None

    async def aclose(self) -> None:
        await self._client.aclose()
        await self._probe_client.aclose()
