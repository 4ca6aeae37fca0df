"""HealthMonitor.probe against canned node answers (httpx.MockTransport): what makes a node fail its probe."""

from __future__ import annotations

import httpx
import pytest

from proxy.cluster import Cluster
from proxy.config import HealthConfig, NodeConfig, TimeoutConfig
from proxy.health import HealthMonitor, _models_listed
from state.memory import MemoryStore

pytestmark = pytest.mark.anyio

MODEL = "mlx-community/Qwen3-Coder-30B-A3B-Instruct-4bit"
LISTED = b'{"object":"list","data":[{"id":"%s","object":"model"}]}' % MODEL.encode()


def monitor(answers: dict[str, tuple[int, bytes]], model: str | None = MODEL) -> HealthMonitor:
    def handler(request: httpx.Request) -> httpx.Response:
        status, body = answers.get(request.url.path, (404, b"Not Found"))
        return httpx.Response(status, content=body)

    node = NodeConfig(id="mac1", url="http://mac1:8080", model=model)
    cluster = Cluster([node], TimeoutConfig(), httpx.MockTransport(handler))
    store = MemoryStore()
    return HealthMonitor(cluster, store, store, HealthConfig(timeout_s=1.0), "r1")


@pytest.mark.parametrize(
    "body",
    [
        b"",  # mlx_lm.server 0.32.2 without ~/.cache/huggingface/hub: 200 headers, no body
        b'{"object":"li',  # cut
        b"<html>oops</html>",  # not JSON
        b'{"models": []}',  # another shape
        b"[1, 2]",
    ],
)
async def test_an_empty_or_unreadable_model_list_cannot_fail_the_probe(body: bytes) -> None:
    assert _models_listed(body) is None
    gw = monitor({"/health": (200, b'{"status":"ok"}'), "/v1/models": (200, body)})
    assert await gw.probe("mac1") is None


async def test_without_health_an_empty_model_list_still_passes() -> None:
    gw = monitor({"/health": (404, b"Not Found"), "/v1/models": (200, b"")})
    assert await gw.probe("mac1") is None


async def test_a_list_that_lacks_the_model_is_a_mismatch() -> None:
    other = b'{"object":"list","data":[{"id":"some/other-model","object":"model"}]}'
    gw = monitor({"/health": (200, b'{"status":"ok"}'), "/v1/models": (200, other)})
    assert await gw.probe("mac1") == f"model {MODEL!r} is not served"
    empty_list = monitor({"/health": (200, b"{}"), "/v1/models": (200, b'{"object":"list","data":[]}')})
    assert await empty_list.probe("mac1") == f"model {MODEL!r} is not served"


async def test_a_list_with_the_model_passes() -> None:
    assert _models_listed(LISTED) == {MODEL}
    gw = monitor({"/health": (200, b'{"status":"ok"}'), "/v1/models": (200, LISTED)})
    assert await gw.probe("mac1") is None


async def test_no_configured_model_takes_any_200() -> None:
    gw = monitor({"/health": (200, b"{}"), "/v1/models": (200, b'{"data":[]}')}, model=None)
    assert await gw.probe("mac1") is None


@pytest.mark.parametrize(
    ("answers", "error"),
    [
        ({"/health": (503, b"loading"), "/v1/models": (200, LISTED)}, "/health answered 503"),
        ({"/health": (200, b"{}"), "/v1/models": (500, b"")}, "/v1/models answered 500"),
        ({"/health": (200, b"{}")}, "/v1/models answered 404"),
    ],
)
async def test_error_statuses_still_fail(answers: dict[str, tuple[int, bytes]], error: str) -> None:
    assert await monitor(answers).probe("mac1") == error
