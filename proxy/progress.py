"""What each request in flight is doing on its node, for `GET /cluster` and `mlxmux status`.

mlx_lm.server reports prefill progress while it works: `: keepalive N/M` comments in the stream (N of the
M prompt tokens it has to process). The relay feeds them here, with the first content and each chunk
after it; this replica sends what changed to the shared store once a second, in one round trip, for
requests older than that (a quick answer costs the store nothing). The store keeps a record only while
the request's lease is live (state.inflight), so every replica lists the same requests.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from state.inflight import Phase, RequestProgress
from state.types import Lease

REPORT_INTERVAL_S = 1.0
"""How often a replica sends progress, and how old a request must be to have it shown."""

_KEEPALIVE = re.compile(r"keepalive (\d+)/(\d+)")


def prefill_progress(comment: str) -> tuple[int, int] | None:
    """(tokens processed, tokens to process) from mlx_lm.server's `: keepalive N/M` comment, else None."""
    found = _KEEPALIVE.fullmatch(comment.strip())
    return (int(found[1]), int(found[2])) if found else None


@dataclass(slots=True)
class Progress:
    """One attempt's progress; `changed` until it was sent."""

    lease: Lease
    session: str
    started: float
    phase: Phase = Phase.QUEUED
    done: int = 0
    total: int = 0
    joined: int = 0
    changed: bool = True
    waiting: Callable[[], int] | None = None
    """How many copies of the request wait for this answer (proxy.joins), when others may join it."""

    def prefill(self, done: int, total: int) -> None:
        if self.phase is not Phase.GENERATING and (done, total) != (self.done, self.total):
            self.phase, self.done, self.total, self.changed = Phase.PREFILL, done, total, True

    def token(self) -> None:
        """One more piece of the answer streamed."""
        if self.phase is not Phase.GENERATING:
            self.phase, self.done, self.total = Phase.GENERATING, 0, 0
        self.done += 1
        self.changed = True

    def record(self, now: float) -> RequestProgress:
        age = int((now - self.started) * 1000)
        return RequestProgress(self.lease.lease_id, self.phase, self.done, self.total, self.session, age, self.joined)


class ProgressBook:
    """The progress of this replica's attempts in flight."""

    def __init__(self) -> None:
        self.live: dict[Lease, Progress] = {}

    def track(self, lease: Lease, session: str) -> Progress:
        progress = self.live[lease] = Progress(lease, session, time.monotonic())
        return progress

    def drop(self, lease: Lease) -> None:
        self.live.pop(lease, None)

    def unsent(self, updates: Sequence[tuple[Lease, RequestProgress]]) -> None:
        """Records `due` gave that did not reach the store: due again next time (if still in flight)."""
        for lease, _ in updates:
            if (progress := self.live.get(lease)) is not None:
                progress.changed = True

    def due(self, now: float) -> list[tuple[Lease, RequestProgress]]:
        """What to send now: changed records of requests older than REPORT_INTERVAL_S (marked sent)."""
        out = []
        for progress in self.live.values():
            if progress.waiting is not None and (joined := progress.waiting()) != progress.joined:
                progress.joined, progress.changed = joined, True
            if progress.changed and now - progress.started >= REPORT_INTERVAL_S:
                progress.changed = False
                out.append((progress.lease, progress.record(now)))
        return out
