"""Node health transitions and the circuit breaker (state.health): pure functions, table-tested."""

from __future__ import annotations

import msgspec
import pytest

from state.health import (
    Breaker,
    HealthPolicy,
    NodeHealth,
    cluster_status,
    on_probe,
    on_request,
    probe_due,
    start_trial,
)
from state.types import NodeState

P = HealthPolicy(fail_threshold=2, pass_threshold=2, request_fail_threshold=3, open_ms=1000, max_backoff_ms=8000)
H = NodeHealth
S = NodeState


def probes(h: NodeHealth, *results: str | None, now: int = 0, step: int = 100) -> NodeHealth:
    for i, error in enumerate(results):
        h = on_probe(h, error, P, now + i * step, jitter=0.5)
    return h


def test_a_new_node_is_healthy_after_one_passing_probe() -> None:
    h = probes(H(), None)
    assert (h.state, h.breaker) == (S.HEALTHY, Breaker.CLOSED)


def test_a_new_node_failing_its_probes_is_taken_out() -> None:
    h = probes(H(), "refused")
    assert h.state == S.INITIALIZING and h.fails == 1  # not used until a probe passes
    h = probes(h, "refused", now=500)
    assert (h.state, h.breaker, h.last_error) == (S.UNHEALTHY, Breaker.OPEN, "refused")
    assert h.retry_at_ms == 500 + 1000  # open_ms, jitter 0.5 → factor 1.0


def test_one_failed_probe_degrades_then_passes_heal() -> None:
    h = probes(H(), None, "timeout")
    assert (h.state, h.breaker) == (S.DEGRADED, Breaker.CLOSED)
    assert probes(h, None).state == S.DEGRADED  # pass_threshold 2
    assert probes(h, None, None).state == S.HEALTHY


def test_breaker_waits_then_half_opens_and_backs_off() -> None:
    down = probes(H(state=S.HEALTHY), "a", "b", now=0)
    assert down.breaker == Breaker.OPEN
    assert not probe_due(down, down.retry_at_ms - 1)
    assert probe_due(down, down.retry_at_ms)
    trial = start_trial(down)
    assert trial.breaker == Breaker.HALF_OPEN
    again = on_probe(trial, "still down", P, down.retry_at_ms, jitter=0.5)
    assert (again.breaker, again.backoff_ms) == (Breaker.OPEN, 2000)  # doubled
    for _ in range(5):
        again = on_probe(start_trial(again), "still down", P, again.retry_at_ms, jitter=0.5)
    assert again.backoff_ms == 8000  # capped
    back = on_probe(start_trial(again), None, P, again.retry_at_ms, jitter=0.5)
    assert (back.state, back.breaker, back.backoff_ms, back.last_error) == (S.HEALTHY, Breaker.CLOSED, 0, "")


@pytest.mark.parametrize("jitter", [0.0, 0.999])
def test_retry_time_is_jittered_within_20_percent(jitter: float) -> None:
    h = on_probe(H(fails=1), "x", P, 0, jitter=jitter)
    assert 800 <= h.retry_at_ms <= 1200


def test_down_long_enough_is_offline() -> None:
    policy = msgspec.structs.replace(P, offline_after_ms=5000)
    h = on_probe(H(fails=1), "x", policy, 1000)
    assert h.state == S.UNHEALTHY
    h = on_probe(start_trial(h), "x", policy, 7000)
    assert (h.state, h.down_since_ms) == (S.OFFLINE, 1000)
    assert on_probe(start_trial(h), None, policy, 8000).state == S.HEALTHY


def test_connect_error_on_a_request_takes_the_node_out_at_once() -> None:
    h = on_request(H(state=S.HEALTHY), "connect", "refused", P, 0)
    assert (h.state, h.breaker) == (S.UNHEALTHY, Breaker.OPEN)


def test_request_failures_degrade_then_open_and_success_heals() -> None:
    h = on_request(H(state=S.HEALTHY), "http_5xx", "500", P, 0)
    assert (h.state, h.request_fails) == (S.DEGRADED, 1)
    assert on_request(h, None, "", P, 1).state == S.HEALTHY
    h = on_request(on_request(h, "timeout", "slow", P, 1), "stream_cut", "cut", P, 2)
    assert (h.state, h.breaker) == (S.UNHEALTHY, Breaker.OPEN)
    assert on_request(h, None, "", P, 3) == h  # a late success does not close an open breaker


def test_a_slow_first_token_degrades_without_counting_as_a_failure() -> None:
    h = on_request(H(state=S.HEALTHY), "slow", "first token after 200 s", P, 0)
    assert (h.state, h.request_fails, h.breaker) == (S.DEGRADED, 0, Breaker.CLOSED)
    for _ in range(5):
        h = on_request(h, "slow", "still slow", P, 1)
    assert h.state == S.DEGRADED and h.breaker == Breaker.CLOSED
    assert on_request(h, None, "", P, 2).state == S.HEALTHY  # a normal answer heals it


def test_success_on_a_healthy_node_changes_nothing() -> None:
    h = H(state=S.HEALTHY, version=7)
    assert on_request(h, None, "", P, 5) is h


@pytest.mark.parametrize(
    ("records", "status"),
    [
        ([], "offline"),
        ([H(), H()], "starting"),
        ([H(state=S.HEALTHY), H(state=S.HEALTHY)], "healthy"),
        ([H(state=S.HEALTHY), H(state=S.DEGRADED)], "degraded"),
        ([H(state=S.HEALTHY), H(state=S.HEALTHY, draining=True)], "degraded"),
        ([H(state=S.HEALTHY), H(state=S.UNHEALTHY), H(state=S.OFFLINE)], "critical"),
        ([H(state=S.UNHEALTHY), H(state=S.OFFLINE)], "offline"),
    ],
)
def test_cluster_status(records: list[NodeHealth], status: str) -> None:
    assert cluster_status(records) == status
