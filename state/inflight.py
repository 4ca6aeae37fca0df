"""What is in flight right now, shared by every replica. Pure, no I/O.

Two things live here, each with the rules both store backends follow (`MemoryStore` uses the classes
below; `RedisStore` runs the same rules as Lua scripts; tests/contract checks that both agree):

progress (`Store.progress`, shown in `NodeView.requests`)
    What each request in flight is doing on its node: `queued` (sent, the node has said nothing yet),
    `prefill` (the node reported `done` of `total` prompt tokens processed: mlx_lm.server's
    `: keepalive N/M`), `generating` (`done` tokens streamed so far). A record is kept only while its
    request's in-flight lease is live: written only then, dropped when the lease is released or lapses.

generations (`Store.open_generation` and friends)
    A streamed answer that a resent copy of its request may join instead of making the node compute it
    again (docs/architecture.md, "Resends join the answer in flight"). The replica whose request came
    first *owns* the generation under a key that names the request (session, model, prompt); a copy
    that arrives while it is live becomes a *waiter*. The owner renews the generation every tick and
    learns how many waiters are live; while some are, it appends the events it streamed to the shared
    list, in order, so that a waiter on any replica reads the whole answer from its first event. At the
    end the owner writes the end record (how many events there are and how the answer ended), and the
    generation stays readable for `grace_ms`, then lapses. A generation whose owner stopped renewing
    lapses after `ttl_ms` ("gone"): its waiters go on without it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import msgspec


class Phase(enum.StrEnum):
    QUEUED = "queued"
    PREFILL = "prefill"
    GENERATING = "generating"


class RequestProgress(msgspec.Struct, frozen=True):
    """One request in flight on a node, as `GET /cluster` and `mlxmux status` show it."""

    lease_id: str
    phase: Phase = Phase.QUEUED
    done: int = 0
    """prefill: prompt tokens processed so far; generating: tokens streamed so far."""
    total: int = 0
    """prefill: prompt tokens the node has to process (the uncached part)."""
    session: str = ""
    """The session as logged (a short hash, or empty)."""
    age_ms: int = 0
    """Time since the request reached its node, when the record was written (read: when it was read)."""
    joined: int = 0
    """Other clients waiting for the same answer (resends that joined it)."""


class Ticket(msgspec.Struct, frozen=True):
    """The answer to `Store.open_generation`."""

    role: Literal["own", "join", "none"]
    """own: the caller owns the new generation; join: a live one exists and the caller waits for it;
    none: one with this key just ended (still readable): the caller goes ahead on its own."""
    owner: str = ""


class GenerationRead(msgspec.Struct, frozen=True):
    """What a waiter reads (`Store.read_generation`)."""

    events: tuple[str, ...]
    """Events after the ones the waiter had, in order (each one piece of the stream as written)."""
    state: Literal["live", "ended", "gone"]
    """gone: no such generation (its owner stopped renewing it, or it was never there)."""
    end: str = ""
    """The owner's end record (opaque to the store) once it ended."""


@dataclass
class _Generation:
    owner: str
    expires: int
    state: Literal["live", "ended"] = "live"
    end: str = ""
    events: list[str] = field(default_factory=list)
    waiters: dict[str, int] = field(default_factory=dict)
    """waiter id -> expiry ms"""


class GenerationBoard:
    """The generations of one process (`MemoryStore`), on the caller's millisecond clock."""

    def __init__(self) -> None:
        self._gens: dict[str, _Generation] = {}

    def _live(self, key: str, now: int) -> _Generation | None:
        gen = self._gens.get(key)
        if gen is not None and gen.expires <= now:
            del self._gens[key]
            return None
        return gen

    def open(self, key: str, owner: str, waiter: str, ttl_ms: int, now: int) -> Ticket:
        gen = self._live(key, now)
        if gen is None:
            self._gens[key] = _Generation(owner, now + ttl_ms)
            return Ticket("own", owner)
        if gen.state != "live":
            return Ticket("none", gen.owner)
        gen.waiters[waiter] = now + ttl_ms
        return Ticket("join", gen.owner)

    def tick(
        self, key: str, owner: str, ttl_ms: int, events: Sequence[str], end: str | None, grace_ms: int, now: int
    ) -> int:
        gen = self._live(key, now)
        if gen is None or gen.owner != owner:
            return -1
        gen.events.extend(events)
        if end is not None:
            gen.state, gen.end = "ended", end
        gen.expires = now + (grace_ms if gen.state == "ended" else ttl_ms)
        gen.waiters = {w: t for w, t in gen.waiters.items() if t > now}
        return len(gen.waiters)

    def read(self, key: str, waiter: str, after: int, ttl_ms: int, now: int) -> GenerationRead:
        gen = self._live(key, now)
        if gen is None:
            return GenerationRead((), "gone")
        if gen.state == "live":
            gen.waiters[waiter] = now + ttl_ms
        return GenerationRead(tuple(gen.events[after:]), gen.state, gen.end)

    def leave(self, key: str, waiter: str) -> None:
        gen = self._gens.get(key)
        if gen is not None:
            gen.waiters.pop(waiter, None)

    def sweep(self, now: int) -> None:
        for key in [k for k, g in self._gens.items() if g.expires <= now]:
            del self._gens[key]


def progress_parts(p: RequestProgress) -> tuple[str, str]:
    """A stored record is `phase|done|total|started ms|joined|session` (the session last: it is the only free
    text); the store puts the start time, on its own clock, between these two parts."""
    return f"{p.phase}|{p.done}|{p.total}|", f"|{p.joined}|{p.session}"


def encode_progress(p: RequestProgress, started_ms: int) -> str:
    head, tail = progress_parts(p)
    return f"{head}{started_ms}{tail}"


def decode_progress(lease_id: str, value: str, now: int) -> RequestProgress | None:
    parts = value.split("|", 5)
    if len(parts) != 6:
        return None
    phase, done, total, started, joined, session = parts
    try:
        return RequestProgress(
            lease_id, Phase(phase), int(done), int(total), session, max(0, now - int(started)), int(joined)
        )
    except ValueError:
        return None


def oldest_first(records: Iterable[RequestProgress | None]) -> tuple[RequestProgress, ...]:
    """The readable records, oldest request first (ties by lease id, so every replica lists them alike)."""
    return tuple(sorted((r for r in records if r is not None), key=lambda r: (-r.age_ms, r.lease_id)))
