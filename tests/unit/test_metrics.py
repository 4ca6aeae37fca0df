"""Metrics: what a Prometheus scrape shows after a few recorded outcomes."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import Metrics


def samples(m: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = m.render().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_attempts_become_counters_and_histograms() -> None:
    m = Metrics()
    m.attempt_ended("mac1", "200", "prefix", 0.3, 2.0, prompt_tokens=1000, cached_tokens=800)
    m.attempt_ended("mac1", "200", "session", 0.04, 1.0, prompt_tokens=500, cached_tokens=500)
    m.attempt_ended("mac2", "529", "cold", 0.0, 0.2)
    m.retries.labels("http_5xx").inc()
    s = samples(m)
    assert s[("mlxmux_requests_total", (("node", "mac1"), ("reason", "prefix"), ("status", "200")))] == 1
    assert s[("mlxmux_requests_total", (("node", "mac2"), ("reason", "cold"), ("status", "529")))] == 1
    assert s[("mlxmux_prompt_tokens_total", (("node", "mac1"),))] == 1500
    assert s[("mlxmux_cached_tokens_total", (("node", "mac1"),))] == 1300
    assert s[("mlxmux_retries_total", (("reason", "http_5xx"),))] == 1
    # A failure before any content has no time to first token, but its duration counts.
    assert s[("mlxmux_time_to_first_token_seconds_count", (("node", "mac1"),))] == 2
    assert ("mlxmux_time_to_first_token_seconds_count", (("node", "mac2"),)) not in s
    assert s[("mlxmux_request_duration_seconds_count", (("node", "mac2"),))] == 1
    assert s[("mlxmux_time_to_first_token_seconds_bucket", (("le", "0.05"), ("node", "mac1")))] == 1
    assert s[("mlxmux_time_to_first_token_seconds_bucket", (("le", "300.0"), ("node", "mac1")))] == 2


def test_refresh_sets_one_state_per_node_and_forgets_removed_nodes() -> None:
    m = Metrics()
    m.refresh(["mac1", "mac2"], {"mac1": "healthy", "mac2": "offline"}, {"mac2"}, ["mac1", "mac1"])
    s = samples(m)
    assert s[("mlxmux_node_state", (("node", "mac1"), ("state", "healthy")))] == 1
    assert s[("mlxmux_node_state", (("node", "mac1"), ("state", "degraded")))] == 0
    assert s[("mlxmux_node_state", (("node", "mac2"), ("state", "offline")))] == 1
    assert s[("mlxmux_node_draining", (("node", "mac2"),))] == 1
    assert s[("mlxmux_inflight", (("node", "mac1"),))] == 2
    assert s[("mlxmux_inflight", (("node", "mac2"),))] == 0
    m.refresh(["mac1"], {}, set(), [])
    s = samples(m)
    assert s[("mlxmux_node_state", (("node", "mac1"), ("state", "initializing")))] == 1
    assert not any(labels and ("node", "mac2") in labels for _, labels in s)


def test_each_gateway_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.store_errors.inc()
    assert samples(a)[("mlxmux_store_errors_total", ())] == 1
    assert samples(b)[("mlxmux_store_errors_total", ())] == 0
