"""`mlxmux` command line: serve, status, nodes, sim-node, demo.

Configuration errors print one line (`mlxmux: error: …`) and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence

from proxy import ops
from proxy.config import ConfigError, Settings, load_settings, redact_url
from proxy.environment import unknown_variable_warnings
from proxy.listen import CannotListen, check_can_listen


def _serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("serve", help="run the gateway", description="Run the gateway (Anthropic Messages API).")
    p.add_argument("--host", help="bind address (MLXMUX_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (MLXMUX_PORT, default 8420)")
    p.add_argument(
        "--node",
        action="append",
        metavar="[ID=]URL",
        help="an inference node, repeatable (MLXMUX_NODES=url1,id2=url2)",
    )
    p.add_argument("--config", metavar="FILE", help="TOML config file (MLXMUX_CONFIG)")
    p.add_argument("--redis", metavar="URL", help="shared state, e.g. redis://localhost:6379/0 (MLXMUX_REDIS_URL)")
    p.add_argument(
        "--strategy",
        choices=["cache-aware", "round-robin", "least-loaded", "latency-based", "random"],
        help="routing strategy (MLXMUX_STRATEGY, default cache-aware)",
    )
    p.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="log level (MLXMUX_LOG_LEVEL, default info); debug adds each routing decision",
    )


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {
        ("server", "host"): args.host,
        ("server", "port"): args.port,
        ("server", "log_level"): args.log_level,
        ("routing", "strategy"): args.strategy,
        (None, "redis_url"): args.redis,
    }
    return load_settings(config_file=args.config, overrides=overrides, nodes=args.node)


def refuse_unusable_store(settings: Settings) -> None:
    """ConfigError if the shared store can never hold the state (a Redis Cluster node). A Redis that cannot be
    reached now is no reason to stop: the gateway routes in degraded mode until it answers."""
    if not settings.redis_url:
        return
    import asyncio

    from state import open_store
    from state.errors import StateUnavailable, StoreUnsupported

    url = settings.redis_url

    async def check() -> None:
        store = open_store(url, prefix=settings.routing.key_prefix)
        try:
            await store.check()
        finally:
            with contextlib.suppress(StateUnavailable):
                await store.close()

    try:
        asyncio.run(check())
    except StateUnavailable:
        pass
    except StoreUnsupported as exc:
        raise ConfigError(f"redis url {redact_url(url.partition('?')[0])!r}: {exc}") from None


def serve(settings: Settings) -> int:
    import uvicorn

    from proxy.app import build_app
    from proxy.auth import warn_if_open
    from proxy.logs import configure_logging

    try:
        check_can_listen(settings.server.host, settings.server.port)
    except CannotListen as exc:
        raise ConfigError(str(exc)) from None
    json_logs = settings.server.log_format == "json"
    configure_logging(settings.server)
    for warning in unknown_variable_warnings(os.environ):  # a misspelled setting would be ignored silently
        logging.getLogger("mlxmux").warning("%s", warning)
    warn_if_open(settings.auth, settings.server.host)
    config = uvicorn.Config(
        build_app(settings),
        host=settings.server.host,
        port=settings.server.port,
        log_level=settings.server.log_level,
        log_config=None if json_logs else uvicorn.config.LOGGING_CONFIG,  # None: uvicorn's lines go to our handler
        access_log=False,
        timeout_graceful_shutdown=max(1, round(settings.server.shutdown_grace_s)),
        server_header=False,
    )
    # uvicorn stops gracefully on SIGTERM (no new connections, in-flight streams get
    # timeout_graceful_shutdown seconds, then the lifespan releases leases) and then re-raises the
    # signal to the handler that was installed before it: make that one a no-op, so a rolling update's
    # SIGTERM ends in exit status 0 rather than death by signal.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    uvicorn.Server(config).run()
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mlxmux")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """`mlxmux` and its subcommands (sim-node and demo parse their own arguments: see their --help)."""
    parser = argparse.ArgumentParser(prog="mlxmux", description="Claude Code gateway for a team's own Macs.")
    parser.add_argument("--version", action="version", version=f"mlxmux {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _serve_parser(sub)
    ops.add_parsers(sub)
    sub.add_parser("sim-node", help="run a simulated mlx_lm.server (mlxmux sim-node --help)", add_help=False)
    sub.add_parser("demo", help="start sim nodes and a gateway to try with Claude Code", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "sim-node":
        from proxy.sim.cli import main as sim_main

        return sim_main(argv[1:])
    if argv and argv[0] == "demo":
        from proxy.demo import main as demo_main

        return demo_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # bare `mlxmux`
        parser.print_help()
        return 0
    try:
        if args.command == "serve":
            settings = settings_from_args(args)
            refuse_unusable_store(settings)
            return serve(settings)
        if args.command in ("status", "sessions", "nodes"):
            return ops.run(args)
    except ConfigError as exc:
        print(f"mlxmux: error: {exc}", file=sys.stderr)
        return 2
    parser.print_help()
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
