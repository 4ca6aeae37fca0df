"""`mlxmux demo`: simulated mlx_lm.server nodes and a gateway in one process, to try with Claude Code.

The sim nodes behave like Macs with a prompt cache: the first turn of a conversation pays a
visible prefill, later turns on the same node start almost at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Sequence

import uvicorn

from proxy.app import build_app
from proxy.config import ConfigError, load_settings
from proxy.listen import CannotListen, check_can_listen
from proxy.sim.cli import make_server
from proxy.sim.config import SimConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlxmux demo", description="Start sim nodes and a gateway to try mlxmux.")
    p.add_argument("--port", type=int, default=8420, help="gateway port (default 8420)")
    p.add_argument("--nodes", type=int, default=3, help="how many sim nodes (default 3)")
    p.add_argument("--node-port", type=int, default=8431, help="port of the first sim node (default 8431)")
    p.add_argument(
        "--prefill-tps", type=float, default=8000.0, help="sim prefill speed in tokens/s, 0 = instant (default 8000)"
    )
    p.add_argument("--redis", metavar="URL", help="share routing state through this Redis")
    return p


async def _run(args: argparse.Namespace) -> None:
    sims = [
        SimConfig(
            port=args.node_port + i,
            node_id=f"sim-mac{i + 1}",
            prefill_tps=args.prefill_tps,
            token_delay_ms=15.0,
        )
        for i in range(args.nodes)
    ]
    settings = load_settings(
        env={},
        overrides={("server", "port"): args.port, (None, "redis_url"): args.redis},
        nodes=[f"{s.node_id}=http://127.0.0.1:{s.port}" for s in sims],
    )
    gateway = uvicorn.Server(
        uvicorn.Config(build_app(settings), host="127.0.0.1", port=args.port, access_log=False, log_level="warning")
    )
    servers = [make_server(s, capture_signals=False) for s in sims]
    url = f"http://127.0.0.1:{args.port}"

    async def announce() -> None:
        while not (gateway.started and all(s.started for s in servers)):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        print(announcement(url, [s.port for s in sims]), flush=True)

    async def run_gateway() -> None:
        # The gateway owns Ctrl-C; when it stops, the sim nodes stop with it.
        try:
            await gateway.serve()
        finally:
            for s in servers:
                s.should_exit = True

    await asyncio.gather(*(s.serve() for s in servers), run_gateway(), announce())


def announcement(url: str, node_ports: Sequence[int]) -> str:
    """What the demo prints once everything listens: where, and the line to paste for Claude Code."""
    first, last, count = node_ports[0], node_ports[-1], len(node_ports)
    nodes = f"1 sim node on port {first}" if count == 1 else f"{count} sim nodes on ports {first}-{last}"
    return (
        f"mlxmux demo: gateway on {url}, {nodes} (state: {url}/cluster)\n\n"
        "In another terminal, run Claude Code against it:\n\n"
        f"  ANTHROPIC_BASE_URL={url} ANTHROPIC_AUTH_TOKEN=mlxmux CLAUDE_CODE_ATTRIBUTION_HEADER=0 claude\n\n"
        "Type `run: ls` to see a tool round trip. Ctrl-C stops the demo."
    )


def check_ports(args: argparse.Namespace) -> None:
    """Every port the demo needs is free (checked before anything starts: one line, not a traceback)."""
    if args.nodes < 1:
        raise CannotListen(f"--nodes must be at least 1, not {args.nodes}")
    check_can_listen("127.0.0.1", args.port)
    for i in range(args.nodes):
        port = args.node_port + i
        if port == args.port:
            raise CannotListen(f"sim node {i + 1} would use port {port}, the gateway's: choose another --node-port")
        check_can_listen("127.0.0.1", port, what=f"sim node {i + 1} (--node-port + {i})", flag="--node-port")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        check_ports(args)
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_run(args))
    except (ConfigError, CannotListen) as exc:
        print(f"mlxmux: error: {exc}", file=sys.stderr)
        return 2
    return 0
