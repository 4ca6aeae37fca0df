"""GET /metrics and the JSON access log of a real gateway process in front of a sim node."""

from __future__ import annotations

import hashlib
import json
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.procs import Proc, gateway, sim_node

pytestmark = pytest.mark.slow

PROMPT_MARKER = "zebraquokka7319"
KEY_MARKER = "sk-secretmarker-5521"
SESSION = "obs-session-42"


def access_lines(gw: Proc, count: int, timeout: float = 5.0) -> list[dict]:
    """The gateway's access lines, once there are `count` (a stream's line follows its last byte)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [json.loads(line) for line in gw.output().splitlines() if line.strip()]
        found = [line for line in lines if line["logger"] == "mlxmux.access"]
        if len(found) >= count or time.monotonic() > deadline:
            return found


def test_metrics_and_json_access_log() -> None:
    env = {"MLXMUX_LOG_FORMAT": "json", "MLXMUX_REQUEST_FAIL_THRESHOLD": "1000", "MLXMUX_HEALTH_INTERVAL_S": "0.5"}
    with (
        sim_node("--id", "mac1", "--token-delay-ms", "1", "--reply-tokens", "8", name="mac1") as node,
        gateway(f"mac1={node.url}", env=env) as gw,
    ):
        headers = {"x-api-key": KEY_MARKER, "x-claude-code-session-id": SESSION}
        body = {
            "model": "claude-opus-4-8",
            "max_tokens": 64,
            "stream": True,
            "messages": [{"role": "user", "content": f"please say {PROMPT_MARKER}"}],
        }
        with httpx.stream("POST", gw.url + "/v1/messages", json=body, headers=headers, timeout=20) as r:
            assert r.status_code == 200
            assert "message_stop" in r.read().decode()
        httpx.post(node.url + "/_sim/faults", json={"fail_status": 500}, timeout=5).raise_for_status()
        r = httpx.post(gw.url + "/v1/messages", json={**body, "stream": False}, headers=headers, timeout=20)
        assert r.status_code == 529
        httpx.post(node.url + "/_sim/faults", json={}, timeout=5).raise_for_status()

        scrape = httpx.get(gw.url + "/metrics", timeout=5)
        assert scrape.status_code == 200 and scrape.headers["content-type"].startswith("text/plain")
        samples = [s for f in text_string_to_metric_families(scrape.text) for s in f.samples]

        def value(name: str, **labels: str) -> float:
            return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())

        assert value("mlxmux_requests_total", node="mac1", status="200") == 1
        assert value("mlxmux_requests_total", node="mac1", status="529") == 1
        assert value("mlxmux_time_to_first_token_seconds_count", node="mac1") >= 1
        assert value("mlxmux_request_duration_seconds_count", node="mac1") == 2
        assert value("mlxmux_prompt_tokens_total", node="mac1") > 0
        # One state at a time; the failed request may have degraded the node.
        assert value("mlxmux_node_state", node="mac1") == 1
        assert (
            value("mlxmux_node_state", node="mac1", state="healthy")
            + value("mlxmux_node_state", node="mac1", state="degraded")
            == 1
        )
        assert value("mlxmux_store_shared") == 1
        assert value("mlxmux_inflight", node="mac1") == 0

        streamed, failed = access_lines(gw, 2)
        hashed = hashlib.sha256(SESSION.encode()).hexdigest()[:12]
        for line in (streamed, failed):
            assert line["request_id"].startswith("req_")
            assert line["session"] == hashed
            assert (line["method"], line["path"], line["model"]) == ("POST", "/v1/messages", "claude-opus-4-8")
            assert line["node"] == "mac1" and line["reason"] and line["attempts"] == 1
            assert line["total_ms"] > 0
        assert streamed["status"] == 200 and streamed["ttft_ms"] > 0 and streamed["prompt_tokens"] > 0
        assert "cached_share" in streamed
        assert failed["status"] == 529
        log = gw.output()
        assert PROMPT_MARKER not in log
        assert KEY_MARKER not in log
        assert SESSION not in log


def test_debug_logs_show_the_gateways_decisions_not_every_http_request() -> None:
    """httpx logs each request at INFO (four lines a probe round): off, even at debug level."""
    env = {"MLXMUX_LOG_LEVEL": "debug", "MLXMUX_HEALTH_INTERVAL_S": "0.2"}
    with sim_node() as node, gateway(node.url, env=env) as gw:
        with httpx.Client(timeout=10) as client:
            r = client.post(
                gw.url + "/v1/messages",
                json={"model": "claude-opus-4-8", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
            )
        time.sleep(1.0)  # several probe rounds
        out = gw.output()
    assert "mlxmux.access" in out  # the gateway's own lines are there
    # ... and its routing decision for the request, at debug level
    decision = f"DEBUG mlxmux.relay request {r.headers['request-id']}: pool default -> node 127.0.0.1:"
    assert decision in out, out[-2000:]
    assert "HTTP Request:" not in out, out[-2000:]
    assert not [line for line in out.splitlines() if " httpx " in line or " httpcore" in line]
