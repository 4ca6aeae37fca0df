"""One request's tries on nodes: what was prepared, each attempt's bookkeeping, failover and blame.

Shared by the streaming relay (`proxy.relay`) and non-streaming answers (`proxy.messages`):

- `Prepared`: a decoded, hashed request ready to route.
- `Attempt`: one try on one node; books its outcome (lease, node statistics, the cache report, health)
  exactly once, and its progress while it runs.
- `with_failover`: route, run an attempt, and after a failure the node caused, try another node; decide
  whose fault a failure was (docs/health.md, "What counts against a node").
- The request's deadline (`timeouts.stream_deadline_s`) and its access line (`end_request`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import msgspec

from proxy.errors import (
    ClusterUnavailable,
    GatewayError,
    InvalidRequest,
    Overloaded,
    UpstreamError,
    UpstreamTimeout,
)
from proxy.gateway import Gateway
from proxy.logs import RequestRecord, log_access, session_label
from proxy.progress import Progress
from proxy.upstream import NodeFailure
from proxy.wire.anthropic import MessagesRequest
from proxy.wire.openai import ChatCompletionRequest
from state.cache_model import CacheReport
from state.types import Decision, Outcome

log = logging.getLogger("mlxmux.relay")
T = TypeVar("T")


@dataclass(slots=True)
class Prepared:
    """A decoded, hashed request ready to route."""

    raw: bytes
    body: MessagesRequest
    chat: ChatCompletionRequest
    pool: str
    blocks: tuple[str, ...]
    session: str | None
    message_id: str
    request_id: str
    received: float
    record: RequestRecord = field(default_factory=RequestRecord)
    prompt_bytes: int = 0
    """Bytes of the rendered prompt the blocks were cut from (bytes per token, with the node's usage)."""
    tokens: int = 0
    """The prompt's tokens as the pool's calibrated estimate puts them (routed to nodes whose window holds them)."""

    @property
    def upstream_headers(self) -> dict[str, str]:
        """Sent to the node: the conversation key (`x-session-id`), for nodes or proxies that use it."""
        return {"x-session-id": self.session} if self.session else {}


@dataclass(slots=True)
class Attempt:
    """One try of a request on one node; reports its outcome to the store exactly once."""

    gw: Gateway
    prep: Prepared
    decision: Decision
    started: float = field(default_factory=time.monotonic)
    ttft_ms: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    done: bool = False
    progress: Progress = field(init=False)
    """What the node is doing with it (proxy.progress): shown in /cluster while it runs."""

    def __post_init__(self) -> None:
        record = self.prep.record
        record.node, record.reason = self.decision.node_id, self.decision.reason
        record.attempts += 1
        d = self.decision
        log.debug(
            "request %s: pool %s -> node %s, reason %s, attempt %d, prefix %d/%d blocks, expected cached %d",
            self.prep.request_id, self.prep.pool, d.node_id, d.reason, record.attempts, d.matched_blocks,
            d.total_blocks, d.predicted_blocks,
        )  # fmt: skip
        mode = self.gw.settings.server.log_session_ids
        label = session_label(self.prep.session, "off" if mode == "off" else "hash") or ""
        self.progress = self.gw.progress.track(self.decision.lease, label)

    def first_token(self) -> None:
        if not self.ttft_ms:
            self.ttft_ms = (time.monotonic() - self.started) * 1000

    async def _finish(self, outcome: Outcome, status: str) -> None:
        if self.done:
            return
        self.done = True
        self.gw.progress.drop(self.decision.lease)
        if outcome.error_class != "client_cancel":  # a cancelled request may or may not have been stored
            outcome = msgspec.structs.replace(outcome, report=self._cache_report(outcome.ok))
        node, o, record = self.decision.node_id, outcome, self.prep.record
        record.ttft_ms, record.prompt_tokens, record.cached_tokens = o.ttft_ms, o.prompt_tokens, o.cached_tokens
        self.gw.metrics.attempt_ended(
            node, status, self.decision.reason, o.ttft_ms / 1000, o.total_ms / 1000, o.prompt_tokens, o.cached_tokens
        )
        await self.gw.finish(self.decision.lease, outcome)

    def _cache_report(self, ok: bool) -> CacheReport | None:
        """What this answer tells the store about the node's cache (state.cache_model)."""
        prep = self.prep
        if not prep.blocks or not self.gw.settings.routing.cache_feedback:
            return None
        node = self.gw.cluster.nodes.get(self.decision.node_id)
        return CacheReport(
            blocks=prep.blocks,
            prompt_bytes=prep.prompt_bytes,
            prompt_tokens=self.prompt_tokens if ok else 0,
            cached_tokens=self.cached_tokens if ok else 0,
            completion_tokens=self.completion_tokens if ok else 0,
            cache_slots=node.cache_slots if node is not None else 10,
            reported=ok and self.prompt_tokens > 0,
            seen_tick=self.decision.cache_tick,
            predicted_blocks=self.decision.predicted_blocks,
        )

    async def succeed(self) -> None:
        total = (time.monotonic() - self.started) * 1000
        outcome = Outcome(True, self.ttft_ms or total, total, "", self.prompt_tokens, self.cached_tokens)
        await self._finish(outcome, "200")
        await self.gw.health.report_request(self.decision.node_id, None, self.ttft_ms)

    async def fail(self, failure: NodeFailure, *, blame: bool = True) -> None:
        """The attempt failed. `blame=False`: the caller decides later whether it counts against the node."""
        total = (time.monotonic() - self.started) * 1000
        # Once content reached the client the stream ends with an error event, not an HTTP status.
        status = "stream_error" if self.ttft_ms else str(failure_error(failure).status)
        await self._finish(Outcome(False, self.ttft_ms, total, failure.kind), status)
        if blame:
            await self.gw.health.report_request(self.decision.node_id, failure)
        log.warning("node %s failed request %s: %s", self.decision.node_id, self.prep.request_id, failure.message)

    async def abandon(self) -> None:
        """The client went away (or the server is stopping): free the lease, blame no node."""
        total = (time.monotonic() - self.started) * 1000
        with contextlib.suppress(Exception):
            await asyncio.shield(self._finish(Outcome(False, self.ttft_ms, total, "client_cancel"), "client_cancel"))


async def with_failover(
    gw: Gateway, prep: Prepared, run: Callable[[Attempt], Awaitable[T]], *, stop: Callable[[], bool] = lambda: False
) -> T:
    """Route the request and `run` an attempt on the chosen node; after a retryable failure, again on
    another node (the failed ones excluded), up to `routing.max_attempts`, unless `stop()` says no more.

    Blame (docs/health.md, "What counts against a node"): only failures the node caused
    (`NodeFailure.blames_node`) are reported to its health. One that could also be the request's fault
    (`failure_signature`) is held until the next node answers: if that node fails the same way, the
    request is at fault — neither node is blamed, nothing more is tried, and the client gets a 400 with
    the node's words. If it is served, fails otherwise or no node is left, the held failure counts.

    Raises ClusterUnavailable when no node was routable at all, or when every node of the pool failed to
    connect (docs/health.md: 503 with Retry-After, not 529), else the client-facing error of the last
    failure. An attempt the client abandons (cancellation) frees its lease and blames no node.
    """
    tried: list[str] = []
    kinds: set[str] = set()
    last: NodeFailure | None = None
    held: tuple[str, NodeFailure] | None = None
    try:
        for _ in range(gw.settings.routing.max_attempts):
            try:
                decision = await gw.route(prep.pool, prep.blocks, prep.session, tried, prep.tokens)
            except ClusterUnavailable:
                if last is None:
                    raise
                break
            if last is not None:
                gw.metrics.retries.labels(last.kind).inc()
            attempt = Attempt(gw, prep, decision)
            node_id = decision.node_id
            try:
                return await run(attempt)
            except NodeFailure as failure:
                await attempt.fail(failure, blame=False)
                tried.append(node_id)
                last = failure
                kinds.add(failure.kind)
                signature = failure_signature(node_id, failure)
                if held is not None and signature is not None and signature == failure_signature(*held):
                    first, held = held[0], None
                    raise same_way_error(first, node_id, failure) from None
                if held is not None:
                    await _blame(gw, *held)
                    held = None
                if signature is not None and failure.blames_node:
                    held = (node_id, failure)
                elif failure.blames_node:
                    await _blame(gw, node_id, failure)
                if stop() or not failure.retryable:
                    break
            except BaseException:
                await attempt.abandon()
                raise
    finally:
        if held is not None:
            await _blame(gw, *held)
    assert last is not None
    if kinds == {"connect"} and not gw.cluster.candidates(prep.pool, tried):
        raise gw.unavailable(prep.pool)
    raise failure_error(last)


async def _blame(gw: Gateway, node_id: str, failure: NodeFailure) -> None:
    """Count a failure against the node (also while the request is being cancelled)."""
    with contextlib.suppress(Exception):
        await asyncio.shield(gw.health.report_request(node_id, failure))


# Statuses that say the node (or a proxy in front of it) is down or busy, whatever was asked.
_STATE_STATUSES = frozenset({502, 503, 504})


def failure_signature(node_id: str, failure: NodeFailure) -> tuple[str, str] | None:
    """What a failure looks like apart from the node that gave it, when it may be the request's fault.

    Two failures are "the same way" when their signatures are equal: the same kind and the same words,
    the node's id taken out. Only answers that can depend on the request have one: an HTTP error with a
    message from its body (not 502/503/504, which describe the server, not the request), a broken
    answer or stream (mlx_lm.server hangs up on some invalid parameters), unless it was over the gateway's
    size cap (no request asks for that). Connect errors, timeouts and the gateway's own failures have
    none: two dead or slow nodes are two dead or slow nodes.
    """
    if failure.kind in ("http_4xx", "http_5xx"):
        if failure.status in _STATE_STATUSES or failure.message == f"node answered HTTP {failure.status}":
            return None
    elif failure.kind not in ("protocol", "stream_cut") or failure.oversized:
        return None
    return failure.kind, failure.message.replace(f"node {node_id}", "node")


def same_way_error(first: str, second: str, failure: NodeFailure) -> InvalidRequest:
    """The client's answer when two nodes failed a request the same way: the request is at fault."""
    words = failure.message.replace(f"node {second}", "the node")
    status = f"HTTP {failure.status}: " if failure.status else ""
    return InvalidRequest(
        f"nodes {first} and {second} both failed this request the same way, so it is not retried "
        f"(check its parameters): {status}{words}"
    )


def failure_error(failure: NodeFailure) -> GatewayError:
    """What the client sees when a node failed and no other node could take the request."""
    if failure.kind == "http_4xx":
        return InvalidRequest(f"the node rejected the request: {failure.message}")
    if failure.kind == "request_header":
        return InvalidRequest(failure.message)
    if failure.kind == "pool_wait":
        return Overloaded(f"{failure.message}; retry shortly", retry_after=POOL_RETRY_AFTER_S)
    if failure.kind == "gateway":
        return UpstreamError(failure.message)
    if failure.kind == "timeout":
        return UpstreamTimeout(failure.message)
    if failure.kind == "protocol":
        return UpstreamError(failure.message)
    return Overloaded(failure.message)


POOL_RETRY_AFTER_S = 2
"""Retry-After (seconds) when the gateway's connections to the nodes are all busy."""


def request_deadline(gw: Gateway, prep: Prepared) -> float:
    """When the request must be over (time.monotonic()), all attempts included: `timeouts.stream_deadline_s`
    after it arrived; inf without a deadline."""
    limit = gw.settings.timeouts.stream_deadline_s
    return prep.received + limit if limit > 0 else math.inf


def past_deadline(deadline: float) -> bool:
    """The deadline has passed (or is within 10 ms: event-loop timers may fire a hair early), so no
    further attempt is worth starting."""
    return time.monotonic() >= deadline - 0.01


def deadline_failure(gw: Gateway, node_id: str) -> NodeFailure:
    """A node still busy with the answer when the request's deadline passed: a node timeout."""
    limit = gw.settings.timeouts.stream_deadline_s
    return NodeFailure(
        "timeout",
        f"node {node_id} did not finish the answer within the request deadline of {limit:g}s "
        "(timeouts.stream_deadline_s)",
    )


def end_request(gw: Gateway, record: RequestRecord, status: int | str) -> None:
    """A /v1/messages request is over: its access line, and the count of a request that reached no node."""
    if not record.attempts:
        gw.metrics.requests.labels("", str(status), "").inc()
    log_access(record, status, gw.settings.server.log_session_ids)


def native_usage(usage: object, attempt: Attempt) -> None:
    """Book a native node's Anthropic `usage` on the attempt: prompt = fresh + cache reads + cache writes."""
    if not isinstance(usage, dict):
        return
    try:
        cached = int(usage.get("cache_read_input_tokens") or 0)
        prompt = cached + int(usage.get("input_tokens") or 0) + int(usage.get("cache_creation_input_tokens") or 0)
    except (ValueError, TypeError):
        return
    if prompt:
        attempt.prompt_tokens, attempt.cached_tokens = prompt, cached
    with contextlib.suppress(ValueError, TypeError):
        attempt.completion_tokens = int(usage.get("output_tokens") or 0) or attempt.completion_tokens
