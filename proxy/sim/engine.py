"""The simulated node's engine: slots, prompt cache, timing and counters, independent of HTTP.

`SimNode.generate` is an async generator of events for one request, in mlx_lm.server's order:

- `Started` at once: the cache was consulted when the request arrived (mlx fetches from its cache when it
  admits a request into its batch, before the request gets its turn), so response headers go out at once;
- then the request waits for one of `parallel` slots;
- `Keepalive` after each prefill step (mlx's `: keepalive N/M`, N of the M uncached tokens): steps of
  `prefill_step_size` tokens that never cross a segment end (`proxy.sim.model.prompt_segments`); the last
  prompt token is held back and reported alone (M/M), as mlx's batch generator does. At the end of each
  segment but that last token, the cache gets a checkpoint of the prompt so far ("system", "user" or
  "assistant", the segment's kind);
- a `Piece` per generated token, then `Finished`; prompt + generated tokens are stored just before it.

Cancelling the consumer (the client went away) stops the generation and frees the slot at once. Like mlx's
batched path, nothing more is stored then: only the checkpoints already saved stay.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable

import msgspec

from proxy.sim.cache import TOKEN_BYTES, CacheEntry, EntryKind, PromptCache, token_count
from proxy.sim.config import SimConfig
from proxy.sim.faults import Faults, FaultState
from proxy.sim.model import Segment
from proxy.sim.script import Piece, TokenPlan


class Started(msgspec.Struct, frozen=True):
    prompt_tokens: int
    cached_tokens: int


class Keepalive(msgspec.Struct, frozen=True):
    processed: int
    total: int


class Finished(msgspec.Struct, frozen=True):
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    stop_sequence: str | None = None


Event = Started | Keepalive | Piece | Finished


class ConversationStats(msgspec.Struct):
    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0


class RequestRecord(msgspec.Struct, frozen=True):
    """One served generation, as listed in `/_sim/stats` `recent`."""

    conversation: str | None
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    finish_reason: str


class Stats(msgspec.Struct):
    """Counters since start or the last `/_sim/reset`."""

    requests: int = 0
    messages_requests: int = 0
    """Of `requests`, those on the native `POST /v1/messages` endpoint (--anthropic)."""
    health_checks: int = 0
    """`GET /health` calls (gateway probes)."""
    completed: int = 0
    errors: int = 0
    disconnects: int = 0
    generations: int = 0
    """Requests that got a generation slot (began prefill), finished or not."""
    busy_s: float = 0.0
    """Seconds generations held a slot, summed: the work the node did, including work thrown away."""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    conversations: list[str] = msgspec.field(default_factory=list)
    per_conversation: dict[str, ConversationStats] = msgspec.field(default_factory=dict)
    recent: deque[RequestRecord] = msgspec.field(default_factory=lambda: deque(maxlen=100))


class StatsView(msgspec.Struct, frozen=True):
    """Body of `GET /_sim/stats`."""

    id: str
    model: str
    requests: int
    messages_requests: int
    health_checks: int
    completed: int
    errors: int
    disconnects: int
    generations: int
    busy_s: float
    active: int
    hanging: int
    generating: int
    queued: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cache_hit_ratio: float
    cache_capacity: int
    cache_entries: list[CacheEntry]
    conversations: list[str]
    per_conversation: dict[str, ConversationStats]
    recent: list[RequestRecord]
    faults: Faults


class SimNode:
    """State of one simulated node: config, prompt cache, generation slots, faults and counters."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.cache = PromptCache(config.prompt_cache_size)
        self.faults = FaultState(config.faults)
        self.stats = Stats()
        self.active = 0  # inference requests in flight, whatever they are doing
        self.hanging = 0  # held by the hang fault
        self.generating = 0  # holding a slot
        self.queued = 0  # waiting for a slot
        self._slots = asyncio.Semaphore(config.parallel)

    def reset(self) -> None:
        """Forget counters and the prompt cache (faults stay)."""
        self.stats = Stats()
        self.cache.clear()

    def view(self) -> StatsView:
        s = self.stats
        return StatsView(
            id=self.config.name,
            model=self.config.model,
            requests=s.requests,
            messages_requests=s.messages_requests,
            health_checks=s.health_checks,
            completed=s.completed,
            errors=s.errors,
            disconnects=s.disconnects,
            generations=s.generations,
            busy_s=round(s.busy_s, 3),
            active=self.active,
            hanging=self.hanging,
            generating=self.generating,
            queued=self.queued,
            prompt_tokens=s.prompt_tokens,
            cached_tokens=s.cached_tokens,
            completion_tokens=s.completion_tokens,
            cache_hit_ratio=round(s.cached_tokens / s.prompt_tokens, 4) if s.prompt_tokens else 0.0,
            cache_capacity=self.cache.capacity,
            cache_entries=self.cache.entries(),
            conversations=list(s.conversations),
            per_conversation=dict(s.per_conversation),
            recent=list(s.recent),
            faults=self.faults.current,
        )

    async def generate(
        self,
        prompt: bytes,
        make_plan: Callable[[int, int], TokenPlan],
        conversation: str | None = None,
        segments: list[Segment] | None = None,
    ) -> AsyncGenerator[Event, None]:
        """Run one generation: consult the cache, wait for a slot, prefill, decode.

        `make_plan(prompt_tokens, cached_tokens)` decides the reply once the cache was consulted; `segments`
        (default: the whole prompt as one "assistant" segment) say where prefill saves checkpoints.
        Close the iterator (`aclosing`) when done with it, so an abandoned generation frees its slot.
        """
        prompt_tokens = token_count(prompt)
        cached = self.cache.fetch(prompt)
        self._count_prompt(conversation, prompt_tokens, cached)
        yield Started(prompt_tokens, cached)
        self.queued += 1
        try:
            await self._slots.acquire()
        finally:
            self.queued -= 1
        self.generating += 1
        self.stats.generations += 1
        held = time.monotonic()
        try:
            rest = prompt_tokens - cached
            tps = self.config.prefill_tps
            start = time.monotonic()
            points = prefill_points(segments or [("assistant", prompt_tokens)], cached, self.config.prefill_step_size)
            for done, checkpoint in points:
                await _sleep_until(start + done / tps if tps > 0 else 0.0, 0)
                if checkpoint is not None:
                    kind, end = checkpoint
                    self.cache.insert(prompt[: end * TOKEN_BYTES], kind)
                yield Keepalive(done, rest)
            plan = make_plan(prompt_tokens, cached)
            delay = self.config.token_delay_ms / 1000
            start = time.monotonic()
            for generated, piece in enumerate(plan.pieces):
                await _sleep_until(start + (generated + 1) * delay, generated)
                yield piece
            self.cache.insert(prompt + plan.cells, "assistant")
            s = self.stats
            s.completed += 1
            s.completion_tokens += plan.completion_tokens
            s.recent.append(
                RequestRecord(conversation, prompt_tokens, cached, plan.completion_tokens, plan.finish_reason)
            )
            yield Finished(plan.finish_reason, prompt_tokens, cached, plan.completion_tokens, plan.stop_sequence)
        finally:
            self.stats.busy_s += time.monotonic() - held
            self.generating -= 1
            self._slots.release()

    def _count_prompt(self, conversation: str | None, prompt_tokens: int, cached: int) -> None:
        s = self.stats
        s.prompt_tokens += prompt_tokens
        s.cached_tokens += cached
        if conversation is None:
            return
        conv = s.per_conversation.get(conversation)
        if conv is None:
            conv = s.per_conversation[conversation] = ConversationStats()
            s.conversations.append(conversation)
        conv.requests += 1
        conv.prompt_tokens += prompt_tokens
        conv.cached_tokens += cached


def prefill_points(segments: list[Segment], cached: int, step: int) -> list[tuple[int, tuple[EntryKind, int] | None]]:
    """mlx_lm.server's prefill progress for a prompt cut into `segments` of which `cached` tokens are reused.

    One point per step: (uncached tokens processed so far, the checkpoint saved after this step or None).
    Steps hold at most `step` tokens and end at segment ends; the prompt's last token is held back and
    reported alone at the end, without a checkpoint.
    """
    if not segments:
        return []
    total = segments[-1][1]
    points: list[tuple[int, tuple[EntryKind, int] | None]] = []
    pos = cached
    for kind, end in segments:
        end = min(end, total - 1)
        while pos < end:
            pos = min(pos + step, end)
            points.append((pos - cached, (kind, end) if pos == end else None))
    if total > cached:
        points.append((total - cached, None))
    return points


async def _sleep_until(deadline: float, i: int) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    elif i % 32 == 0:
        await asyncio.sleep(0)  # let other requests run even when decoding is instant
