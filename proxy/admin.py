"""Admin API: change the node set and drain nodes at run time, on every replica (`mlxmux nodes …`).

    GET    /admin/nodes                 the nodes, as in GET /cluster
    GET    /admin/sessions              live session bindings: session → node (?limit=N, default 1000)
    POST   /admin/nodes                 add or replace a node: a [[nodes]] entry as JSON ({"url": …, "id": …})
    DELETE /admin/nodes/{id}            remove a node, its bindings and prefix entries
    POST   /admin/nodes/{id}/drain      no new requests (its sessions move at their next turn)
    POST   /admin/nodes/{id}/undrain

With `server.admin_token` (MLXMUX_ADMIN_TOKEN) set, every call needs `Authorization: Bearer <token>`;
without it, only clients on the gateway's own machine (loopback) may call.

Changes go to the shared store (registry, health records), from which every replica takes them within
a health interval. While the store is unreachable a change is still accepted: it applies on this
replica at once and is written to the store when it is back; the answer then says `"shared": false`.
Each replica remembers what it last saw and writes it back if the store loses its data.
"""

from __future__ import annotations

import hmac
from urllib.parse import urlsplit

import msgspec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from proxy.config import ConfigError, NodeConfig, normalize_node, redact_url
from proxy.errors import AuthenticationFailed, InvalidRequest, NotFound, PermissionDenied
from proxy.gateway import Gateway
from state.errors import StateUnavailable

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def _authorize(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    token = gw.settings.server.admin_token
    if token:
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
            raise AuthenticationFailed("the admin API needs Authorization: Bearer <admin token>")
        return gw
    client = request.client.host if request.client else ""
    if client not in LOOPBACK:
        raise PermissionDenied("the admin API is open to loopback clients only until server.admin_token is set")
    return gw


def _known(gw: Gateway, node_id: str) -> None:
    if node_id not in gw.cluster.nodes:
        raise NotFound(f"no node {node_id!r} (see GET /admin/nodes)")


async def list_nodes(request: Request) -> Response:
    from proxy.app import cluster_view

    gw = _authorize(request)
    return JSONResponse((await cluster_view(gw))["nodes"])


async def add_node(request: Request) -> Response:
    gw = _authorize(request)
    try:
        node = msgspec.json.decode(await request.body(), type=NodeConfig)
        node = normalize_node(node)
    except (msgspec.DecodeError, msgspec.ValidationError, ConfigError, RecursionError) as exc:
        raise InvalidRequest(f"not a node: {exc}") from None
    if urlsplit(node.url).scheme not in ("http", "https"):
        raise InvalidRequest(f"node url must be http(s)://host:port, not {node.url!r}")
    shared = await gw.membership.add(node)
    state = str(gw.cluster.states.get(node.id, ""))
    return JSONResponse({"added": node.id, "url": redact_url(node.url), "state": state, "shared": shared})


async def remove_node(request: Request) -> Response:
    gw = _authorize(request)
    node_id = request.path_params["node_id"]
    _known(gw, node_id)
    shared = await gw.membership.remove(node_id)
    return JSONResponse({"removed": node_id, "shared": shared})


async def drain(request: Request) -> Response:
    return await _drain(request, True)


async def undrain(request: Request) -> Response:
    return await _drain(request, False)


async def _drain(request: Request, draining: bool) -> Response:
    gw = _authorize(request)
    node_id = request.path_params["node_id"]
    _known(gw, node_id)
    record = await gw.health.set_draining(node_id, draining)
    body = {"node": node_id, "draining": record.draining, "state": str(record.state), "shared": gw.health.shared}
    return JSONResponse(body)


async def sessions(request: Request) -> Response:
    gw = _authorize(request)
    try:
        limit = max(1, min(100_000, int(request.query_params.get("limit", "1000"))))
    except ValueError:
        raise InvalidRequest("limit must be an integer") from None
    try:
        bindings = await gw.store.sessions(limit)
    except StateUnavailable:
        bindings = await gw.local_store.sessions(limit)
    return JSONResponse([msgspec.to_builtins(b) for b in bindings])
