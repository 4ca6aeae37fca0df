"""Prometheus metrics (`GET /metrics`): what each replica saw of its requests, nodes and store.

One `Metrics` per gateway, with its own `CollectorRegistry` (several apps may live in one process,
as in the tests). Request outcomes are recorded as they happen (`proxy.attempts.Attempt`); node state,
drain, in-flight and store reachability are copied from the gateway's local view at scrape time, so
recording them costs the hot path nothing. The metric list and example queries: docs/operations.md.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response

from state.types import NodeState

if TYPE_CHECKING:
    from proxy.gateway import Gateway

# From a warm cache hit on a small prompt (tens of ms) to a cold 30k-token prefill on a Mac (minutes).
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 180.0, 300.0)


class Metrics:
    """The collectors of one gateway."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "mlxmux_requests",
            "Attempts of /v1/messages requests on a node, by outcome (HTTP status, stream_error, client_cancel) "
            'and routing reason; requests that reached no node have node=""',
            ["node", "status", "reason"],
            registry=r,
        )
        self.ttft = Histogram(
            "mlxmux_time_to_first_token_seconds",
            "Time from sending a request to a node until its first content",
            ["node"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "mlxmux_request_duration_seconds",
            "Time a request spent on a node, until its answer ended or failed",
            ["node"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "mlxmux_prompt_tokens", "Prompt tokens of answered requests (node-reported)", ["node"], registry=r
        )
        self.cached_tokens = Counter(
            "mlxmux_cached_tokens", "Prompt tokens the node served from its prompt cache", ["node"], registry=r
        )
        self.retries = Counter(
            "mlxmux_retries", "Failed attempts retried on another node, by failure kind", ["reason"], registry=r
        )
        self.joined = Counter(
            "mlxmux_resends_joined",
            "Streamed requests that joined the same request's answer in flight instead of asking a node again, "
            "by where its owner was (local: this replica, shared: another one)",
            ["where"],
            registry=r,
        )
        self.store_errors = Counter(
            "mlxmux_store_errors", "Shared store operations that failed (Redis unreachable or timed out)", registry=r
        )
        self.node_state = Gauge(
            "mlxmux_node_state", "1 for the node's current health state, else 0", ["node", "state"], registry=r
        )
        self.node_draining = Gauge("mlxmux_node_draining", "1 while the node is draining", ["node"], registry=r)
        self.inflight = Gauge("mlxmux_inflight", "Requests in flight on the node (this replica)", ["node"], registry=r)
        self.store_shared = Gauge(
            "mlxmux_store_shared",
            "1 while routing with the configured store, 0 in degraded mode (shared store unreachable)",
            registry=r,
        )

    def attempt_ended(
        self,
        node: str,
        status: str,
        reason: str,
        ttft_s: float,
        total_s: float,
        prompt_tokens: int = 0,
        cached_tokens: int = 0,
    ) -> None:
        """One attempt on a node is over; `ttft_s` is 0 when no content came."""
        self.requests.labels(node, status, reason).inc()
        if ttft_s > 0:
            self.ttft.labels(node).observe(ttft_s)
        self.duration.labels(node).observe(total_s)
        if prompt_tokens:
            self.prompt_tokens.labels(node).inc(prompt_tokens)
        if cached_tokens:
            self.cached_tokens.labels(node).inc(cached_tokens)

    def refresh(
        self, nodes: Iterable[str], states: Mapping[str, str], draining: Collection[str], inflight: Iterable[str]
    ) -> None:
        """Copy the local view into the gauges (at scrape time); nodes gone since the last scrape disappear."""
        self.node_state.clear()
        self.node_draining.clear()
        self.inflight.clear()
        counts = Tally(inflight)
        for node in nodes:
            current = states.get(node, NodeState.INITIALIZING)
            for state in NodeState:
                self.node_state.labels(node, state.value).set(1 if state == current else 0)
            self.node_draining.labels(node).set(1 if node in draining else 0)
            self.inflight.labels(node).set(counts.get(node, 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def metrics_endpoint(request: Request) -> Response:
    """GET /metrics in the Prometheus text format."""
    gw: Gateway = request.app.state.gateway
    m = gw.metrics
    m.refresh(gw.cluster.nodes, gw.cluster.states, gw.cluster.draining, (lease.node_id for lease in gw.inflight))
    m.store_shared.set(1 if gw.store_ok and gw.health.shared else 0)
    return Response(m.render(), media_type=CONTENT_TYPE_LATEST)
