"""`mlxmux sim-node`: run a simulated mlx_lm.server (also `python -m proxy.sim`).

Use it to try mlxmux without a Mac, in tests, and in benchmarks of cache-affinity routing::

    mlxmux sim-node --port 8081 --id mac-1
    mlxmux sim-node --port 8082 --id mac-2 --prefill-tps 1000 --fail-status 503 --fail-rate 0.2

See `proxy.sim.config.SimConfig` for what each setting means, `proxy.sim.faults` for the faults and
docs/simulator.md for how the sim compares with the real mlx_lm.server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Iterator, Sequence

import uvicorn

from proxy.listen import CannotListen, check_can_listen
from proxy.sim.app import build_sim_app
from proxy.sim.config import DEFAULT_MODEL, SimConfig
from proxy.sim.faults import Faults
from proxy.sim.http10 import Http10Server

__all__ = ["SimConfig", "build_sim_app", "main", "make_server", "serve_many"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mlxmux sim-node",
        description="Simulated mlx_lm.server: same endpoints, a prompt cache, realistic timing, injectable faults.",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--id", dest="node_id", metavar="ID", default="", help="node id in replies (default sim-<port>)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model id served (default {DEFAULT_MODEL})")
    p.add_argument("--prompt-cache-size", type=int, default=10, help="LRU prompt cache entries (default 10)")
    p.add_argument("--prefill-tps", type=float, default=4000.0, help="prefill tokens/s, 0 = instant (default 4000)")
    p.add_argument("--prefill-step-size", type=int, default=2048, help="tokens per prefill step/keepalive (2048)")
    p.add_argument("--token-delay-ms", type=float, default=5.0, help="delay per generated token (default 5)")
    p.add_argument("--reply-tokens", type=int, default=48, help="length of the default reply (default 48)")
    p.add_argument("--parallel", type=int, default=4, help="concurrent generations; more wait (default 4)")
    p.add_argument("--reasoning", action="store_true", help="emit delta.reasoning before the answer")
    p.add_argument("--anthropic", action="store_true", help="also serve POST /v1/messages natively")
    p.add_argument(
        "--http",
        choices=["1.0", "1.1"],
        default="1.0",
        help="1.0: like mlx_lm.server, close every connection, streams end at close (default); 1.1: uvicorn",
    )
    p.add_argument(
        "--close-delay-ms", type=float, default=5.0, help="HTTP/1.0: close this long after a response (default 5)"
    )
    p.add_argument(
        "--empty-models", action="store_true", help="GET /v1/models: 200 with an empty body (mlx 0.32.2, no HF cache)"
    )
    f = p.add_argument_group("faults (also settable at runtime: POST /_sim/faults)")
    f.add_argument("--fail-status", type=int, default=0, help="answer requests with this HTTP status")
    f.add_argument("--fail-rate", type=float, default=1.0, help="fraction of requests that fail (default 1)")
    f.add_argument("--hang", action="store_true", help="never answer (until faults change or the client leaves)")
    f.add_argument("--cut-after", type=int, default=None, help="stream N chunks, then stop without [DONE]")
    f.add_argument(
        "--cut-mode",
        choices=["drop", "eof"],
        default="drop",
        help="how a cut stream ends: drop = connection reset; eof = clean close, as mlx on an error (default drop)",
    )
    f.add_argument("--close", action="store_true", help="close connections without any response")
    f.add_argument("--slow-first-byte-ms", type=float, default=0.0, help="delay before answering")
    f.add_argument("--garbage", action="store_true", help="send a non-JSON data: line")
    f.add_argument("--health-status", type=int, default=200, help="status of GET /health (default 200)")
    f.add_argument("--fault-times", type=int, default=None, help="apply request faults to N requests only")
    return p


def config_from_args(args: argparse.Namespace) -> SimConfig:
    """Build a SimConfig from parsed flags (raises ValueError on out-of-range values)."""
    faults = Faults(
        fail_status=args.fail_status,
        fail_rate=args.fail_rate,
        hang=args.hang,
        cut_after=args.cut_after,
        cut_mode=args.cut_mode,
        close=args.close,
        slow_first_byte_ms=args.slow_first_byte_ms,
        garbage=args.garbage,
        health_status=args.health_status,
        times=args.fault_times,
    )
    return SimConfig(
        host=args.host,
        port=args.port,
        node_id=args.node_id,
        model=args.model,
        prompt_cache_size=args.prompt_cache_size,
        prefill_tps=args.prefill_tps,
        prefill_step_size=args.prefill_step_size,
        token_delay_ms=args.token_delay_ms,
        reply_tokens=args.reply_tokens,
        parallel=args.parallel,
        reasoning=args.reasoning,
        anthropic=args.anthropic,
        http=args.http,
        close_delay_ms=args.close_delay_ms,
        empty_models=args.empty_models,
        faults=faults,
    )


class _QuietServer(uvicorn.Server):
    """A uvicorn server that leaves signals alone (its owner stops it with `should_exit = True`)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def make_server(config: SimConfig, *, capture_signals: bool = True) -> Http10Server | uvicorn.Server:
    """A server for one sim node, not started: `await server.serve()`, stop with `should_exit = True`.

    `config.http` "1.0" (default) gives a `proxy.sim.http10.Http10Server` (mlx_lm.server's wire manners),
    "1.1" a uvicorn server; both have `serve()`, `run()`, `started` and `should_exit`. With
    `capture_signals=False` the server does not install SIGINT/SIGTERM handlers, so several servers (and a
    gateway) can share one event loop under one owner's signal handling.
    """
    app = build_sim_app(config)
    if config.http == "1.0":
        return Http10Server(
            app, config.host, config.port, close_delay_s=config.close_delay_ms / 1000, capture_signals=capture_signals
        )
    cls = uvicorn.Server if capture_signals else _QuietServer
    return cls(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            loop="auto",
            http="auto",
            access_log=False,
            log_level="warning",
            # Hung requests never finish by themselves: do not let them hold shutdown.
            timeout_graceful_shutdown=1,
        )
    )


async def serve_many(configs: Sequence[SimConfig], stop: asyncio.Event | None = None) -> None:
    """Run several sim nodes on the running event loop until `stop` is set (default: SIGINT or SIGTERM).

    Returns once every node has shut down; a Ctrl-C is handled here, not re-raised.
    """
    servers = [make_server(c, capture_signals=False) for c in configs]
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    own_signals = stop is None
    stop = stop or asyncio.Event()
    if own_signals:
        for sig in signals:
            loop.add_signal_handler(sig, stop.set)

    async def stopper() -> None:
        await stop.wait()
        for server in servers:
            server.should_exit = True

    watcher = asyncio.ensure_future(stopper())
    try:
        await asyncio.gather(*(s.serve() for s in servers))
    finally:
        watcher.cancel()
        if own_signals:
            for sig in signals:
                loop.remove_signal_handler(sig)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `mlxmux sim-node`; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = config_from_args(args)
        check_can_listen(config.host, config.port, what="the sim node")
    except (ValueError, CannotListen) as exc:
        print(f"mlxmux sim-node: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"sim node {config.name} serving {config.model} on http://{config.host}:{config.port}",
        file=sys.stderr,
        flush=True,
    )
    make_server(config).run()
    return 0
