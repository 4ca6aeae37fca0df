"""What one request costs the shared store and the gateway, against the number of nodes and the prompt size.

A private redis-server; for 4, 16 and 64 candidate nodes and prompts of 80 KB, 1 MB and 30 MB (Claude Code
shaped: tools, system prompt, a conversation), printed side by side:

- gateway CPU per request: decoding, translating and hashing the body (`proxy.messages` does the same),
  next to a plain `json.loads` of the same body as the reference this machine does for any JSON body;
- route and finish script time inside Redis, p50 and p99 over the requests (from `SLOWLOG`, which times
  the script itself, not the network), next to a one-key `HGET` measured the same way as the reference.

Each request is a new conversation on a warm cluster (every node's cache model holds `cache_slots` entries
of its own conversations), so matching and the cache-model report do real work. Only the first
`routing.max_request_blocks` (1024) blocks of a prompt are hashed, matched and recorded: the 30 MB prompt
costs the store what a 1 MB one does.

    python bench/store_cost.py [--requests 40] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy.translate import prompt_parts, to_chat_request
from proxy.wire.anthropic import decode_messages_request
from state.cache_model import CacheReport
from state.prefix import block_hashes
from state.redis_store import RedisStore
from state.types import Candidate, Outcome, RouteRequest, RoutingLimits
from tests.claude_code_request import claude_code_request
from tests.procs import redis_server

SIZES = {"80 KB": 80_000, "1 MB": 1_000_000, "30 MB": 30_000_000}


def body_of(size: int, session: str) -> bytes:
    """A Claude-Code-shaped request of about `size` bytes (the last user turn carries the bulk)."""
    b = claude_code_request(session, 2)
    base = len(json.dumps(b))
    if size > base:
        b["messages"].append({"role": "assistant", "content": "ok"})
        b["messages"].append({"role": "user", "content": f"{session} " + "x" * (size - base)})
    return json.dumps(b).encode()


def blocks_of(raw: bytes, limits: RoutingLimits) -> tuple[tuple[str, ...], int]:
    """What `proxy.messages.prepare` computes: the prompt's capped block hashes and its byte length."""
    chat = to_chat_request(decode_messages_request(raw), model_id=None, max_tokens_cap=32768)
    parts = prompt_parts(chat)
    blocks = block_hashes(parts, salt="default", block_size=limits.block_size, max_blocks=limits.max_request_blocks)
    return blocks, sum(len(p) for p in parts)


def cpu_ms(fn: Any, *args: Any) -> float:
    start = time.process_time()
    fn(*args)
    return (time.process_time() - start) * 1000


def slowlog_us(r: redis.Redis) -> dict[str, list[int]]:
    """Microseconds per command in the slow log, by kind: route, finish (EVALSHA by script size), hget."""
    out: dict[str, list[int]] = {"evalsha": [], "hget": []}
    for entry in r.slowlog_get(100000):
        command = entry["command"].split()[0].lower() if isinstance(entry["command"], str) else ""
        if isinstance(entry["command"], bytes):
            command = entry["command"].split()[0].decode().lower()
        if command in out:
            out[command].append(int(entry["duration"]))
    return out


def pct(samples: list[float], q: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(url: str, nodes: int, size: int, requests: int, limits: RoutingLimits) -> dict[str, float]:
    store = RedisStore.from_url(url, limits)
    r = redis.Redis.from_url(url, decode_responses=True)
    candidates = tuple(Candidate(f"mac{i}", cache_slots=10) for i in range(nodes))
    try:
        # warm: every node's model full of its own conversations
        for i in range(nodes * 10):
            blocks, n = blocks_of(body_of(80_000, f"warm-{i}"), limits)
            d = await store.route(RouteRequest(pool="default", candidates=candidates, blocks=blocks, session=f"w{i}"))
            report = CacheReport(blocks, n, n // 4, 0, 20)
            await store.finish(d.lease, Outcome(ok=True, prompt_tokens=n // 4, report=report))
        r.config_set("slowlog-log-slower-than", 0)
        r.config_set("slowlog-max-len", 100000)
        r.slowlog_reset()
        route_us: list[float] = []
        finish_us: list[float] = []
        ref_us: list[float] = []
        for i in range(requests):
            blocks, n = blocks_of(body_of(size, f"req-{i}"), limits)
            r.slowlog_reset()
            d = await store.route(RouteRequest(pool="default", candidates=candidates, blocks=blocks, session=f"s{i}"))
            route_us += slowlog_us(r)["evalsha"]
            r.slowlog_reset()
            report = CacheReport(blocks, n, n // 4, n // 8, 20)
            await store.finish(d.lease, Outcome(ok=True, prompt_tokens=n // 4, cached_tokens=n // 8, report=report))
            finish_us += slowlog_us(r)["evalsha"]
            r.slowlog_reset()
            r.hget(f"{limits.key_prefix}node:mac0:cache", "tick")
            ref_us += slowlog_us(r)["hget"]
        r.config_set("slowlog-log-slower-than", 10000)
        return {
            "route_p50": pct(route_us, 0.5),
            "route_p99": pct(route_us, 0.99),
            "finish_p50": pct(finish_us, 0.5),
            "finish_p99": pct(finish_us, 0.99),
            "ref_p50": pct(ref_us, 0.5),
        }
    finally:
        r.flushall()
        r.close()
        await store.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--quick", action="store_true", help="10 requests, 4 and 64 nodes")
    args = p.parse_args()
    requests = 10 if args.quick else args.requests
    node_counts = (4, 64) if args.quick else (4, 16, 64)
    limits = RoutingLimits()
    print(f"{'prompt':>7}  {'gateway CPU ms':>14}  {'json.loads ms':>13}  ratio")
    bodies = {label: body_of(size, "cpu") for label, size in SIZES.items()}
    for label, raw in bodies.items():
        gw = statistics.median(cpu_ms(blocks_of, raw, limits) for _ in range(3))
        ref = statistics.median(cpu_ms(json.loads, raw) for _ in range(3))
        print(f"{label:>7}  {gw:14.1f}  {ref:13.1f}  {gw / ref:5.1f}x")
    print()
    head = f"{'nodes':>5}  {'prompt':>7}  {'route p50/p99 µs':>17}  {'finish p50/p99 µs':>18}  {'HGET µs':>7}"
    print(head + "  route p99 / HGET")
    with redis_server() as url:
        for nodes in node_counts:
            for label, size in SIZES.items():
                m = asyncio.run(run(url, nodes, size, requests, limits))
                print(
                    f"{nodes:>5}  {label:>7}  {m['route_p50']:8.0f}/{m['route_p99']:<8.0f}  "
                    f"{m['finish_p50']:8.0f}/{m['finish_p99']:<9.0f}  {m['ref_p50']:7.0f}  "
                    f"{m['route_p99'] / max(1.0, m['ref_p50']):8.0f}x"
                )


if __name__ == "__main__":
    main()
