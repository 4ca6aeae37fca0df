"""Node discovery: the set of inference nodes beyond the configured list (docs/discovery.md).

A `Discovery` source answers one question, `poll()`: which nodes exist right now. `DnsDiscovery`
resolves a name to every A/AAAA record (a scaled compose service, a headless Kubernetes Service);
`KubernetesDiscovery` reads a Service's EndpointSlices from the API server. `static` mode has no
source: the configured nodes are the whole set. A source that fails raises `DiscoveryError`, and
the caller keeps the last good set: a DNS or API server hiccup never empties the cluster.

`DiscoveryRunner` turns successive polls into changes. Intended wiring, in the cluster's owner::

    source = make_discovery(settings)
    if source is not None:
        runner = DiscoveryRunner(source, settings.nodes, validate=probe_models)
        async def apply(added, removed):
            for node in removed:            # removed first: a node whose URL changed is in both
                await cluster.remove(node.id)
                ...drop the node's bindings and prefix entries in the store
            for node in added:
                cluster.add(node)           # then health probes take it from INITIALIZING
        task = asyncio.create_task(runner.run(apply, settings.discovery.interval_s))

`validate` (`GET /v1/models` through `proxy.upstream.NodeClient`, returning None or why not) keeps
a node out until it answers; a node refused now is offered again on the next refresh. This module
never talks to nodes itself: `proxy.upstream` is their only HTTP client.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import httpx
import msgspec

from proxy.config import DiscoveryConfig, NodeConfig, Settings

log = logging.getLogger("mlxmux.discovery")

POLL_TIMEOUT_S = 10.0
"""Bound on one DNS resolution or API server request."""


class DiscoveryError(Exception):
    """A discovery source could not say which nodes exist; the message is one line for the log."""


class Discovery(Protocol):
    async def poll(self) -> list[NodeConfig]:
        """Every node the source knows of now, with stable ids, deduplicated and sorted.

        Raises DiscoveryError when the source fails; an empty list means the source answered "none".
        """
        ...


def make_discovery(settings: Settings) -> Discovery | None:
    """The source `settings.discovery.mode` asks for; None in static mode (the configured nodes are the set)."""
    config = settings.discovery
    if config.mode == "dns":
        return DnsDiscovery(config)
    if config.mode == "kubernetes":
        return KubernetesDiscovery(config)
    return None


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def discovered_node(config: DiscoveryConfig, host: str, port: int, node_id: str = "") -> NodeConfig:
    """A NodeConfig for an address found by discovery, with the template fields of `config`."""
    address = _host_port(host, port)
    return NodeConfig(
        url=f"{config.scheme}://{address}",
        id=node_id or address,
        model=config.model,
        pool=config.pool,
        protocol=config.protocol,
        max_concurrency=config.max_concurrency,
        cache_slots=config.cache_slots,
        images=config.images,
        late_system=config.late_system,
        api_key=config.api_key,
        context_window=config.context_window,
    )


# --- merging -------------------------------------------------------------------------------------


def merge(nodes: Iterable[NodeConfig]) -> list[NodeConfig]:
    """Drop every node whose id or URL an earlier node already has (first wins).

    Pass static nodes first: a discovered node at a configured node's URL is that node, and the
    configured entry (its id, model, pool) wins.
    """
    ids: set[str] = set()
    urls: set[str] = set()
    kept: list[NodeConfig] = []
    for node in nodes:
        if node.id in ids or node.url in urls:
            continue
        ids.add(node.id)
        urls.add(node.url)
        kept.append(node)
    return kept


def diff(old: list[NodeConfig], new: list[NodeConfig]) -> tuple[list[NodeConfig], list[NodeConfig]]:
    """(added, removed) going from `old` to `new`, both merged first.

    A node is matched by id; one whose settings changed (a StatefulSet pod back at a new IP) is in
    both lists, and the caller applies `removed` before `added`.
    """
    before = {n.id: n for n in merge(old)}
    after = {n.id: n for n in merge(new)}
    added = [n for nid, n in after.items() if before.get(nid) != n]
    removed = [n for nid, n in before.items() if after.get(nid) != n]
    return added, removed


class DiscoveryEvents(msgspec.Struct, kw_only=True):
    """Lifecycle counters since start, for /cluster and metrics."""

    discovered: int = 0
    lost: int = 0
    errors: int = 0
    """Failed polls plus nodes found but refused by validation."""


Validator = Callable[[NodeConfig], Awaitable[str | None]]
"""Checks a node before use (`GET /v1/models`): None if it may join, else why not."""


class DiscoveryRunner:
    """Turns polls of a source into (added, removed) changes, keeping the last good set on errors."""

    def __init__(self, source: Discovery, static: list[NodeConfig], validate: Validator | None = None) -> None:
        self.source = source
        self.static = list(static)
        self.validate = validate
        self.nodes: list[NodeConfig] = merge(self.static)
        """The current set: static nodes, then discovered ones that were accepted."""
        self.events = DiscoveryEvents()
        self.last_error: str | None = None

    async def refresh(self) -> tuple[list[NodeConfig], list[NodeConfig]]:
        """Poll once; (added, removed) relative to the previous refresh. Both empty when the poll failed."""
        try:
            found = await self.source.poll()
        except DiscoveryError as exc:
            self.events.errors += 1
            self.last_error = str(exc)
            log.warning("discovery error: %s (keeping %d nodes)", exc, len(self.nodes))
            return [], []
        self.last_error = None
        added, removed = diff(self.nodes, [*self.static, *found])
        if self.validate is not None:
            added = await self._validated(added, self.validate)
        removed_ids = {n.id for n in removed}
        self.nodes = [n for n in self.nodes if n.id not in removed_ids] + added
        for node in removed:
            self.events.lost += 1
            log.info("node %s at %s lost", node.id, node.url)
        for node in added:
            self.events.discovered += 1
            log.info("node %s at %s discovered", node.id, node.url)
        return added, removed

    async def _validated(self, nodes: list[NodeConfig], validate: Validator) -> list[NodeConfig]:
        reasons = await asyncio.gather(*(validate(n) for n in nodes))
        accepted = []
        for node, reason in zip(nodes, reasons, strict=True):
            if reason is None:
                accepted.append(node)
            else:
                self.events.errors += 1
                log.warning("node %s at %s found but not added: %s", node.id, node.url, reason)
        return accepted

    async def run(
        self, apply: Callable[[list[NodeConfig], list[NodeConfig]], Awaitable[None]], interval_s: float
    ) -> None:
        """Refresh every `interval_s` and hand non-empty changes to `apply(added, removed)`, forever."""
        while True:
            try:
                added, removed = await self.refresh()
                if added or removed:
                    await apply(added, removed)
            except Exception:  # a bug in one round must not end discovery for the life of the process
                log.exception("discovery round failed")
            await asyncio.sleep(interval_s)


# --- dns -----------------------------------------------------------------------------------------

AddrInfo = tuple[int, int, int, str, tuple[Any, ...]]
Resolver = Callable[[str, int], Awaitable[Sequence[AddrInfo]]]
"""getaddrinfo's shape: (family, type, proto, canonname, sockaddr) per record."""


