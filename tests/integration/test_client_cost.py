"""What one client can cost the gateway, against a real gateway process (issue 11):

- a client hanging up in the middle of its upload is a `client_cancel` (access line, metrics), not a
  traceback and a 500;
- `count_tokens` is limited like `/v1/messages`: a team key's concurrent requests beyond
  `auth.max_concurrent_per_key` get 429 before their body is read, so 25 concurrent 31 MB bodies cost
  the replica the memory of two, not of 25.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.procs import Proc, gateway, sim_node

pytestmark = pytest.mark.slow

KEY = "sk-alice-test-key"


def status_kb(proc: Proc, field: str) -> int:
    """A /proc/PID/status figure in kB: VmRSS (resident now) or VmHWM (the most it has been)."""
    text = Path(f"/proc/{proc.proc.pid}/status").read_text()
    return int(next(line.split()[1] for line in text.splitlines() if line.startswith(field + ":")))


def wait_for_line(gw: Proc, *words: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in gw.output().splitlines():
            if all(w in line for w in words):
                return line
        time.sleep(0.05)
    raise AssertionError(f"no log line with {words}:\n{gw.output()[-3000:]}")


@pytest.fixture(scope="module")
def gw() -> Iterator[Proc]:
    env = {"MLXMUX_API_KEYS": f"alice:{KEY}", "MLXMUX_MAX_CONCURRENT_PER_KEY": "2", "MLXMUX_HEALTH_INTERVAL_S": "30"}
    with (
        sim_node("--id", "sim", "--token-delay-ms", "0", "--reply-tokens", "4", name="sim") as node,
        gateway(f"sim={node.url}", env=env) as g,
    ):
        yield g


def hang_up_mid_upload(gw: Proc, path: str, declared: int = 1_000_000) -> None:
    """Headers announcing `declared` bytes, half of them, then close the socket without reading."""
    head = (
        f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
        f"x-api-key: {KEY}\r\ncontent-length: {declared}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(head + b'{"model": "claude-opus-4-8", "messages": [{"role": "user", "content": "')
        s.sendall(b"x" * (declared // 2))
        time.sleep(0.3)  # the gateway is reading the body now


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
def test_a_client_hanging_up_mid_upload_is_a_client_cancel(gw: Proc, path: str) -> None:
    before = gw.output().count("status=client_cancel")
    hang_up_mid_upload(gw, path)
    if path == "/v1/messages":
        line = wait_for_line(gw, "mlxmux.access", "path=/v1/messages", "status=client_cancel")
        assert "attempts=0" in line, line
        assert gw.output().count("status=client_cancel") == before + 1
    else:
        time.sleep(1.0)  # count_tokens writes no access line: give a traceback the time to show
    output = gw.output()
    assert "Traceback" not in output and "unhandled error" not in output and "status=500" not in output, output
    # The replica goes on serving this key: the slot the hung-up request held was given back.
    headers = {"x-api-key": KEY}
    body = {"model": "claude-opus-4-8", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(3):  # more than max_concurrent_per_key (2): a leaked slot would show as a 429
        r = httpx.post(gw.url + path, json=body, headers=headers, timeout=10)
        assert r.status_code == 200, r.text
    metrics = httpx.get(gw.url + "/metrics", timeout=5).text
    if path == "/v1/messages":
        assert 'mlxmux_requests_total{node="",reason="",status="client_cancel"}' in metrics


def test_count_tokens_takes_a_slot_so_large_bodies_cannot_pile_up(gw: Proc) -> None:
    text = "word " * (31 * 1024 * 1024 // 5)  # a 31 MB prompt: under the 32 MB body limit
    body = json.dumps({"model": "claude-opus-4-8", "messages": [{"role": "user", "content": text}]}).encode()
    assert 30 * 2**20 < len(body) < 32 * 2**20
    rss_before = status_kb(gw, "VmRSS")
    statuses: list[int] = []
    retry_after: set[str] = set()
    lock = threading.Lock()
    start = threading.Barrier(25)

    def count() -> None:
        with httpx.Client(timeout=120) as client:
            start.wait()
            headers = {"x-api-key": KEY, "content-type": "application/json"}
            r = client.post(gw.url + "/v1/messages/count_tokens", content=body, headers=headers)
        with lock:
            statuses.append(r.status_code)
            if r.status_code == 429:
                retry_after.add(r.headers.get("retry-after", ""))
                assert r.json()["error"]["type"] == "rate_limit_error"
            else:
                assert r.json()["input_tokens"] > 1_000_000, r.text

    threads = [threading.Thread(target=count) for _ in range(25)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    peak_mb = (status_kb(gw, "VmHWM") - rss_before) / 1024
    assert len(statuses) == 25 and set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 2 and statuses.count(429) >= 10, statuses  # served within the limit, 429 beyond
    assert retry_after == {"5"}
    # Two 31 MB bodies decoded at a time (~100 MB each at their peak), not 25 (860 MB before the limit).
    assert peak_mb < 350, f"gateway RSS rose by {peak_mb:.0f} MB for 25 concurrent 31 MB count_tokens bodies"
    # count_tokens slots are a pool of their own: generation is not refused for them.
    r = httpx.post(
        gw.url + "/v1/messages",
        json={"model": "claude-opus-4-8", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-api-key": KEY},
        timeout=10,
    )
    assert r.status_code == 200, r.text
