"""The store URLs mlxmux accepts, checked and taken apart without connecting (no I/O, no Redis client):

    memory://                                            one process (the default)
    redis://[[user]:password@]host[:6379][/db][?opt=v]   one Redis (redis-py's own URL form and options)
    rediss://…                                           the same over TLS
    unix:///path/to/redis.sock[?db=0]                    one Redis on a local socket
    redis+sentinel://[[user]:password@]host[:26379][,host[:26379]…]/master-name[/db][?opt=v]
                                                         the primary a set of Redis Sentinels names
    rediss+sentinel://…                                  the same, TLS to the sentinels and to Redis

In a Sentinel URL the user and password are those of the Redis servers (`requirepass` / ACL); sentinels
that want a password of their own get it as `?sentinel_password=…` (and `sentinel_username=…`). Other
options are redis-py's URL options (`ssl_ca_certs=…`) and apply to the sentinels and the servers alike.
Redis Cluster (`redis+cluster://`) is refused: docs/redis-keys.md#redis-cluster says why.
"""

from __future__ import annotations

import urllib.parse

import msgspec

SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
"""Sentinel URL scheme -> TLS."""
SINGLE_SCHEMES = ("memory", "redis", "rediss", "unix")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
DEFAULT_SENTINEL_PORT = 26379
SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")

CLUSTER_REFUSED = (
    "Redis Cluster is not supported: a routing decision is one Lua script over keys that span shards "
    "(docs/redis-keys.md#redis-cluster); use one Redis or a Sentinel-managed primary (redis+sentinel://)"
)


class SentinelAddress(msgspec.Struct, frozen=True, kw_only=True):
    """A `redis+sentinel://` URL taken apart."""

    sentinels: tuple[tuple[str, int], ...]
    """(host, port) of each sentinel, in the URL's order."""
    service: str
    """The master name the sentinels monitor (`sentinel monitor <name> …`)."""
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = None
    """For the Redis servers (master and replicas), not the sentinels."""
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    query: str = ""
    """The remaining redis-py URL options (`ssl_ca_certs=…`), as a query string."""


def scheme(url: str) -> str:
    return url.partition("://")[0].lower() if "://" in url else ""


def is_sentinel(url: str) -> bool:
    return scheme(url) in SENTINEL_SCHEMES


def check_store_url(url: str) -> None:
    """Raise ValueError, one line that never repeats a password, unless `url` is a store URL mlxmux can use."""
    kind = scheme(url)
    if kind in CLUSTER_SCHEMES:
        raise ValueError(CLUSTER_REFUSED)
    if kind in SENTINEL_SCHEMES:
        parse_sentinel_url(url)
        return
    if kind not in SINGLE_SCHEMES:
        raise ValueError(
            "must start with memory://, redis://, rediss://, unix://, redis+sentinel:// or rediss+sentinel://"
        )


def parse_sentinel_url(url: str) -> SentinelAddress:
    """`redis+sentinel://…` or `rediss+sentinel://…` -> SentinelAddress; ValueError (one line) if malformed."""
    kind = scheme(url)
    if kind not in SENTINEL_SCHEMES:
        raise ValueError(f"not a Sentinel URL (expected {' or '.join(s + '://' for s in SENTINEL_SCHEMES)})")
    rest = url.partition("://")[2]
    rest = rest.partition("#")[0]
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = urllib.parse.unquote(user) or None
        password = urllib.parse.unquote(secret) if colon else None
    sentinels = tuple(_host_port(part) for part in hosts.split(","))
    parts = path.removesuffix("/").split("/") if path else []
    if not parts or not parts[0]:
        raise ValueError("a Sentinel URL names the master after the hosts: redis+sentinel://host:26379/<master-name>/0")
    if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        tail = "/".join(parts[1:])
        raise ValueError(f"after the master name a Sentinel URL takes only a database number, not {tail!r}")
    options = urllib.parse.parse_qs(query, keep_blank_values=True)
    extra = {name: values[-1] for name, values in options.items() if name in SENTINEL_OPTIONS}
    remaining = [(name, value) for name, values in options.items() if name not in SENTINEL_OPTIONS for value in values]
    return SentinelAddress(
        sentinels=sentinels,
        service=urllib.parse.unquote(parts[0]),
        db=int(parts[1]) if len(parts) == 2 else 0,
        tls=SENTINEL_SCHEMES[kind],
        username=username,
        password=password,
        sentinel_username=extra.get("sentinel_username") or None,
        sentinel_password=extra.get("sentinel_password") or None,
        query=urllib.parse.urlencode(remaining),
    )


def _host_port(text: str) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:port
        host, bracket, tail = text[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise ValueError(f"sentinel address {text!r} is not [IPv6]:port")
        port_text = tail[1:]
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ValueError(f"sentinel address {text!r} has no host (hosts are comma-separated: h1:26379,h2:26379)")
    if not port_text:
        return host, DEFAULT_SENTINEL_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"sentinel address {text!r}: the port must be 1..65535")
    return host, int(port_text)
