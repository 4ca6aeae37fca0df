"""Team API keys and fair share: who may call /v1/*, and how many requests each key may run at once.

With `auth.keys` set, every path under /v1/ needs one of the keys, sent as `x-api-key` (Claude Code's
ANTHROPIC_API_KEY) or `Authorization: Bearer` (ANTHROPIC_AUTH_TOKEN); anything else is a 401
`authentication_error`. /health, /ready, /, /api/hello and /cluster stay open; /admin/* has its own
token (`proxy.admin`). Keys are compared as SHA-256 digests with `hmac.compare_digest`, so the
configuration may hold `sha256:<hex>` instead of the key.

With `auth.max_concurrent_per_key` > 0, each POST /v1/messages holds one of its key's slots from
before routing until the response has been sent in full (for a stream: until it ends or the client
leaves). Slots are leases in the shared store, counted across replicas; a key at its limit gets 429
`rate_limit_error` with `Retry-After`. POST /v1/messages/count_tokens is limited the same way (its body
may be as large, and decoding it costs as much memory), from a pool of its own of the same size, so
counting tokens never makes a key's generation wait or fail.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Iterable, Mapping
from typing import NoReturn

from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.config import AuthConfig
from proxy.errors import AuthenticationFailed, RateLimited
from proxy.gateway import Gateway
from proxy.logs import RequestRecord, log_access

log = logging.getLogger("mlxmux.auth")

HASHED = "sha256:"


def key_digest(configured: str) -> bytes:
    """The SHA-256 digest a presented key must have: given (`sha256:<hex>`) or computed from the key."""
    if configured.startswith(HASHED):
        return bytes.fromhex(configured[len(HASHED) :])
    return hashlib.sha256(configured.encode()).digest()


class KeyRing:
    """The configured team keys, by name."""

    def __init__(self, keys: Mapping[str, str]) -> None:
        self._digests = [(name, key_digest(key)) for name, key in keys.items()]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def match(self, presented: Iterable[str]) -> str | None:
        """The name of the key among `presented` (header values), or None. Every configured digest is
        compared, each in constant time, so timing says nothing about which key came close."""
        found = None
        for value in presented:
            digest = hashlib.sha256(value.encode()).digest()
            for name, expected in self._digests:
                if hmac.compare_digest(digest, expected) and found is None:
                    found = name
        return found


def presented_keys(headers: Iterable[tuple[bytes, bytes]]) -> list[str]:
    """Keys a request offers: `x-api-key` and the token of `Authorization: Bearer`."""
    found = []
    for name, value in headers:
        if name == b"x-api-key":
            found.append(value.decode("latin-1").strip())
        elif name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                found.append(token.strip())
    return [key for key in found if key]


def needs_key(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


COUNT_TOKENS_POOL = ":count_tokens"
"""Suffix of a key's name for its count_tokens slots (`mlxmux:key:{name}:count_tokens:inflight`)."""


def slot_pool(method: str, path: str) -> str | None:
    """Whose slots a request takes, as a suffix of the key's name: "" (generation), COUNT_TOKENS_POOL,
    or None (no slot: /v1/models is cheap)."""
    if method != "POST":
        return None
    path = path.rstrip("/")
    if path == "/v1/messages":
        return ""
    if path == "/v1/messages/count_tokens":
        return COUNT_TOKENS_POOL
    return None


def takes_slot(method: str, path: str) -> bool:
    """Generation and count_tokens (whose bodies are as large) count against fair share; /v1/models does not."""
    return slot_pool(method, path) is not None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_open(auth: AuthConfig, host: str) -> None:
    """A startup warning when anyone who can reach the port may use the nodes."""
    if not auth.keys and not is_loopback(host):
        log.warning(
            "no API keys configured (MLXMUX_API_KEYS or [auth] keys): anyone who can reach %s may use the gateway",
            host,
        )


def refuse_login(scope: Scope, presented: bool) -> NoReturn:
    """Write the access line of a refused login (401) and raise its error. The line says whether a key was
    sent and where from; never which key was tried, nor a key's name (a wrong key is nobody's)."""
    # Claude Code replaces a 401 message that mentions `x-api-key` (Anthropic's own words) with its generic
    # "Not logged in · Please run /login"; other words it shows: "Please run /login · API Error: 401 <words>".
    why = "the API key sent is not one of this gateway's team keys" if presented else "no API key sent"
    client = scope.get("client")
    record = RequestRecord(
        request_id=scope.get("state", {}).get("request_id", ""),
        method=scope["method"],
        path=scope["path"],
        client=client[0] if client else None,
        error=f"{why} (MLXMUX_API_KEYS)" if presented else why,
    )
    log_access(record, 401, "off")
    raise AuthenticationFailed(f"{why}: set ANTHROPIC_AUTH_TOKEN (or ANTHROPIC_API_KEY) to your team key")


class ApiKeyMiddleware:
    """Checks team keys on /v1/* and holds a fair-share slot around each POST /v1/messages.

    Must sit inside `RequestIdMiddleware`, which turns the errors raised here into Anthropic bodies.
    """

    def __init__(self, app: ASGIApp, auth: AuthConfig) -> None:
        self.app = app
        self.auth = auth
        self.keys = KeyRing(auth.keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or not needs_key(scope["path"]):
            await self.app(scope, receive, send)
            return
        presented = presented_keys(scope["headers"])
        name = self.keys.match(presented)
        if name is None:
            refuse_login(scope, bool(presented))
        limit = self.auth.max_concurrent_per_key
        pool = slot_pool(scope["method"], scope["path"])
        if limit <= 0 or pool is None:
            await self.app(scope, receive, send)
            return
        gw: Gateway = scope["app"].state.gateway
        slot = await gw.acquire_slot(name + pool, limit)
        if slot is None:
            what = "count_tokens request(s)" if pool else "request(s)"
            raise RateLimited(
                f"API key {name!r} already has {limit} {what} in flight (auth.max_concurrent_per_key)",
                retry_after=self.auth.retry_after_s,
            )
        try:
            await self.app(scope, receive, send)  # for a stream, this returns when the stream has ended
        finally:
            await gw.release_slot(slot)
