"""Routing loops: a node URL that leads back to an mlxmux gateway (this one, or a replica behind the same
load balancer) instead of an inference node.

Without a guard such a node looks perfect: the gateway's own `/health` and `/v1/models` answer 200, so it is
marked healthy, and real requests then go round in circles. So every request the gateway sends to a node
(probes included) carries `x-mlxmux-hop` with this process's id, and a gateway refuses any request that
carries one with 508 Loop Detected, saying which gateway sent it. A probe that meets that answer fails with
words the operator can act on (`proxy.health`), so the node never becomes routable and `mlxmux status`
says why. Gateways in a chain (a gateway as another gateway's node) are refused the same way: mlxmux
routes to inference nodes only.
"""

from __future__ import annotations

import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

from proxy.errors import LoopDetected

HOP_HEADER = "x-mlxmux-hop"
GATEWAY_ID = secrets.token_hex(6)
"""This process's id in the hop header: tells a gateway that reaches itself from one reaching another."""

_HOP = HOP_HEADER.encode()


def loop_message(sender: str) -> str:
    """What a gateway answers to a request another (or the same) mlxmux gateway sent it as to a node."""
    if sender == GATEWAY_ID:
        return "routing loop: this node URL points back at this mlxmux gateway; give the Mac's own URL instead"
    return (
        f"routing loop: this is an mlxmux gateway, not an inference node, and another one (process {sender}) "
        "sent it a request as to a node; give that gateway the node's own URL"
    )


class LoopGuard:
    """Refuses (508) every request that an mlxmux gateway sent, as to a node. Must sit inside
    `RequestIdMiddleware`, which turns the error into an Anthropic error body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == _HOP:
                    raise LoopDetected(loop_message(value.decode("latin-1").strip()))
        await self.app(scope, receive, send)
