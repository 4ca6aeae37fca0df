"""Redis clients by URL (`state.redis_url` lists the forms): one server, or the primary a set of Sentinels
names. Building a client sends nothing; `state.redis_store` is the module that talks through it.

Timeouts are short and a failed command is retried once at once (a pooled connection may have died with a
Redis restart or a failover), so an outage costs callers milliseconds, not seconds. The Sentinel client is
redis-py's: each new connection asks the sentinels, in turn, for the primary's address, and idle
connections are dropped when the answer changes, so after a failover the next connection reaches the
promoted replica.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as redis
from redis.asyncio.client import Redis
from redis.asyncio.connection import parse_url
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

from state.redis_url import SentinelAddress, is_sentinel, parse_sentinel_url


def open_client(url: str, timeout_s: float) -> tuple[Redis, Sentinel | None]:
    """A client for `url` (responses decoded), and for a Sentinel URL the sentinels' client to close with it."""
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": timeout_s,
        "socket_connect_timeout": timeout_s,
        "retry": Retry(NoBackoff(), 1),
    }
    if not is_sentinel(url):
        return redis.from_url(url, **options), None
    sentinel, client = _sentinel_primary(parse_sentinel_url(url), options)
    return client, sentinel


def _sentinel_primary(address: SentinelAddress, options: dict[str, Any]) -> tuple[Sentinel, Redis]:
    # The URL's own options (TLS files, keepalive …), read by redis-py's parser as for a redis:// URL.
    extra: dict[str, Any] = dict(parse_url(f"{'rediss' if address.tls else 'redis'}://?{address.query}"))
    extra.pop("connection_class", None)  # the Sentinel pool picks its own (TLS or not) from `ssl`
    if address.tls:
        extra["ssl"] = True
    to_sentinels = {
        **{k: v for k, v in options.items() if k.startswith("socket_")},
        **extra,
        # A sentinel that is down is skipped for the next at once: no retry, no backoff.
        "retry": Retry(NoBackoff(), 0),
        "username": address.sentinel_username,
        "password": address.sentinel_password,
    }
    sentinel = Sentinel(list(address.sentinels), sentinel_kwargs=to_sentinels)  # type: ignore[no-untyped-call]
    client = sentinel.master_for(
        address.service, db=address.db, username=address.username, password=address.password, **options, **extra
    )
    return sentinel, client
