"""`RedisStore`: routing knowledge shared by every replica through one Redis (or a Sentinel-managed primary).

The only module that talks to Redis. Each atomic operation is one Lua script under `state/lua/`
(headed by its KEYS / ARGV / returns), run with EVALSHA and reloaded by redis-py if the server lost it
(`SCRIPT FLUSH`, a restart, a failover to a replica, which never holds the primary's scripts). Scripts
read the time with `TIME`, so replicas with skewed clocks agree on every expiry. `route` and `finish`
cost one round trip each. Redis Cluster is not supported: the scripts touch keys they compute at run
time, across shards (`check` refuses a cluster node). Every Redis error or timeout leaves this module as
`StateUnavailable`.

With a Sentinel URL the client is redis-py's Sentinel-managed one: every new connection asks the
sentinels for the primary's address, and idle connections are dropped when the answer changes, so after a
failover the first command that finds the old primary gone (`StateUnavailable`: the gateway routes in
degraded mode meanwhile) is followed by commands that reach the promoted replica.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import secrets
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import msgspec
from redis.asyncio.client import Redis
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel
from redis.commands.core import AsyncScript
from redis.exceptions import AskError, ClusterCrossSlotError, ClusterDownError, MovedError, RedisError

from state import keys
from state.cache_model import CacheCounters
from state.errors import StateUnavailable, StoreUnsupported
from state.health import NodeHealth
from state.inflight import GenerationRead, RequestProgress, Ticket, decode_progress, oldest_first, progress_parts
from state.policy import rendezvous_rank, tie_key
from state.redis_client import open_client
from state.redis_url import CLUSTER_REFUSED
from state.types import (
    Decision,
    Lease,
    NodeStats,
    NodeView,
    Outcome,
    RouteRequest,
    RoutingLimits,
    SessionBinding,
    median,
)

SCRIPTS = (
    "route",
    "finish",
    "renew",
    "acquire_slot",
    "release",
    "forget_prefix",
    "unbind",
    "remove_node",
    "node_views",
    "cas_health",
    "progress",
    "open_generation",
    "tick_generation",
    "read_generation",
)
_health_decoder = msgspec.json.Decoder(NodeHealth)


USES_CACHE_MODEL = frozenset({"route", "finish", "forget_prefix"})
"""Scripts that get state/lua/cache_model.lua (the Lua twin of state.cache_model) prepended."""


def _lua(name: str) -> str:
    return importlib.resources.files("state").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


def _script_source(name: str) -> str:
    model = _lua("cache_model") if name in USES_CACHE_MODEL else ""
    return keys.lua_prelude() + model + _lua(name)


CLUSTER_ERRORS = (MovedError, AskError, ClusterCrossSlotError, ClusterDownError)
"""What a Redis Cluster node answers a command whose keys it does not serve together."""


@contextlib.contextmanager
def _unavailable(what: str) -> Iterator[None]:
    try:
        yield
    except CLUSTER_ERRORS as exc:
        raise StateUnavailable(f"redis {what} failed: {CLUSTER_REFUSED} (the server said: {exc})") from exc
    except MasterNotFoundError as exc:  # its text goes on with a repr of every sentinel client: drop that
        found = str(exc).partition(" : ")[0]
        raise StateUnavailable(f"redis {what} failed: {found} (no sentinel answered, or none monitors it)") from exc
    except (RedisError, OSError) as exc:
        raise StateUnavailable(f"redis {what} failed: {exc}") from exc


class RedisStore:
    """The store shared by replicas. Build it with `RedisStore.from_url` (or `state.open_store`)."""

    def __init__(self, client: Redis, limits: RoutingLimits | None = None, *, sentinel: Sentinel | None = None) -> None:
        self.client = client
        self.limits = limits or RoutingLimits()
        self.prefix = self.limits.key_prefix
        self._sentinel = sentinel
        self._scripts: dict[str, AsyncScript] = {name: client.register_script(_script_source(name)) for name in SCRIPTS}

    @classmethod
    def from_url(cls, url: str, limits: RoutingLimits | None = None) -> RedisStore:
        """Connect lazily to `redis://[[user]:password@]host:port/db`, `rediss://…`, `unix:///path`, or the
        primary named by `redis+sentinel://…` / `rediss+sentinel://…` (`state.redis_url`,
        `state.redis_client`), with timeouts of `limits.redis_timeout_ms`."""
        limits = limits or RoutingLimits()
        client, sentinel = open_client(url, limits.redis_timeout_ms / 1000)
        return cls(client, limits, sentinel=sentinel)

    async def _run(self, name: str, keys_: Sequence[str], args: Sequence[str | int | float]) -> Any:
        with _unavailable(name):
            return await self._scripts[name](keys=list(keys_), args=[self.prefix, *args])

    # -- the hot path --------------------------------------------------------------------------

    async def route(self, request: RouteRequest) -> Decision:
        if not request.candidates:
            raise ValueError("no candidates")
        lease_id = request.lease_id or secrets.token_hex(8)
        blocks = request.blocks[: self.limits.max_request_blocks]
        if len(blocks) != len(request.blocks):
            request = msgspec.structs.replace(request, blocks=blocks)
        key = tie_key(request)
        member = keys.session_member(request.pool, request.session) if request.session else ""
        w = request.weights
        args: list[str | int | float] = [
            member,
            request.strategy.value,
            lease_id,
            request.lease_ttl_ms,
            request.session_ttl_ms,
            self.limits.prefix_ttl_ms,
            self.limits.max_blocks_per_node,
            repr(float(w.load)),
            repr(float(w.crowding)),
            repr(float(w.overload_factor)),
            repr(float(w.spread)),
            repr(float(request.random_pick)),
            self.limits.session_active_ms,
            len(request.candidates),
        ]
        for c in request.candidates:
            args += [c.node_id, c.max_concurrency, c.cache_slots, rendezvous_rank(key, c.node_id)]
        args += [len(request.latency_order), *request.latency_order, len(request.blocks), *request.blocks]
        session_key = keys.session_key(self.prefix, request.pool, request.session or "")
        node, reason, matched, total, bound, tick, predicted = await self._run(
            "route", [session_key, keys.rr_key(self.prefix, request.pool)], args
        )
        return Decision(
            node_id=node,
            reason=reason,
            matched_blocks=int(matched),
            total_blocks=int(total),
            lease=Lease(node, lease_id),
            bound=bool(bound),
            cache_tick=int(tick),
            predicted_blocks=int(predicted),
        )

    async def finish(self, lease: Lease, outcome: Outcome) -> None:
        node = lease.node_id
        await self._run(
            "finish",
            [
                keys.node_key(self.prefix, node, kind)
                for kind in (keys.LEASES, keys.STATS, keys.TTFT, keys.TOTAL, keys.REQUESTS)
            ],
            [
                lease.lease_id,
                1 if outcome.ok else 0,
                repr(float(outcome.ttft_ms)),
                repr(float(outcome.total_ms)),
                outcome.error_class or "unknown",
                int(outcome.prompt_tokens),
                int(outcome.cached_tokens),
                self.limits.latency_samples,
                *self._report_args(node, outcome),
            ],
        )

    def _report_args(self, node: str, outcome: Outcome) -> list[str | int]:
        report = outcome.report
        if report is None:
            return [""]
        learn = outcome.ok and report.reported and report.prompt_tokens > 0
        if not learn and outcome.ok:
            return [""]
        blocks = report.blocks[: self.limits.max_request_blocks]
        limits = self.limits
        return [
            "learn" if learn else "drop",
            node,
            report.prompt_bytes,
            report.prompt_tokens,
            report.cached_tokens,
            report.completion_tokens,
            report.cache_slots,
            limits.block_size,
            limits.max_blocks_per_node,
            limits.prefix_ttl_ms,
            "" if report.seen_tick is None else report.seen_tick,
            "" if report.predicted_blocks is None else report.predicted_blocks,
            len(blocks),
            *blocks,
        ]

    async def renew(self, leases: Sequence[Lease], ttl_ms: int) -> None:
        if not leases:
            return
        await self._run(
            "renew",
            [keys.node_key(self.prefix, lease.node_id, keys.LEASES) for lease in leases],
            [ttl_ms, *(lease.lease_id for lease in leases)],
        )

    async def acquire_slot(
        self, key_name: str, lease_id: str, limit: int, ttl_ms: int, release: Sequence[str] = ()
    ) -> bool:
        key = keys.key_inflight_key(self.prefix, key_name)
        return bool(await self._run("acquire_slot", [key], [lease_id, limit, ttl_ms, *release]))

    async def release_slot(self, key_name: str, lease_id: str) -> None:
        with _unavailable("release_slot"):
            await self.client.zrem(keys.key_inflight_key(self.prefix, key_name), lease_id)

    async def release(self, leases: Sequence[Lease], slots: Sequence[tuple[str, str]] = ()) -> None:
        if not leases and not slots:
            return
        zsets = [keys.node_key(self.prefix, lease.node_id, keys.LEASES) for lease in leases]
        zsets += [keys.key_inflight_key(self.prefix, key_name) for key_name, _ in slots]
        ids = [lease.lease_id for lease in leases] + [lease_id for _, lease_id in slots]
        await self._run("release", zsets, ids)

    async def renew_slots(self, slots: Sequence[tuple[str, str]], ttl_ms: int) -> None:
        if not slots:
            return
        # The same script as node leases: both are ZSETs of lease id -> expiry ms.
        await self._run(
            "renew",
            [keys.key_inflight_key(self.prefix, key_name) for key_name, _ in slots],
            [ttl_ms, *(lease_id for _, lease_id in slots)],
        )

    # -- what is in flight (state.inflight) ---------------------------------------------------

    async def progress(self, updates: Sequence[tuple[Lease, RequestProgress]]) -> None:
        if not updates:
            return
        args: list[str | int] = [len(updates)]
        for lease, p in updates:
            head, tail = progress_parts(p)
            args += [lease.node_id, lease.lease_id, head, p.age_ms, tail]
        await self._run("progress", [], args)

    async def open_generation(self, key: str, owner: str, waiter: str, ttl_ms: int) -> Ticket:
        role, current = await self._run(
            "open_generation", keys.generation_keys(self.prefix, key), [owner, waiter, ttl_ms]
        )
        return Ticket(role, current)

    async def tick_generation(
        self, key: str, owner: str, ttl_ms: int, grace_ms: int, events: Sequence[str] = (), end: str | None = None
    ) -> int:
        args: list[str | int] = [owner, ttl_ms, grace_ms, end or "", *events]
        return int(await self._run("tick_generation", keys.generation_keys(self.prefix, key), args))

    async def read_generation(self, key: str, waiter: str, after: int, ttl_ms: int) -> GenerationRead:
        state, end, *events = await self._run(
            "read_generation", keys.generation_keys(self.prefix, key), [waiter, after, ttl_ms]
        )
        return GenerationRead(tuple(events), state, end)

    async def leave_generation(self, key: str, waiter: str) -> None:
        with _unavailable("leave_generation"):
            await self.client.zrem(keys.generation_keys(self.prefix, key)[2], waiter)

    # -- maintenance ---------------------------------------------------------------------------

    async def forget_prefix(self, node_id: str, blocks: Sequence[str]) -> None:
        if not blocks:
            return
        await self._run("forget_prefix", [], [node_id, *blocks])

    async def unbind(self, pool: str, session: str) -> None:
        await self._run("unbind", [keys.session_key(self.prefix, pool, session)], [keys.session_member(pool, session)])

    async def remove_node(self, node_id: str) -> None:
        await self._run("remove_node", [keys.node_health_key(self.prefix)], [node_id])

    async def health(self) -> dict[str, NodeHealth]:
        with _unavailable("health"):
            raw = await self.client.hgetall(keys.node_health_key(self.prefix))
        records = {}
        for node_id, value in raw.items():
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                records[str(node_id)] = _health_decoder.decode(value)
        return records

    async def cas_health(self, node_id: str, health: NodeHealth) -> bool:
        new = msgspec.json.encode(msgspec.structs.replace(health, version=health.version + 1)).decode()
        written = await self._run("cas_health", [keys.node_health_key(self.prefix)], [node_id, health.version, new])
        return bool(written)

    async def claim_probe(self, node_id: str, owner: str, ttl_ms: int) -> bool:
        key = keys.probe_key(self.prefix, node_id)
        with _unavailable("claim_probe"):
            if await self.client.set(key, owner, nx=True, px=max(1, ttl_ms)):
                return True
            return bool(await self.client.get(key) == owner)

    async def registry(self) -> dict[str, bytes]:
        with _unavailable("registry"):
            raw = await self.client.hgetall(keys.registry_key(self.prefix))
        return {str(k): str(v).encode() for k, v in raw.items()}

    async def register_node(self, node_id: str, data: bytes) -> None:
        with _unavailable("register_node"):
            await self.client.hset(keys.registry_key(self.prefix), node_id, data.decode())

    async def restore_registry(self, entries: Mapping[str, bytes]) -> None:
        if not entries:
            return
        key = keys.registry_key(self.prefix)
        with _unavailable("restore_registry"):
            async with self.client.pipeline(transaction=False) as pipe:
                for node_id, data in entries.items():
                    pipe.hsetnx(key, node_id, data.decode())
                await pipe.execute()

    async def epoch(self, candidate: str) -> str:
        key = keys.epoch_key(self.prefix)
        with _unavailable("epoch"):
            async with self.client.pipeline(transaction=False) as pipe:  # one round trip
                pipe.set(key, candidate, nx=True)
                pipe.get(key)
                _, current = await pipe.execute()
        return candidate if current is None else str(current)

    async def node_views(self, node_ids: Sequence[str]) -> list[NodeView]:
        if not node_ids:
            return []
        kinds = (keys.LEASES, keys.SESSIONS, keys.STATS, keys.TTFT, keys.TOTAL, keys.LRU, keys.CACHE, keys.REQUESTS)
        now, *raw = await self._run(
            "node_views",
            [keys.node_key(self.prefix, n, kind) for n in node_ids for kind in kinds],
            [self.limits.session_ttl_ms - self.limits.session_active_ms],
        )
        return [_node_view(node_id, int(now), *row) for node_id, row in zip(node_ids, raw, strict=True)]

    async def sessions(self, limit: int = 1000) -> list[SessionBinding]:
        """Live bindings, found by SCAN (an operator's view: not atomic, never on the hot path)."""
        head = f"{self.prefix}{keys.SESSION}"
        found: list[str] = []
        with _unavailable("sessions"):
            async for key in self.client.scan_iter(match=_glob_escape(head) + "*", count=1000):
                if key not in found:
                    found.append(key)
                if len(found) >= limit:
                    break
            if not found:
                return []
            async with self.client.pipeline(transaction=False) as pipe:
                for key in found:
                    pipe.get(key)
                    pipe.pttl(key)
                values = await pipe.execute()
        bindings = []
        for key, node, ttl in zip(found, values[::2], values[1::2], strict=True):
            if node is None or ttl is None or ttl < 0:
                continue
            pool, session = keys.split_session_member(key[len(head) :])
            bindings.append(SessionBinding(pool=pool, session=session, node_id=node, ttl_ms=int(ttl)))
        return bindings

    async def ping(self) -> None:
        with _unavailable("ping"):
            await self.client.ping()

    async def check(self) -> None:
        with _unavailable("check"):
            info = await self.client.info("cluster")
        if int(info.get("cluster_enabled", 0)):
            raise StoreUnsupported(CLUSTER_REFUSED)

    async def close(self) -> None:
        with _unavailable("close"):
            await self.client.aclose()
            if self._sentinel is not None:
                await self._sentinel.aclose()


def _node_view(
    node_id: str,
    now: int,
    inflight: int,
    sessions: int,
    flat: list[str],
    ttft: list[str],
    total: list[str],
    entries: int,
    cache_flat: list[str],
    requests_flat: list[str],
) -> NodeView:
    fields = dict(zip(flat[::2], flat[1::2], strict=True))
    error_classes = {
        name[len(keys.ERROR_CLASS) :]: int(count) for name, count in fields.items() if name.startswith(keys.ERROR_CLASS)
    }
    stats = NodeStats(
        ok=int(fields.get(keys.OK, 0)),
        errors=int(fields.get(keys.ERRORS, 0)),
        cancelled=int(fields.get(keys.CANCELLED, 0)),
        error_classes=error_classes,
        ttft_p50_ms=median([float(x) for x in ttft]),
        total_p50_ms=median([float(x) for x in total]),
        prompt_tokens=int(fields.get(keys.PROMPT_TOKENS, 0)),
        cached_tokens=int(fields.get(keys.CACHED_TOKENS, 0)),
    )
    counters = dict(zip(cache_flat[::2], cache_flat[1::2], strict=True))
    cache = CacheCounters(entries=int(entries), **{name: int(counters.get(name, 0)) for name in keys.CACHE_FIELDS})
    requests = (
        decode_progress(lease, value, now) for lease, value in zip(requests_flat[::2], requests_flat[1::2], strict=True)
    )
    return NodeView(
        node_id=node_id,
        inflight=int(inflight),
        sessions=int(sessions),
        stats=stats,
        cache=cache,
        requests=oldest_first(requests),
    )


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)
