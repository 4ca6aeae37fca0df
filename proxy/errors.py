"""Errors the gateway turns into Anthropic error responses.

    GatewayError                      status  error.type
    ├── InvalidRequest                400     invalid_request_error   (bad JSON, bad schema, node 4xx)
    │   └── BodyTimeout               400     invalid_request_error   (the body did not arrive in time)
    ├── ClientDisconnected            499     client_cancel           (the client hung up mid-upload: never answered)
    ├── AuthenticationFailed          401     authentication_error
    ├── PermissionDenied              403     permission_error
    ├── NotFound                      404     not_found_error
    ├── RequestTooLarge               413     request_too_large
    │   └── HeadersTooLarge           431     request_too_large
    ├── RateLimited                   429     rate_limit_error
    ├── UpstreamError                 500     api_error
    ├── ClusterUnavailable            503     cluster_unavailable     (no eligible node)
    ├── UpstreamTimeout               504     timeout_error
    ├── LoopDetected                  508     loop_detected           (a request from a gateway: proxy.loop)
    └── Overloaded                    529     overloaded_error        (node unreachable or 5xx)

Every subclass knows its status, its Anthropic `type`, whether a retry can help
(`x-should-retry`) and, optionally, a `Retry-After` in seconds. Errors raised while the request body
was still arriving close the connection (`close_connection`), so what is left of it is never read.
"""

from __future__ import annotations

import msgspec


class GatewayError(Exception):
    status: int = 500
    type: str = "api_error"
    retryable: bool = True
    close_connection: bool = False

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    retryable = False


class BodyTimeout(InvalidRequest):
    close_connection = True


class ClientDisconnected(GatewayError):
    """The client went away before its request body was complete. Nobody reads the answer; the access
    line says `client_cancel` and no traceback is logged."""

    status = 499
    type = "client_cancel"
    retryable = False
    close_connection = True


class AuthenticationFailed(GatewayError):
    status = 401
    type = "authentication_error"
    retryable = False


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    retryable = False


class NotFound(GatewayError):
    status = 404
    type = "not_found_error"
    retryable = False


class RequestTooLarge(GatewayError):
    status = 413
    type = "request_too_large"
    retryable = False
    close_connection = True


class HeadersTooLarge(RequestTooLarge):
    status = 431


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"


class UpstreamError(GatewayError):
    status = 500
    type = "api_error"


class ClusterUnavailable(GatewayError):
    status = 503
    type = "cluster_unavailable"


class UpstreamTimeout(GatewayError):
    status = 504
    type = "timeout_error"


class LoopDetected(GatewayError):
    """A request an mlxmux gateway sent as to a node reached a gateway (`proxy.loop`): retrying cannot help."""

    status = 508
    type = "loop_detected"
    retryable = False


class Overloaded(GatewayError):
    status = 529
    type = "overloaded_error"


class ErrorDetail(msgspec.Struct):
    type: str
    message: str


class ErrorBody(msgspec.Struct, tag="error", tag_field="type"):
    """`{"type":"error","error":{"type":…,"message":…},"request_id":…}`"""

    error: ErrorDetail
    request_id: str | None = None


_encode = msgspec.json.Encoder().encode


def error_body(error_type: str, message: str, request_id: str | None = None) -> bytes:
    return _encode(ErrorBody(ErrorDetail(error_type, message), request_id))


def error_headers(exc: GatewayError) -> list[tuple[bytes, bytes]]:
    """ASGI headers of an error response: JSON, x-should-retry, and Retry-After when known."""
    headers = [(b"content-type", b"application/json"), (b"x-should-retry", b"true" if exc.retryable else b"false")]
    if exc.retry_after is not None:
        headers.append((b"retry-after", str(int(exc.retry_after)).encode()))
    if exc.close_connection:
        headers.append((b"connection", b"close"))
    return headers
