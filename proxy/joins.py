"""Resends join the answer in flight: a node computes one answer however often Claude Code asks for it.

Claude Code gives up on a request that runs past its timeout and sends the same request again, while the
node is still prefilling the first copy. A copy of a streamed request that is already in flight — same
session, same model, same prompt and parameters (`fingerprint`) — does not go to a node: it *joins* the
first copy's generation and gets its whole answer, from its first event, as that answer streams.

- The first request *owns* the generation (`Generation`): every event its relay writes is kept, in order.
- A copy on the same replica reads them from memory (`LocalSource`); a copy on another replica finds the
  generation in the shared store (`Store.open_generation`) and reads them from there (`SharedSource`): the
  owner publishes its events to the store only while someone waits there, so an answer nobody joins costs
  the store one small call a second.
- When the owner's client goes away, the answer goes on for those who joined. When nobody is left waiting
  for `routing.resend_grace_s` (a resend usually arrives well within it), the owner's relay is cancelled,
  which closes the node's request: an abandoned prefill stops costing the Mac.
- If the owner goes away without ending the answer (its replica died), a copy that has written no content
  yet goes to a node itself; one that has ends with an `overloaded_error` event, which Claude Code retries.

Why the store and not a hand-off to the owner's replica: replicas behind a load balancer need not reach
each other (docs/architecture.md), every replica already shares Redis, and only joined answers travel.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import msgspec

from proxy.errors import GatewayError
from proxy.translate import encode_chat_request
from state.errors import StateUnavailable
from state.store import Store

if TYPE_CHECKING:
    from proxy.attempts import Prepared
    from proxy.gateway import Gateway

log = logging.getLogger("mlxmux.joins")

MAX_SHARED_BYTES = 8 * 1024 * 1024
"""Bytes of one answer kept for those who join it; past it they get an `overloaded_error` (retried)."""
GENERATION_TTL_MS = 5000
"""A generation (and a waiter) whose holder stopped renewing it lapses after this long."""
GRACE_AFTER_END_MS = 30_000
"""An ended generation stays readable this long, for waiters still reading it."""
SLOW_TICK_S = 1.0
"""How often an owner renews its generation while nobody waits on another replica."""
FAST_TICK_S = 0.1
"""How often it publishes events (and counts waiters) while someone does, or its own client has gone."""
POLL_S = 0.1
"""How often a waiter on another replica reads new events."""


def fingerprint(prep: Prepared) -> str | None:
    """The name of a streamed request's answer: its session, pool, requested model, and everything the node
    is sent (prompt, tools, sampling parameters), but nothing that does not change the answer (the billing
    header, `cache_control` markers, `metadata`). None for requests that are never joined: without a
    session (two clients' identical one-off prompts are not one request) or not streamed."""
    if not prep.session or prep.body.stream is not True:
        return None
    h = hashlib.blake2b(digest_size=16, person=b"mlxmux-join")
    for part in (prep.pool, prep.session, prep.body.model):
        h.update(part.encode())
        h.update(b"\0")
    h.update(encode_chat_request(prep.chat))
    return h.hexdigest()


class End(msgspec.Struct, frozen=True):
    """How the owner's answer ended, after `n` events: 200, `stream_error` (an error event ended it), an
    HTTP error status (before any event: `type`, `message`, `retry_after` say what), `client_cancel` (nobody
    waited any more) or `overflow` (too long to share)."""

    n: int
    status: int | str
    type: str = ""
    message: str = ""
    retry_after: float | None = None


_end_encoder = msgspec.json.Encoder()
_end_decoder = msgspec.json.Decoder(End)


@dataclass(eq=False)
class Generation:
    """One streamed answer that copies of its request may join (owned by this replica)."""

    key: str
    owner: str
    shared: bool = False
    """Registered in the shared store: copies on other replicas may join it."""
    events: list[bytes] = field(default_factory=list)
    size: int = 0
    end: End | None = None
    local_waiters: int = 0
    remote_waiters: int = 0
    client_gone: bool = False
    """The owner's own client went away: the answer goes on only for those who joined."""
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _ended: asyncio.Event = field(default_factory=asyncio.Event)

    def waiting(self) -> int:
        return self.local_waiters + self.remote_waiters

    def append(self, data: bytes) -> None:
        if self.end is not None:
            return
        if self.size + len(data) > MAX_SHARED_BYTES:
            self.finish(End(len(self.events), "overflow"))
            return
        self.events.append(data)
        self.size += len(data)
        self._notify()

    def fail(self, error: GatewayError) -> None:
        """The owner's answer is an HTTP error, before any event: copies get the same."""
        self.finish(End(0, error.status, error.type, error.message, error.retry_after))

    def finish(self, end: End) -> None:
        if self.end is None:
            self.end = end
            self._ended.set()
            self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed(self, timeout: float) -> None:
        """Return at the next change (an event, the end, a waiter coming or going), or after `timeout`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)


class Batch(msgspec.Struct, frozen=True):
    events: list[bytes]
    end: End | None = None
    gone: bool = False
    """The generation lapsed without an end (its owner went away)."""


class JoinSource(Protocol):
    async def next(self, after: int, timeout: float) -> Batch | None:
        """Events after the first `after` (with the end, once there), or None if nothing came in `timeout`."""
        ...

    async def leave(self) -> None: ...


class LocalSource:
    """A copy waiting for an answer owned by this replica."""

    def __init__(self, gen: Generation) -> None:
        self.gen = gen
        self.left = False
        gen.local_waiters += 1
        gen._notify()

    async def next(self, after: int, timeout: float) -> Batch | None:
        gen = self.gen
        if len(gen.events) <= after and gen.end is None:
            await gen.changed(timeout)
        if len(gen.events) <= after and gen.end is None:
            return None
        return Batch(gen.events[after:], gen.end)

    async def leave(self) -> None:
        if not self.left:
            self.left = True
            self.gen.local_waiters -= 1
            self.gen._notify()


class SharedSource:
    """A copy waiting for an answer owned by another replica, read from the shared store."""

    def __init__(self, store: Store, key: str, waiter: str) -> None:
        self.store = store
        self.key = key
        self.waiter = waiter
        self.unreachable_since: float | None = None

    async def next(self, after: int, timeout: float) -> Batch | None:
        give_up = time.monotonic() + timeout
        while True:
            try:
                read = await self.store.read_generation(self.key, self.waiter, after, GENERATION_TTL_MS)
            except StateUnavailable:
                # Meanwhile the owner cannot renew it either: past its TTL it is gone for good.
                now = time.monotonic()
                self.unreachable_since = self.unreachable_since or now
                if now - self.unreachable_since > GENERATION_TTL_MS / 1000:
                    return Batch([], gone=True)
            else:
                self.unreachable_since = None
                end = _end_decoder.decode(read.end) if read.state == "ended" and read.end else None
                if read.events or end is not None or read.state == "gone":
                    return Batch([e.encode() for e in read.events], end, read.state == "gone")
            if time.monotonic() >= give_up:
                return None
            await asyncio.sleep(min(POLL_S, max(0.0, give_up - time.monotonic())))

    async def leave(self) -> None:
        with contextlib.suppress(StateUnavailable):
            await self.store.leave_generation(self.key, self.waiter)


class JoinHub:
    """This replica's generations, and the way to a generation another replica owns."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.local: dict[str, Generation] = {}
        self._tickers: set[asyncio.Task[None]] = set()

    @property
    def enabled(self) -> bool:
        return self.gw.settings.routing.join_resends

    async def begin(self, prep: Prepared) -> Generation | JoinSource | None:
        """Own the request's answer (a `Generation` its relay fills), or join the live one (a source to read
        it from); None when the request cannot be joined or joining is off."""
        if not self.enabled:
            return None
        key = fingerprint(prep)
        if key is None:
            return None
        gen = self.local.get(key)
        if gen is not None and gen.end is None:
            self.gw.metrics.joined.labels("local").inc()
            return LocalSource(gen)
        gen = Generation(key, secrets.token_hex(8))
        if self.gw.settings.redis_url and not self.gw.store_circuit_open():
            try:
                ticket = await self.gw.store.open_generation(key, gen.owner, gen.owner, GENERATION_TTL_MS)
            except StateUnavailable:
                self.gw.store_failed()  # the circuit opens: routing this request does not wait for Redis again
                ticket = None  # owned here alone: copies through this replica still join it
            if ticket is not None and ticket.role == "join":
                self.gw.metrics.joined.labels("shared").inc()
                return SharedSource(self.gw.store, key, gen.owner)
            gen.shared = ticket is not None and ticket.role == "own"
        self.local[key] = gen
        if gen.shared:
            task = asyncio.create_task(self._tick(gen), name="mlxmux-generation")
            self._tickers.add(task)
            task.add_done_callback(self._tickers.discard)
        return gen

    def done(self, gen: Generation, status: int | str) -> None:
        """The owner's relay is over (`status` as its access line would say, before any client hang-up)."""
        gen.finish(End(len(gen.events), status))
        if self.local.get(gen.key) is gen:
            del self.local[gen.key]

    async def serve_others(self, gen: Generation, relay: asyncio.Future[None]) -> None:
        """The owner's client went away: let its relay run while anyone waits for the answer; return when it
        is over, or when nobody has waited for `routing.resend_grace_s` (the caller then cancels it)."""
        grace = self.gw.settings.routing.resend_grace_s
        quiet_since: float | None = None
        gen.client_gone = True  # the owner's ticker counts waiters more often
        while not relay.done():
            now = time.monotonic()
            if gen.waiting():
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= grace:
                return
            await asyncio.wait({relay}, timeout=FAST_TICK_S)

    async def _tick(self, gen: Generation) -> None:
        """The owner's heartbeat in the shared store: renew the generation, learn how many wait elsewhere, and
        while any do, publish the events they have not had; at the end, the end record."""
        published = 0
        store = self.gw.store
        while True:
            if gen.end is None:
                fast = gen.remote_waiters > 0 or gen.client_gone
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(gen._ended.wait(), FAST_TICK_S if fast else SLOW_TICK_S)
            end = gen.end
            events = gen.events[published:] if gen.remote_waiters else []
            try:
                waiters = await store.tick_generation(
                    gen.key,
                    gen.owner,
                    GENERATION_TTL_MS,
                    GRACE_AFTER_END_MS,
                    [e.decode() for e in events],
                    None if end is None else _end_encoder.encode(end).decode(),
                )
                published += len(events)
                if end is not None and waiters > 0 and published < len(gen.events):
                    # someone began waiting since the last tick: it needs the whole answer
                    rest = [e.decode() for e in gen.events[published:]]
                    await store.tick_generation(gen.key, gen.owner, GENERATION_TTL_MS, GRACE_AFTER_END_MS, rest)
            except StateUnavailable:
                if end is not None:
                    return  # waiters elsewhere find it gone once it lapses, and go their own way
                continue
            except Exception:  # a bug here must not stop the relay; waiters elsewhere find it gone
                log.exception("generation %s: tick failed", gen.key)
                return
            if waiters < 0:  # it lapsed (a long store outage): copies elsewhere went their own way
                gen.shared, gen.remote_waiters = False, 0
                return
            if waiters != gen.remote_waiters:
                gen.remote_waiters = waiters
                gen._notify()
            if end is not None:
                return

    def close(self) -> None:
        for task in self._tickers:
            task.cancel()
