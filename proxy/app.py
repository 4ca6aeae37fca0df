"""The ASGI application: routes, the request-id/error middleware and the lifespan.

`create_app()` reads the environment once (for `uvicorn --factory proxy.app:create_app`);
`build_app(settings, ...)` is what the CLI and the tests call.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator

import httpx
import msgspec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from proxy import admin
from proxy.auth import ApiKeyMiddleware
from proxy.cluster import Cluster
from proxy.config import Settings, load_settings, pool_windows, redact_url
from proxy.errors import GatewayError, HeadersTooLarge, NotFound, error_body, error_headers
from proxy.gateway import Gateway
from proxy.loop import LoopGuard
from proxy.messages import count_tokens, messages
from proxy.metrics import metrics_endpoint
from proxy.pools import looks, pool_counts, pool_problems
from state import open_store
from state.cache_model import belief_view
from state.errors import StateUnavailable
from state.store import Store

log = logging.getLogger("mlxmux")

# Claude model names offered by GET /v1/models; any other name is accepted too (see the model map).
CLAUDE_MODELS = (
    ("claude-opus-4-8", "Claude Opus 4.8"),
    ("claude-opus-4-5", "Claude Opus 4.5"),
    ("claude-sonnet-4-5", "Claude Sonnet 4.5"),
    ("claude-haiku-4-5", "Claude Haiku 4.5"),
)


class RequestIdMiddleware:
    """Gives every HTTP response a `request-id` header, turns escaped errors into Anthropic bodies and
    refuses (431) requests whose headers exceed `max_header_bytes`."""

    def __init__(self, app: ASGIApp, max_header_bytes: int = 64 * 1024) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = "req_" + secrets.token_hex(12)
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"request-id", request_id.encode())
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), header]
            await send(message)

        size = sum(len(name) + len(value) for name, value in scope["headers"])
        if size > self.max_header_bytes:
            message = f"request headers are {size} bytes; the limit is {self.max_header_bytes}"
            await _send_error(send_with_id, HeadersTooLarge(message), request_id)
            return
        try:
            await self.app(scope, receive, send_with_id)
        except GatewayError as exc:
            if started:
                raise
            await _send_error(send_with_id, exc, request_id)
        except Exception:
            log.exception("unhandled error in request %s", request_id)
            if started:
                raise
            await _send_error(send_with_id, GatewayError("internal error"), request_id)


async def _send_error(send: Send, exc: GatewayError, request_id: str) -> None:
    await send({"type": "http.response.start", "status": exc.status, "headers": error_headers(exc)})
    await send({"type": "http.response.body", "body": error_body(exc.type, exc.message, request_id)})


def _gateway(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


async def hello(request: Request) -> Response:
    return Response(b"mlxmux: an Anthropic Messages API gateway. POST /v1/messages\n", media_type="text/plain")


async def health(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def ready(request: Request) -> Response:
    """200 when at least one node is routable (what a load balancer checks). The body also says, per pool,
    how many nodes it has and how many are routable, and names pools requests are sent to that have no
    node: one empty pool must not take the replica out of its load balancer, but it must be visible."""
    gw = _gateway(request)
    routable = any(gw.cluster.candidates(pool) for pool in gw.cluster.pools())
    nodes = looks(gw.cluster, gw.health.records)
    if not gw.settings.redis_url:
        mode = "memory"
    else:
        try:
            await gw.store.ping()
            mode = "shared"
        except StateUnavailable:
            mode = "degraded"  # routing on local knowledge; sessions pinned by a hash all replicas share
    body: dict[str, object] = {"ready": routable, "cluster": gw.cluster.status(), "mode": mode}
    body["pools"] = pool_counts(nodes, gw.settings.models)
    body["problems"] = pool_problems(nodes, gw.settings.models)
    return JSONResponse(body, status_code=200 if routable else 503)


async def cluster(request: Request) -> Response:
    return JSONResponse(await cluster_view(_gateway(request)))


async def cluster_view(gw: Gateway) -> dict[str, object]:
    """The replica's view of the cluster (GET /cluster, `mlxmux status`)."""
    ids = list(gw.cluster.nodes)
    try:
        views = {v.node_id: v for v in await gw.store.node_views(ids)}
    except StateUnavailable:
        views = {v.node_id: v for v in await gw.local_store.node_views(ids)}
    nodes = []
    for node_id, node in gw.cluster.nodes.items():
        view = views.get(node_id)
        entry: dict[str, object] = {
            "id": node_id,
            "url": redact_url(node.url),
            "pool": node.pool,
            "model": node.model,
            "protocol": node.protocol,
            "state": gw.cluster.states.get(node_id, "initializing"),
            "draining": node_id in gw.cluster.draining,
            "max_concurrency": node.max_concurrency,
        }
        record = gw.health.records.get(node_id)
        if record is not None:
            entry["breaker"] = str(record.breaker)
            if record.last_error:
                entry["last_error"] = record.last_error
        if view is not None:
            entry["inflight"] = view.inflight
            entry["sessions"] = view.sessions
            entry["stats"] = msgspec.to_builtins(view.stats)
            entry["cache"] = belief_view(view.cache, node.cache_slots)
            entry["requests"] = [msgspec.to_builtins(r) for r in view.requests]
        window = gw.cluster.window(node)
        if window is not None:
            entry["context_window"] = window
        nodes.append(entry)
    looked = looks(gw.cluster, gw.health.records)
    return {
        "status": gw.cluster.status(),
        "pools": pool_counts(looked, gw.settings.models),
        "problems": pool_problems(looked, gw.settings.models),
        "strategy": str(gw.settings.routing.strategy),
        "store": "shared" if gw.settings.redis_url else "memory",
        "store_reachable": gw.store_ok and gw.health.shared,
        "replica": gw.replica_id,
        "nodes": nodes,
    }


