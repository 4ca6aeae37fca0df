"""Many concurrent streams through one replica: every stream complete and correct, no cross-talk.

One `mlxmux serve` process (one uvicorn worker) in front of fast sim nodes; N concurrent streaming
requests (64, then 256 by default), each carrying its own marker in a tool result that the sim node
quotes back, so a stream that received another stream's bytes is caught. Printed per level: completed,
wrong or broken streams, requests/s, p50/p99 time to first token (first content_block_delta) — and,
side by side, the same load sent straight to the nodes (round-robin by the load generator) as the
reference this machine can do without a gateway.

    python bench/load.py [--levels 64,256] [--requests-per-stream 4] [--nodes 2]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.procs import gateway, sim_node

SIM = ("--prefill-tps", "0", "--token-delay-ms", "2", "--reply-tokens", "60", "--parallel", "512")


def anthropic_body(marker: str) -> dict[str, object]:
    return {
        "model": "claude-opus-4-8",
        "max_tokens": 200,
        "stream": True,
        "tools": [{"name": "Read", "description": "read a file", "input_schema": {"type": "object"}}],
        "messages": [
            {"role": "user", "content": "read it"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": marker}]},
        ],
    }


def chat_body(marker: str) -> dict[str, object]:
    call = {"id": "call_1", "type": "function", "function": {"name": "Read", "arguments": "{}"}}
    return {
        "max_tokens": 200,
        "stream": True,
        "tools": [{"type": "function", "function": {"name": "Read", "parameters": {"type": "object"}}}],
        "messages": [
            {"role": "user", "content": "read it"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": marker},
        ],
    }


async def one(client: httpx.AsyncClient, url: str, direct: bool) -> tuple[float, str]:
    """(time to first text in s, "" if correct else what was wrong) for one streamed request."""
    marker = f"marker-{uuid.uuid4().hex}"
    body = chat_body(marker) if direct else anthropic_body(marker)
    path = "/v1/chat/completions" if direct else "/v1/messages"
    started = time.perf_counter()
    ttft = 0.0
    text: list[str] = []
    finished = False
    async with client.stream("POST", url + path, json=body) as r:
        if r.status_code != 200:
            return 0.0, f"HTTP {r.status_code}"
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                finished = True
                continue
            event = json.loads(data)
            if direct:
                delta = (event.get("choices") or [{}])[0].get("delta") or {}
                piece = delta.get("content") or ""
            else:
                finished = finished or event.get("type") == "message_stop"
                piece = (event.get("delta") or {}).get("text") or ""
            if event.get("type") == "error":
                return 0.0, f"error event: {event['error'].get('type')}"
            if piece:
                ttft = ttft or time.perf_counter() - started
                text.append(piece)
    if not finished:
        return 0.0, "stream ended unfinished"
    return ttft, "" if marker in "".join(text) else "wrong answer (another stream's marker?)"


async def level(urls: list[str], streams: int, per_stream: int, direct: bool) -> dict[str, float]:
    """Run the load; print what went wrong with any stream (before the level's row)."""
    # keepalive_expiry below the servers' 5 s idle timeout: reusing a connection the server is closing
    # would fail a request for the load generator's sake, not the gateway's.
    limits = httpx.Limits(max_connections=streams + 8, max_keepalive_connections=streams + 8, keepalive_expiry=2.0)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        ttfts: list[float] = []
        problems: collections.Counter[str] = collections.Counter()

        async def worker(i: int) -> None:
            for k in range(per_stream):
                try:
                    ttft, problem = await one(client, urls[(i + k) % len(urls)], direct)
                except (httpx.HTTPError, json.JSONDecodeError) as exc:
                    ttft, problem = 0.0, f"client error: {type(exc).__name__}"
                if problem:
                    problems[problem] += 1
                else:
                    ttfts.append(ttft)

        started = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(streams)))
        elapsed = time.perf_counter() - started
    ttfts.sort()
    p99 = ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))] if ttfts else 0.0
    for problem, n in problems.items():
        print(f"         ({n} x {problem})")
    return {
        "ok": len(ttfts),
        "bad": sum(problems.values()),
        "rps": len(ttfts) / elapsed,
        "p50": statistics.median(ttfts) * 1000 if ttfts else 0.0,
        "p99": p99 * 1000,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--levels", default="64,256", help="concurrent streams, comma-separated")
    p.add_argument("--requests-per-stream", type=int, default=4)
    p.add_argument("--nodes", type=int, default=2)
    args = p.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    with contextlib.ExitStack() as stack:
        nodes = [stack.enter_context(sim_node(*SIM, name=f"sim{i}")) for i in range(args.nodes)]
        env = {"MLXMUX_LOG_LEVEL": "warning", "MLXMUX_MAX_ATTEMPTS": "1"}
        extra = ["--strategy", "round-robin"]
        config = "".join(f'[[nodes]]\nurl = "{n.url}"\nmax_concurrency = 512\n' for n in nodes)
        cfg = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mlxmux-load-"))) / "mlxmux.toml"
        cfg.write_text(config)
        gw = stack.enter_context(gateway(extra=[*extra, "--config", str(cfg)], env=env))
        asyncio.run(level([gw.url], 8, 2, direct=False))  # warm-up
        print(f"\n{args.nodes} fast sim nodes (60-token replies, 2 ms/token); one mlxmux replica, 1 worker;")
        print(f"each stream sends {args.requests_per_stream} requests one after another; its marker must come back\n")
        print(f"{'streams':>8} {'target':<8} {'ok':>6} {'bad':>5} {'req/s':>8} {'TTFT p50 ms':>12} {'TTFT p99 ms':>12}")
        for n in levels:
            for name, urls, direct in (("direct", [x.url for x in nodes], True), ("mlxmux", [gw.url], False)):
                r = asyncio.run(level(urls, n, args.requests_per_stream, direct))
                counts = f"{n:>8} {name:<8} {r['ok']:>6.0f} {r['bad']:>5.0f}"
                print(f"{counts} {r['rps']:>8.1f} {r['p50']:>12.1f} {r['p99']:>12.1f}")


if __name__ == "__main__":
    main()
