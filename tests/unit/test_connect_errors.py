"""A node the gateway cannot connect to: DNS failure, refused port, timeout and unreachable host are told apart,
with the node's URL (credentials redacted)."""

from __future__ import annotations

import errno
import socket

import httpx
import pytest

from proxy.config import NodeConfig, TimeoutConfig
from proxy.upstream import NodeClient, NodeFailure, connect_error_message
from tests.procs import free_port

pytestmark = pytest.mark.anyio

URL = "http://alice:secret@mac1.local:8080"


def wrapped(cause: BaseException) -> httpx.ConnectError:
    """httpx's error with the OS error as its cause, as httpx and httpcore chain them."""
    exc = httpx.ConnectError("All connection attempts failed")
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (
            wrapped(socket.gaierror(socket.EAI_NONAME, "Name or service not known")),
            "node mac1: cannot resolve host 'mac1.local' (DNS: Name or service not known) in "
            "http://***@mac1.local:8080",
        ),
        (
            wrapped(ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed")),
            "node mac1: connection refused at http://***@mac1.local:8080 (no server listening on that port)",
        ),
        (
            wrapped(OSError(errno.EHOSTUNREACH, "No route to host")),
            "node mac1: No route to host for http://***@mac1.local:8080",
        ),
        (
            httpx.ConnectTimeout("timed out"),
            "node mac1: no connection within 3s to http://***@mac1.local:8080 (host down, asleep or firewalled)",
        ),
        (httpx.ConnectError("odd"), "node mac1: cannot connect to http://***@mac1.local:8080: odd"),
    ],
)
def test_connect_error_message(exc: BaseException, message: str) -> None:
    assert connect_error_message("mac1", URL, exc, 3.0) == message


@pytest.mark.parametrize(
    ("url", "words"),
    [
        (f"http://127.0.0.1:{free_port()}", "connection refused at http://127.0.0.1:"),
        ("http://no-such-node.invalid:8080", "cannot resolve host 'no-such-node.invalid' (DNS: "),
    ],
)
async def test_a_real_refusal_and_a_real_dns_failure_are_told_apart(url: str, words: str) -> None:
    client = NodeClient(NodeConfig(id="n", url=url), TimeoutConfig(connect_s=2.0))
    try:
        with pytest.raises(NodeFailure) as info:
            await client.get("/health", timeout=5.0)
    finally:
        await client.aclose()
    assert info.value.kind == "connect"
    assert info.value.message.startswith(f"node n: {words}"), info.value.message
