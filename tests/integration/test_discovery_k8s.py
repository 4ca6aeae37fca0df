"""Kubernetes discovery over real HTTP against a fake API server that checks the bearer token."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from proxy.config import DiscoveryConfig, NodeConfig
from proxy.discovery import DiscoveryError, DiscoveryRunner, KubernetesDiscovery
from tests.fake_http import JsonHandler, serving
from tests.integration.test_health import eventually, turn
from tests.procs import Proc, free_port, gateway, mlxmux

SLICES_PATH = "/apis/discovery.k8s.io/v1/namespaces/ml/endpointslices"


class FakeApiServer:
    """Serves the EndpointSlices of service `mlx` in namespace `ml` to whoever holds `token`."""

    def __init__(self) -> None:
        self.token = "token-1"
        self.port = 8080
        self.status = 200
        self.pods: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, dict[str, list[str]]]] = []
        api = self

        class Handler(JsonHandler):
            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                api.requests.append((parts.path, parse_qs(parts.query)))
                if self.headers.get("authorization") != f"Bearer {api.token}":
                    self.reply(401, {"kind": "Status", "reason": "Unauthorized", "code": 401})
                elif api.status != 200:
                    self.reply(api.status, {"kind": "Status", "reason": "InternalError", "code": api.status})
                elif parts.path != SLICES_PATH:
                    self.reply(404, {"kind": "Status", "reason": "NotFound", "code": 404})
                else:
                    self.reply(200, api.slices())

        self.handler = Handler
        self.url = ""

    def pod(self, name: str, ip: str, *, ready: bool = True, terminating: bool = False) -> None:
        self.pods[name] = {
            "addresses": [ip],
            "conditions": {"ready": ready, "serving": ready or terminating, "terminating": terminating},
            "targetRef": {"kind": "Pod", "namespace": "ml", "name": name},
        }

    def slices(self) -> dict[str, Any]:
        # Two slices, as the EndpointSlice controller splits large services.
        pods = sorted(self.pods)
        halves = [pods[: len(pods) // 2], pods[len(pods) // 2 :]]
        items = [
            {
                "metadata": {"name": f"mlx-{i}", "labels": {"kubernetes.io/service-name": "mlx"}},
                "addressType": "IPv4",
                "endpoints": [self.pods[p] for p in half] or None,
                "ports": [{"name": "http", "protocol": "TCP", "port": self.port}],
            }
            for i, half in enumerate(halves)
        ]
        return {"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1", "items": items}


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    with serving(server.handler) as server.url:
        yield server


def ids(nodes: list[NodeConfig]) -> list[str]:
    return [n.id for n in nodes]


def test_pods_come_and_go_tokens_rotate_and_failures_raise(api: FakeApiServer, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("token-1")
    (tmp_path / "namespace").write_text("ml")
    config = DiscoveryConfig(
        mode="kubernetes",
        service="mlx",
        port_name="http",
        api_server=api.url,
        token_file=str(token),
        pool="big",
    )
    source = KubernetesDiscovery(config)
    runner = DiscoveryRunner(source, [NodeConfig(id="mac1", url="http://10.1.0.5:8080")])
    api.pod("mlx-a", "10.1.0.5")  # the configured mac1's address: merged into it
    api.pod("mlx-b", "10.1.0.6")

    async def scenario() -> None:
        added, removed = await runner.refresh()
        assert (ids(added), removed) == (["mlx-b"], [])
        assert (added[0].url, added[0].pool) == ("http://10.1.0.6:8080", "big")
        assert api.requests[-1] == (SLICES_PATH, {"labelSelector": ["kubernetes.io/service-name=mlx"]})

        api.pod("mlx-c", "10.1.0.7")
        assert ids(await source.poll()) == ["mlx-a", "mlx-b", "mlx-c"]

        api.pod("mlx-b", "10.1.0.6", ready=False, terminating=True)
        del api.pods["mlx-a"]
        added, removed = await runner.refresh()
        assert (ids(added), ids(removed)) == (["mlx-c"], ["mlx-b"])
        assert ids(runner.nodes) == ["mac1", "mlx-c"]

        api.token = "token-2"  # rotated: the old token is refused, the kubelet writes the new one
        with pytest.raises(DiscoveryError, match=r"refused .* \(401\)"):
            await source.poll()
        assert await runner.refresh() == ([], [])
        assert ids(runner.nodes) == ["mac1", "mlx-c"]
        token.write_text("token-2\n")
        assert ids(await source.poll()) == ["mlx-c"]

        api.status = 500
        with pytest.raises(DiscoveryError, match="answered 500 listing endpointslices of service 'mlx'"):
            await source.poll()
        assert runner.events.discovered == 2 and runner.events.lost == 1

    asyncio.run(scenario())


def test_unreachable_api_server_is_a_discovery_error(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("t")
    config = DiscoveryConfig(
        mode="kubernetes",
        service="mlx",
        namespace="ml",
        api_server="http://127.0.0.1:9",
        token_file=str(tmp_path / "token"),
    )
    with pytest.raises(DiscoveryError, match=r"kubernetes API http://127\.0\.0\.1:9 unreachable"):
        asyncio.run(KubernetesDiscovery(config).poll())


def sim_at(ip: str, port: int, node_id: str) -> Proc:
    """A sim node on another loopback address (127.0.0.2, …), as a pod would have its own IP."""
    proc = mlxmux("sim-node", "--host", ip, "--port", str(port), "--id", node_id, port=port, name=node_id)
    for _ in range(150):
        try:
            if httpx.get(f"http://{ip}:{port}/health", timeout=0.5).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.stop()
    raise RuntimeError(f"sim {node_id} did not start on {ip}:{port}:\n{proc.output()}")


def test_gateway_follows_the_service_endpoints(api: FakeApiServer, tmp_path: Path) -> None:
    """A gateway process with kubernetes discovery: pods become nodes after a probe; a pod that goes
    away is removed and its sessions move."""
    port = free_port()
    api.port = port
    (tmp_path / "token").write_text("token-1")
    (tmp_path / "namespace").write_text("ml")
    config = tmp_path / "mlxmux.toml"
    config.write_text(
        f'[discovery]\nmode = "kubernetes"\nservice = "mlx"\napi_server = "{api.url}"\n'
        f'token_file = "{tmp_path / "token"}"\ninterval_s = 0.3\n'
    )
    pod_a, pod_b = sim_at("127.0.0.2", port, "pod-a"), sim_at("127.0.0.3", port, "pod-b")
    try:
        api.pod("pod-a", "127.0.0.2")
        env = {"MLXMUX_HEALTH_INTERVAL_S": "0.3"}
        with gateway(extra=["--config", str(config)], env=env) as g:

            def nodes() -> dict[str, str]:
                return {n["id"]: n["state"] for n in httpx.get(g.url + "/cluster", timeout=5).json()["nodes"]}

            eventually(lambda: nodes() == {"pod-a": "healthy"}, what="pod-a discovered and healthy")
            session = "k8s-0000-4000-8000-000000000000"
            turn(g, session)
            api.pod("pod-b", "127.0.0.3")
            eventually(lambda: nodes() == {"pod-a": "healthy", "pod-b": "healthy"}, what="pod-b discovered")
            del api.pods["pod-a"]
            eventually(lambda: nodes() == {"pod-b": "healthy"}, what="pod-a removed")
            turn(g, session, "next")  # the session's node left: it moves
            stats = httpx.get(f"http://127.0.0.3:{port}/_sim/stats", timeout=5).json()
            assert session in stats["per_conversation"]
    finally:
        pod_a.stop()
        pod_b.stop()