async def _getaddrinfo(host: str, port: int) -> Sequence[AddrInfo]:
    return await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)


def _address_order(host: str) -> tuple[int, int]:
    ip = ipaddress.ip_address(host)
    return ip.version, int(ip)


class DnsDiscovery:
    """Every A and AAAA record of `config.dns_name`, each a node at `config.port`.

    A name that does not resolve (NXDOMAIN, no answer, resolver down) is an error, not "no nodes":
    getaddrinfo cannot tell a service scaled to zero from a resolver failure, and emptying the
    cluster on a resolver failure would be worse than routing to nodes health probes mark down.
    """

    def __init__(self, config: DiscoveryConfig, resolver: Resolver | None = None) -> None:
        self.config = config
        self._resolve = resolver or _getaddrinfo

    async def poll(self) -> list[NodeConfig]:
        name, port = self.config.dns_name, self.config.port
        try:
            async with asyncio.timeout(POLL_TIMEOUT_S):
                records = await self._resolve(name, port)
        except TimeoutError:
            raise DiscoveryError(f"dns name {name!r} did not resolve within {POLL_TIMEOUT_S:g}s") from None
        except OSError as exc:  # socket.gaierror included
            raise DiscoveryError(f"dns name {name!r} did not resolve: {exc.strerror or exc}") from None
        hosts = {
            str(sockaddr[0]).partition("%")[0]
            for family, _, _, _, sockaddr in records
            if family in (socket.AF_INET, socket.AF_INET6)
        }
        return [discovered_node(self.config, h, port) for h in sorted(hosts, key=_address_order)]


# --- kubernetes ----------------------------------------------------------------------------------
# The EndpointSliceList shape (discovery.k8s.io/v1), only the fields used. Kubernetes sends JSON
# `null` for empty lists and for unset pointers, hence the `| None` throughout.


class EndpointConditions(msgspec.Struct):
    ready: bool | None = None
    """None means unknown, which Kubernetes says to read as ready."""
    serving: bool | None = None
    terminating: bool | None = None


class ObjectReference(msgspec.Struct):
    kind: str = ""
    name: str = ""


class Endpoint(msgspec.Struct, rename="camel"):
    addresses: list[str] | None = None
    conditions: EndpointConditions | None = None
    target_ref: ObjectReference | None = None


class EndpointPort(msgspec.Struct):
    name: str | None = None
    port: int | None = None
    protocol: str | None = None


class ObjectMeta(msgspec.Struct):
    name: str = ""


class EndpointSlice(msgspec.Struct, rename="camel"):
    address_type: str = "IPv4"
    metadata: ObjectMeta | None = None
    endpoints: list[Endpoint] | None = None
    ports: list[EndpointPort] | None = None


