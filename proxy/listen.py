"""Can this machine listen on a host and port? Asked before a server starts, so that a busy port is one line.

uvicorn finds out only once the app has started (after the first health round), then logs the bind error
among its start-up lines and exits 3; inside `mlxmux demo`, where several servers share one event loop, the
same error is a 57-line traceback. A trial bind first gives the user one line and the flag to change. The
port can still be taken between the trial and the real bind; the server's own error then stands.
"""

from __future__ import annotations

import errno
import socket


class CannotListen(Exception):
    """The address cannot be listened on; the message is one line meant for the user."""


def check_can_listen(host: str, port: int, what: str = "the gateway", flag: str = "--port") -> None:
    """Raise CannotListen, saying why and what to change, if `host:port` cannot be bound right now."""
    if not 1 <= port <= 65535:
        raise CannotListen(f"{flag} must be 1..65535, not {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CannotListen(f"cannot listen on {host!r} for {what}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            s.bind(address)
        except OSError as exc:
            raise CannotListen(_why(exc, host, port, what, flag)) from None


def _why(exc: OSError, host: str, port: int, what: str, flag: str) -> str:
    if exc.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is already in use (another mlxmux or another program): choose another {flag}"
    if exc.errno == errno.EACCES:
        return f"no permission to listen on port {port} for {what} (ports below 1024 need root): choose another {flag}"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"{host} is not an address of this machine: cannot listen there for {what}"
    return f"cannot listen on {host}:{port} for {what}: {exc.strerror}"
