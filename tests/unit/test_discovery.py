"""Discovery without a network: DNS through an injected resolver, merge rules, EndpointSlice decoding, config."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from proxy.config import ConfigError, DiscoveryConfig, NodeConfig, load_settings
from proxy.discovery import (
    DiscoveryError,
    DiscoveryRunner,
    DnsDiscovery,
    EndpointSliceList,
    KubernetesDiscovery,
    diff,
    make_discovery,
    merge,
    nodes_from_slices,
)

pytestmark = pytest.mark.anyio

V4, V6, TCP = socket.AF_INET, socket.AF_INET6, socket.SOCK_STREAM


def records(*hosts: str, port: int = 8080) -> list[Any]:
    return [(V6, TCP, 6, "", (h, port, 0, 0)) if ":" in h else (V4, TCP, 6, "", (h, port)) for h in hosts]


def resolver_of(result: list[Any] | Exception):
    async def resolve(host: str, port: int) -> list[Any]:
        assert (host, port) == ("mlx-nodes", 8080)
        if isinstance(result, Exception):
            raise result
        return result

    return resolve


DNS = DiscoveryConfig(mode="dns", dns_name="mlx-nodes", pool="big", model="qwen", cache_slots=3)


async def test_dns_every_a_and_aaaa_record_once_in_address_order() -> None:
    found = records("10.0.0.12", "fd00::2", "10.0.0.5", "10.0.0.12", "fe80::1%eth0")
    nodes = await DnsDiscovery(DNS, resolver_of(found)).poll()
    assert [(n.id, n.url) for n in nodes] == [
        ("10.0.0.5:8080", "http://10.0.0.5:8080"),
        ("10.0.0.12:8080", "http://10.0.0.12:8080"),
        ("[fd00::2]:8080", "http://[fd00::2]:8080"),
        ("[fe80::1]:8080", "http://[fe80::1]:8080"),
    ]
    assert {(n.pool, n.model, n.cache_slots, n.max_concurrency) for n in nodes} == {("big", "qwen", 3, 4)}


@pytest.mark.parametrize(
    ("error", "needle"),
    [
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "Name or service not known"),
        (socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"), "Temporary failure"),
    ],
)
async def test_dns_failure_is_an_error_not_an_empty_cluster(error: Exception, needle: str) -> None:
    with pytest.raises(DiscoveryError, match=needle) as info:
        await DnsDiscovery(DNS, resolver_of(error)).poll()
    assert "'mlx-nodes'" in str(info.value)


def node(node_id: str, url: str, **kw: Any) -> NodeConfig:
    return NodeConfig(id=node_id, url=url, **kw)


STATIC = [node("mac1", "http://10.0.0.5:8080", model="static-model")]


def test_merge_first_wins_by_id_or_url_static_first() -> None:
    found = [
        node("10.0.0.5:8080", "http://10.0.0.5:8080"),  # the static mac1 by URL
        node("pod-a", "http://10.0.0.6:8080"),
        node("pod-a", "http://10.0.0.7:8080"),  # same id, other URL
        node("10.0.0.6:8080", "http://10.0.0.6:8080"),  # same URL, other id
    ]
    merged = merge([*STATIC, *found])
    assert [(n.id, n.url, n.model) for n in merged] == [
        ("mac1", "http://10.0.0.5:8080", "static-model"),
        ("pod-a", "http://10.0.0.6:8080", None),
    ]


def test_diff_added_removed_and_moved() -> None:
    old = [*STATIC, node("pod-a", "http://10.0.0.6:8080"), node("pod-b", "http://10.0.0.7:8080")]
    new = [*STATIC, node("pod-b", "http://10.0.0.9:8080"), node("pod-c", "http://10.0.0.8:8080")]
    added, removed = diff(old, new)
    assert [(n.id, n.url) for n in added] == [("pod-b", "http://10.0.0.9:8080"), ("pod-c", "http://10.0.0.8:8080")]
    assert [(n.id, n.url) for n in removed] == [("pod-a", "http://10.0.0.6:8080"), ("pod-b", "http://10.0.0.7:8080")]
    assert diff(new, [*new, node("dup", "http://10.0.0.8:8080")]) == ([], [])


class Source:
    def __init__(self) -> None:
        self.result: list[NodeConfig] | DiscoveryError = []

    async def poll(self) -> list[NodeConfig]:
        if isinstance(self.result, DiscoveryError):
            raise self.result
        return self.result


async def test_runner_tracks_changes_keeps_last_set_on_error_and_counts(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mlxmux.discovery")
    source = Source()
    runner = DiscoveryRunner(source, STATIC)
    a, b = node("pod-a", "http://10.0.0.6:8080"), node("pod-b", "http://10.0.0.7:8080")
    source.result = [a, b, node("dup", "http://10.0.0.5:8080")]
    assert await runner.refresh() == ([a, b], [])
    source.result = DiscoveryError("dns name 'x' did not resolve")
    assert await runner.refresh() == ([], [])
    assert [n.id for n in runner.nodes] == ["mac1", "pod-a", "pod-b"]
    assert runner.last_error == "dns name 'x' did not resolve"
    source.result = [b]
    assert await runner.refresh() == ([], [a])
    assert [n.id for n in runner.nodes] == ["mac1", "pod-b"]
    assert runner.last_error is None
    assert msgspec.to_builtins(runner.events) == {"discovered": 2, "lost": 1, "errors": 1}
    lines = [r.getMessage() for r in caplog.records if r.name == "mlxmux.discovery" and r.levelname != "DEBUG"]
    assert lines == [
        "node pod-a at http://10.0.0.6:8080 discovered",
        "node pod-b at http://10.0.0.7:8080 discovered",
        "discovery error: dns name 'x' did not resolve (keeping 3 nodes)",
        "node pod-a at http://10.0.0.6:8080 lost",
    ]


async def test_runner_adds_a_node_only_once_it_validates() -> None:
    source, sick = Source(), {"pod-b"}

    async def validate(n: NodeConfig) -> str | None:
        return "/v1/models answered 503" if n.id in sick else None

    runner = DiscoveryRunner(source, [], validate=validate)
    source.result = [node("pod-a", "http://10.0.0.6:8080"), node("pod-b", "http://10.0.0.7:8080")]
    added, _ = await runner.refresh()
    assert [n.id for n in added] == ["pod-a"]
    assert runner.events.errors == 1
    sick.clear()
    added, _ = await runner.refresh()
    assert [n.id for n in added] == ["pod-b"]


def slice_json(name: str, endpoints: list[dict[str, Any]], ports: Any, address_type: str = "IPv4") -> dict[str, Any]:
    return {
        "kind": "EndpointSlice",
        "apiVersion": "discovery.k8s.io/v1",
        "metadata": {"name": name, "namespace": "ml", "labels": {"kubernetes.io/service-name": "mlx"}},
        "addressType": address_type,
        "endpoints": endpoints,
        "ports": ports,
    }


def endpoint(ip: str, pod: str | None, **conditions: bool) -> dict[str, Any]:
    e: dict[str, Any] = {"addresses": [ip], "conditions": conditions, "nodeName": "k8s-worker-1", "zone": "a"}
    if pod is not None:
        e["targetRef"] = {"kind": "Pod", "namespace": "ml", "name": pod, "uid": "0b1c"}
    return e


PORTS = [{"name": "metrics", "protocol": "TCP", "port": 9090}, {"name": "http", "protocol": "TCP", "port": 8080}]
SLICES = {
    "kind": "EndpointSliceList",
    "apiVersion": "discovery.k8s.io/v1",
    "metadata": {"resourceVersion": "4242"},
    "items": [
        slice_json(
            "mlx-6v2qf",
            [
                endpoint("10.1.0.7", "mlx-1", ready=True, serving=True, terminating=False),
                endpoint("10.1.0.8", "mlx-2", ready=False, serving=True, terminating=True),  # draining
                endpoint("10.1.0.9", None),  # no conditions: ready
                endpoint("10.1.0.10", "mlx-4", ready=False, serving=False, terminating=False),  # not ready yet
            ],
            PORTS,
        ),
        slice_json("mlx-v6-x", [endpoint("fd00::7", "mlx-1", ready=True)], PORTS, "IPv6"),  # dual-stack mlx-1
        slice_json("mlx-empty", None, None),  # Kubernetes sends null for empty lists
    ],
}


@pytest.mark.parametrize(
    ("port_name", "expected"),
    [
        ("http", [("10.1.0.9:8080", "http://10.1.0.9:8080"), ("mlx-1", "http://10.1.0.7:8080")]),
        ("", [("10.1.0.9:9090", "http://10.1.0.9:9090"), ("mlx-1", "http://10.1.0.7:9090")]),
    ],
)
def test_endpoint_slices_ready_not_terminating_named_port(port_name: str, expected: list[tuple[str, str]]) -> None:
    config = DiscoveryConfig(mode="kubernetes", service="mlx", port_name=port_name)
    slices = msgspec.json.decode(json.dumps(SLICES), type=EndpointSliceList)
    assert [(n.id, n.url) for n in nodes_from_slices(slices, config)] == expected


def test_endpoint_slices_without_the_named_port_are_an_error() -> None:
    config = DiscoveryConfig(mode="kubernetes", service="mlx", port_name="grpc")
    with pytest.raises(DiscoveryError, match="no EndpointSlice of service 'mlx' has a port named 'grpc'"):
        nodes_from_slices(msgspec.json.decode(json.dumps(SLICES), type=EndpointSliceList), config)
    empty = {"items": [slice_json("mlx-empty", None, None)]}  # a service scaled to zero: no nodes, no error
    assert nodes_from_slices(msgspec.json.decode(json.dumps(empty), type=EndpointSliceList), config) == []


@pytest.mark.parametrize(
    ("status", "body", "needle"),
    [
        (403, b'{"kind":"Status","reason":"Forbidden"}', "refused to list .* \\(403\\).*get/list on endpointslices"),
        (200, b"<html>not json</html>", "do not decode"),
        (200, b'{"items": [{"endpoints": [{"addresses": "10.0.0.1"}]}]}', "do not decode"),
    ],
)
async def test_kubernetes_source_failures(tmp_path: Path, status: int, body: bytes, needle: str) -> None:
    (tmp_path / "token").write_text("t0k3n\n")
    config = DiscoveryConfig(
        mode="kubernetes", service="mlx", namespace="ml", api_server="https://k8s", token_file=str(tmp_path / "token")
    )

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer t0k3n"
        return httpx.Response(status, content=body)

    with pytest.raises(DiscoveryError, match=needle):
        await KubernetesDiscovery(config, httpx.MockTransport(handler)).poll()


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"MLXMUX_DISCOVERY": "dns"}, 'discovery mode "dns" needs dns_name (MLXMUX_DISCOVERY_DNS_NAME)'),
        ({"MLXMUX_DISCOVERY": "kubernetes"}, 'discovery mode "kubernetes" needs service (MLXMUX_DISCOVERY_SERVICE)'),
        ({"MLXMUX_DISCOVERY": "consul"}, "$.discovery.mode"),
        (
            {"MLXMUX_DISCOVERY": "dns", "MLXMUX_DISCOVERY_DNS_NAME": "sim", "MLXMUX_DISCOVERY_PORT": "0"},
            "discovery.port must be 1..65535, not 0",
        ),
        (
            {"MLXMUX_DISCOVERY": "dns", "MLXMUX_DISCOVERY_DNS_NAME": "sim", "MLXMUX_DISCOVERY_INTERVAL_S": "0"},
            "interval",
        ),
    ],
)
def test_discovery_config_errors(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env=env)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_discovery_config_from_env_picks_the_source() -> None:
    s = load_settings(
        env={
            "MLXMUX_DISCOVERY": "kubernetes",
            "MLXMUX_DISCOVERY_SERVICE": "mlx",
            "MLXMUX_DISCOVERY_NAMESPACE": "ml",
            "MLXMUX_DISCOVERY_INTERVAL_S": "2.5",
        }
    )
    assert (s.discovery.service, s.discovery.namespace, s.discovery.interval_s) == ("mlx", "ml", 2.5)
    assert isinstance(make_discovery(s), KubernetesDiscovery)
    dns = load_settings(
        env={"MLXMUX_DISCOVERY": "dns", "MLXMUX_DISCOVERY_DNS_NAME": "sim", "MLXMUX_DISCOVERY_PORT": "9"}
    )
    assert isinstance(make_discovery(dns), DnsDiscovery)
    assert dns.discovery.port == 9
    assert make_discovery(load_settings(env={})) is None


async def test_dns_with_the_system_resolver() -> None:
    nodes = await DnsDiscovery(DiscoveryConfig(mode="dns", dns_name="localhost", port=8080)).poll()
    assert "127.0.0.1:8080" in [n.id for n in nodes]


async def test_https_api_server_needs_a_readable_ca_file(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("t")
    config = DiscoveryConfig(
        mode="kubernetes",
        service="mlx",
        namespace="ml",
        api_server="https://127.0.0.1:9",
        token_file=str(tmp_path / "token"),
        ca_file=str(tmp_path / "missing.crt"),
    )
    with pytest.raises(DiscoveryError, match="cannot load CA file"):
        await KubernetesDiscovery(config).poll()
