"""A node URL's credentials (`http://user:password@mac1:8080`) are used and shown nowhere (issue 11):
not on /cluster, /ready or `mlxmux status`, not in the node's health record or a client's error
message, not in any log line (at debug level, text or JSON), even when the node itself echoes its URL
in an error page and when a node is added at run time."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import httpx
import pytest

from tests.fake_http import ChatNodeHandler, serving
from tests.procs import ROOT, gateway

pytestmark = pytest.mark.slow

PASSWORD = "s3cret-pw-4f9e"
BODY = {"model": "claude-opus-4-8", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
ANSWER = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "fine"}, "finish_reason": "stop"}]}


class KeyedNode(ChatNodeHandler):
    """A chat node behind basic auth. mode "echo": it fails with a proxy's error page naming its URL."""

    mode: ClassVar[str] = "ok"
    url: ClassVar[str] = ""
    authorizations: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        type(self).authorizations.append(self.headers.get("authorization", ""))
        if type(self).mode == "echo":
            self.reply(502, {"error": f"upstream {type(self).url}/v1/chat/completions refused the connection"})
        else:
            self.reply(200, ANSWER)


def with_credentials(url: str) -> str:
    return url.replace("http://", f"http://alice:{PASSWORD}@")


@pytest.fixture
def node() -> Iterator[str]:
    KeyedNode.mode, KeyedNode.authorizations = "ok", []
    with serving(KeyedNode) as url:
        KeyedNode.url = with_credentials(url)
        yield KeyedNode.url


def get(url: str) -> Any:
    return httpx.get(url, timeout=5)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_node_credentials_are_used_and_shown_nowhere(node: str, log_format: str) -> None:
    env = {"MLXMUX_LOG_LEVEL": "debug", "MLXMUX_LOG_FORMAT": log_format, "MLXMUX_REQUEST_FAIL_THRESHOLD": "1"}
    env["MLXMUX_MAX_ATTEMPTS"] = "1"
    with gateway(f"sec={node}", env=env) as gw:
        r = httpx.post(gw.url + "/v1/messages", json=BODY, timeout=10)
        assert r.status_code == 200, r.text
        basic = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
        assert KeyedNode.authorizations == [basic]  # the credentials are used
        seen: list[str] = []
        cluster = get(gw.url + "/cluster")
        seen.append(cluster.text)
        assert cluster.json()["nodes"][0]["url"].startswith("http://***@127.0.0.1:")

        KeyedNode.mode = "echo"  # the node's own error names its URL with the password
        r = httpx.post(gw.url + "/v1/messages", json=BODY, timeout=10)
        assert r.status_code == 529 and "refused the connection" in r.text, r.text
        assert "http://***@127.0.0.1:" in r.json()["error"]["message"]
        seen.append(r.text)
        cluster = get(gw.url + "/cluster")  # one failure takes the node out (request_fail_threshold 1)
        entry = cluster.json()["nodes"][0]
        assert entry["state"] == "unhealthy" and "refused the connection" in entry["last_error"], entry
        seen += [cluster.text, get(gw.url + "/ready").text, get(gw.url + "/admin/nodes").text]

        # A node added at run time, with credentials of its own (logged by membership as it is added).
        added = httpx.post(
            gw.url + "/admin/nodes", json={"id": "late", "url": f"http://bob:{PASSWORD}@127.0.0.1:9"}, timeout=10
        )
        assert added.status_code == 200, added.text
        time.sleep(0.5)
        seen += [get(gw.url + "/cluster").text, get(gw.url + "/ready").text]

        status = subprocess.run(
            [sys.executable, "-m", "proxy.cli", "status", "--url", gw.url],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "sec" in status.stdout and "late" in status.stdout and "***@" in status.stdout, status
        seen += [status.stdout, status.stderr]
        logs = gw.output()
        seen.append(logs)
        assert "node sec: healthy -> unhealthy: " in logs, logs[-3000:]  # with the node's (redacted) words
        assert "node late added (http://***@127.0.0.1:9)" in logs, logs[-3000:]
        if log_format == "json":
            assert all(json.loads(line) for line in logs.splitlines() if line.startswith("{"))
        for text in seen:
            assert PASSWORD not in text, text[-3000:]