async def models(request: Request) -> Response:
    gw = _gateway(request)
    created = "2025-01-01T00:00:00Z"
    data = [{"type": "model", "id": mid, "display_name": name, "created_at": created} for mid, name in CLAUDE_MODELS]
    data += [
        {"type": "model", "id": p, "display_name": f"mlxmux pool {p}", "created_at": created}
        for p in gw.cluster.pools()
    ]
    return JSONResponse({"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]})


async def not_found(request: Request) -> Response:
    raise NotFound(f"no route for {request.method} {request.url.path}")


def build_app(
    settings: Settings,
    *,
    store: Store | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Starlette:
    """The gateway app. `store` and `transport` are injection points for tests."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        shared = (
            store
            if store is not None
            else open_store(
                settings.redis_url or "memory://",
                prefix=settings.routing.key_prefix,
                **_store_limits(settings),
            )
        )
        gw = Gateway(settings, shared, Cluster(settings.nodes, settings.timeouts, transport, pool_windows(settings)))
        app.state.gateway = gw
        app.state.started = time.time()
        await gw.start()
        for problem in pool_problems(looks(gw.cluster, gw.health.records), settings.models):
            log.warning("%s", problem)
        try:
            yield
        finally:
            await gw.stop()

    routes = [
        Route("/", hello, methods=["GET", "HEAD"]),
        Route("/api/hello", hello, methods=["GET", "HEAD"]),
        Route("/health", health, methods=["GET", "HEAD"]),
        Route("/ready", ready, methods=["GET", "HEAD"]),
        Route("/cluster", cluster, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/messages", messages, methods=["POST"]),
        Route("/v1/messages/count_tokens", count_tokens, methods=["POST"]),
        Route("/admin/nodes", admin.list_nodes, methods=["GET"]),
        Route("/admin/nodes", admin.add_node, methods=["POST"]),
        Route("/admin/sessions", admin.sessions, methods=["GET"]),
        Route("/admin/nodes/{node_id:path}/drain", admin.drain, methods=["POST"]),
        Route("/admin/nodes/{node_id:path}/undrain", admin.undrain, methods=["POST"]),
        Route("/admin/nodes/{node_id:path}", admin.remove_node, methods=["DELETE"]),
        Route("/{path:path}", not_found, methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.add_middleware(ApiKeyMiddleware, auth=settings.auth)  # inside RequestIdMiddleware (added last = outermost)
    app.add_middleware(LoopGuard)  # before the key check: a looped request carries no team key
    app.add_middleware(RequestIdMiddleware, max_header_bytes=settings.server.max_header_bytes)
    return app


def _store_limits(settings: Settings) -> dict[str, int]:
    r = settings.routing
    return {
        "max_blocks_per_node": r.max_blocks_per_node,
        "max_request_blocks": r.max_request_blocks,
        "prefix_ttl_ms": int(r.prefix_ttl_s * 1000),
        "block_size": r.block_size,
        "session_ttl_ms": int(r.session_ttl_s * 1000),
        "session_active_ms": int(r.session_active_s * 1000),
    }


def create_app() -> Starlette:
    """App factory reading MLXMUX_* from the environment (uvicorn --factory proxy.app:create_app)."""
    return build_app(load_settings())