class EndpointSliceList(msgspec.Struct):
    items: list[EndpointSlice] | None = None


_slice_list = msgspec.json.Decoder(EndpointSliceList)
_ADDRESS_TYPES = {"IPv4": 0, "IPv6": 1, "FQDN": 2}  # dual-stack pods: the IPv4 slice comes first and wins


def _slice_port(item: EndpointSlice, port_name: str, default: int) -> int | None:
    ports = item.ports or []
    if port_name:
        return next((p.port or default for p in ports if p.name == port_name), None)
    return (ports[0].port or default) if ports else default


def _usable(endpoint: Endpoint) -> bool:
    conditions = endpoint.conditions or EndpointConditions()
    return conditions.ready is not False and not conditions.terminating


def nodes_from_slices(slices: EndpointSliceList, config: DiscoveryConfig) -> list[NodeConfig]:
    """Ready, non-terminating endpoints of every slice as nodes, merged by id and URL, sorted by id.

    Raises DiscoveryError when slices have endpoints but none has the port named `config.port_name`.
    """
    items = sorted(
        slices.items or [], key=lambda s: (_ADDRESS_TYPES.get(s.address_type, 3), s.metadata.name if s.metadata else "")
    )
    found: list[NodeConfig] = []
    port_found = port_missing = False
    for item in items:
        port = _slice_port(item, config.port_name, config.port)
        if port is None:
            # An empty service's placeholder slice has no ports: only a slice with endpoints counts.
            port_missing = port_missing or bool(item.endpoints)
            continue
        port_found = True
        for endpoint in item.endpoints or []:
            if not _usable(endpoint) or not endpoint.addresses:
                continue
            # Every address of an endpoint is the same pod; the first is enough.
            name = endpoint.target_ref.name if endpoint.target_ref else ""
            found.append(discovered_node(config, endpoint.addresses[0], port, name))
    if port_missing and not port_found:
        raise DiscoveryError(f"no EndpointSlice of service {config.service!r} has a port named {config.port_name!r}")
    return sorted(merge(found), key=lambda n: n.id)


class KubernetesDiscovery:
    """The ready endpoints of a Service, from its EndpointSlices on the API server.

    Reads the service-account token on every poll (the kubelet rotates it) and verifies the API
    server against `config.ca_file` when https. A new HTTP client per poll keeps nothing stale
    (token, CA bundle) for a request made once every `interval_s`.
    """

    def __init__(self, config: DiscoveryConfig, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self._transport = transport

    def _api_server(self) -> str:
        if self.config.api_server:
            return self.config.api_server.rstrip("/")
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host or not port.isdigit():
            raise DiscoveryError("KUBERNETES_SERVICE_HOST/PORT are not set (not in a pod?): set discovery.api_server")
        return f"https://{_host_port(host, int(port))}"

    def _namespace(self) -> str:
        if self.config.namespace:
            return self.config.namespace
        path = Path(self.config.token_file).with_name("namespace")
        return _read_secret(path, "namespace")

    def _verify(self, api: str) -> ssl.SSLContext | bool:
        if not api.startswith("https://"):
            return False
        try:
            return ssl.create_default_context(cafile=self.config.ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise DiscoveryError(f"cannot load CA file {self.config.ca_file!r}: {exc}") from None

    async def poll(self) -> list[NodeConfig]:
        api, namespace = self._api_server(), self._namespace()
        token = _read_secret(Path(self.config.token_file), "service-account token")
        url = f"{api}/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"
        params = {"labelSelector": f"kubernetes.io/service-name={self.config.service}"}
        headers = {"authorization": f"Bearer {token}", "accept": "application/json"}
        verify = self._verify(api) if self._transport is None else True
        try:
            async with httpx.AsyncClient(transport=self._transport, verify=verify, timeout=POLL_TIMEOUT_S) as client:
                response = await client.get(url, params=params, headers=headers)
        except httpx.HTTPError as exc:
            raise DiscoveryError(f"kubernetes API {api} unreachable: {type(exc).__name__}: {exc}") from None
        where = f"endpointslices of service {self.config.service!r} in namespace {namespace!r}"
        if response.status_code in (401, 403):
            raise DiscoveryError(
                f"kubernetes API refused to list {where} ({response.status_code}): "
                "the service account needs get/list on endpointslices (docs/discovery.md)"
            )
        if response.status_code != 200:
            raise DiscoveryError(f"kubernetes API answered {response.status_code} listing {where}")
        try:
            slices = _slice_list.decode(response.content)
        except msgspec.DecodeError as exc:  # ValidationError included
            raise DiscoveryError(f"kubernetes API sent {where} that do not decode: {exc}") from None
        return nodes_from_slices(slices, self.config)


def _read_secret(path: Path, what: str) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise DiscoveryError(f"cannot read the {what} at {str(path)!r}: {exc.strerror or exc}") from None
