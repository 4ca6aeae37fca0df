"""Fault injection for the simulated node: what can go wrong, set by CLI flags or `POST /_sim/faults`.

Each fault mimics something a real mlx_lm.server (or the network in front of it) does:

- `fail_status`: answer with that HTTP status and an mlx-like `{"error": "..."}` body (a fraction
  `fail_rate` of requests, spread evenly and deterministically: 0.5 fails every second request);
- `hang`: read the request and never answer, until the faults change or the client goes away;
- `cut_after`: stream that many `data:` chunks, then stop without `[DONE]`. `cut_mode` "eof" ends the body
  cleanly: over HTTP/1.0 the connection just closes, exactly what mlx_lm.server does when generation fails
  mid-stream; "drop" aborts the connection with a TCP reset (a node or network that breaks; over the sim's
  `--http 1.1` the client sees a broken chunked body). A non-streaming request is closed with no response;
- `close`: close the connection without any response (mlx when generation fails before a non-streaming
  answer, e.g. its generation thread died);
- `slow_first_byte_ms`: wait that long before anything else;
- `garbage`: send a non-JSON `data:` line first (non-streaming: a non-JSON 200 body);
- `health_status`: what `GET /health` answers.

`times` limits how many requests the request faults apply to; after that they clear themselves
(`health_status` stays). The body of `POST /_sim/faults` replaces all faults: `{}` clears them.
"""

from __future__ import annotations

import asyncio
from typing import Literal

import msgspec


class Faults(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The node's fault settings (JSON body of `POST /_sim/faults`, shape of `GET /_sim/faults`)."""

    fail_status: int = 0
    fail_rate: float = 1.0
    hang: bool = False
    cut_after: int | None = None
    cut_mode: Literal["drop", "eof"] = "drop"
    close: bool = False
    slow_first_byte_ms: float = 0.0
    garbage: bool = False
    health_status: int = 200
    times: int | None = None

    def __post_init__(self) -> None:
        if self.fail_status and not 400 <= self.fail_status <= 599:
            raise ValueError("fail_status must be an HTTP error status (400-599) or 0")
        if not 0.0 <= self.fail_rate <= 1.0:
            raise ValueError("fail_rate must be between 0 and 1")
        if self.cut_after is not None and self.cut_after < 0:
            raise ValueError("cut_after must be >= 0")
        if not 100 <= self.health_status <= 599:
            raise ValueError("health_status must be an HTTP status")

    @property
    def affects_requests(self) -> bool:
        return bool(
            self.fail_status
            or self.hang
            or self.cut_after is not None
            or self.close
            or self.slow_first_byte_ms
            or self.garbage
        )


class RequestFaults(msgspec.Struct, frozen=True):
    """The faults one request gets, decided when it arrives."""

    fail_status: int = 0
    hang: bool = False
    cut_after: int | None = None
    cut_mode: str = "drop"
    close: bool = False
    slow_first_byte_s: float = 0.0
    garbage: bool = False
    generation: int = 0
    """`FaultState.generation` when the request arrived: a hung request waits for faults newer than these."""


NO_FAULTS = RequestFaults()


class FaultState:
    """The current faults, with an event that wakes hung requests when they change."""

    def __init__(self, faults: Faults | None = None) -> None:
        self.current = faults or Faults()
        self.generation = 0
        """Bumped by every `set`."""
        self._changed = asyncio.Event()
        self._seen = 0

    def set(self, faults: Faults) -> None:
        """Replace all faults and wake every request waiting on the old ones."""
        self.current = faults
        self.generation += 1
        self._seen = 0
        self._changed.set()
        self._changed = asyncio.Event()

    async def changed_since(self, generation: int) -> None:
        """Wait until the faults have been replaced since `generation`; at once if they already were. (A
        request that took a hang fault may start waiting only after the faults were cleared: it must not
        then wait for yet another change.)"""
        while self.generation == generation:
            await self._changed.wait()

    def take(self) -> RequestFaults:
        """The faults for a request arriving now (counts it against `times` and `fail_rate`)."""
        f = self.current
        if not f.affects_requests:
            return NO_FAULTS
        n, self._seen = self._seen, self._seen + 1
        failing = bool(f.fail_status) and int((n + 1) * f.fail_rate) > int(n * f.fail_rate)
        if f.times is not None:
            if f.times <= 1:
                self.current = Faults(health_status=f.health_status)
            else:
                self.current = msgspec.structs.replace(f, times=f.times - 1)
        return RequestFaults(
            generation=self.generation,
            fail_status=f.fail_status if failing else 0,
            hang=f.hang,
            cut_after=f.cut_after,
            cut_mode=f.cut_mode,
            close=f.close,
            slow_first_byte_s=f.slow_first_byte_ms / 1000,
            garbage=f.garbage,
        )
