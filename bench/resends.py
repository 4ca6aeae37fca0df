"""Resends during a slow prefill: what a node computes with joining on and off, side by side in one run.

Claude Code gives up on a request that runs past its timeout and sends it again while the node is still
prefilling the first copy. Here each of `--sessions` Claude-Code-shaped sessions sends its first turn to a
sim node whose prefill of that prompt takes `--prefill-s` seconds; a client gives up after `--timeout`
seconds and resends half a second later, `--resends` times, each copy through the next of two replicas
sharing a real redis-server; the last copy waits for the answer. Printed per mode, from the node's own
counters: requests it received, generations it began (`generations`), finished and cut off, the seconds
its generation slots were busy, and when each session had its answer.

    python bench/resends.py [--sessions 4] [--resends 2] [--prefill-s 20] [--timeout 8] [--parallel 4]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import anthropic
import httpx

from tests.claude_code_request import claude_code_request, sdk_kwargs
from tests.procs import gateway, redis_server, sim_node


async def session(urls: list[str], s: int, args: argparse.Namespace, started: float) -> float | None:
    """One session's first turn, given up on and resent `args.resends` times; when it had its answer."""
    sid = f"resend-{s:03d}-0000-4000-8000-000000000000"
    body = claude_code_request(sid, 1, max_tokens=64)
    for copy in range(args.resends + 1):
        last = copy == args.resends
        url = urls[(s + copy) % len(urls)]
        async with anthropic.AsyncAnthropic(base_url=url, api_key="x", max_retries=0, timeout=600) as client:
            try:
                async with asyncio.timeout(None if last else args.timeout):
                    async with client.messages.stream(**sdk_kwargs(body, sid)) as stream:
                        await stream.get_final_message()
                return time.monotonic() - started
            except TimeoutError:
                pass  # gave up: the stream is closed, as Claude Code closes it
            except anthropic.APIError as exc:
                print(f"  {sid} copy {copy}: {exc}", file=sys.stderr)
                return None
        await asyncio.sleep(0.5)  # Claude Code's first retry comes about half a second later
    return None


async def workload(urls: list[str], args: argparse.Namespace) -> list[float | None]:
    started = time.monotonic()
    return list(await asyncio.gather(*(session(urls, s, args, started) for s in range(args.sessions))))


def prompt_tokens() -> int:
    """The tokens the sim counts in one session's first turn (to set its prefill speed)."""
    with sim_node("--prefill-tps", "0", "--reply-tokens", "1", "--anthropic") as node:
        body = claude_code_request("calibrate", 1, max_tokens=1, stream=False)
        r = httpx.post(node.url + "/v1/messages", json=body, timeout=30)
        r.raise_for_status()
        usage = r.json()["usage"]
        return int(usage["input_tokens"]) + int(usage.get("cache_read_input_tokens") or 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=4)
    p.add_argument("--resends", type=int, default=2, help="times each client gives up and sends again")
    p.add_argument("--prefill-s", type=float, default=20.0, help="seconds the node takes to prefill one prompt")
    p.add_argument("--timeout", type=float, default=8.0, help="seconds a client waits before it gives up")
    p.add_argument("--parallel", type=int, default=4, help="generations the node runs at once")
    args = p.parse_args()
    tokens = prompt_tokens()
    tps = tokens / args.prefill_s
    sim_args = ("--prefill-tps", f"{tps:.0f}", "--reply-tokens", "24", "--parallel", str(args.parallel))
    rows: list[tuple[str, dict[str, Any], list[float | None]]] = []
    with redis_server() as redis_url, sim_node(*sim_args, "--prompt-cache-size", "0") as node:
        for mode, join in (("joining on", "true"), ("joining off", "false")):
            httpx.post(node.url + "/_sim/reset", timeout=10).raise_for_status()
            env = {"MLXMUX_JOIN_RESENDS": join, "MLXMUX_KEY_PREFIX": f"bench-resend-{join}:"}
            extra = ["--redis", redis_url]
            with contextlib.ExitStack() as stack:
                gws = [stack.enter_context(gateway(f"mac={node.url}", extra=extra, env=env)) for _ in range(2)]
                done = asyncio.run(workload([g.url for g in gws], args))
                time.sleep(1.0)  # let cut-off generations end on the node
            stats = httpx.get(node.url + "/_sim/stats", timeout=10).json()
            rows.append((mode, stats, done))
            print(f"  ran {mode}", file=sys.stderr)

    print(
        f"\n{args.sessions} sessions, each first turn ({tokens} prompt tokens, {args.prefill_s:g} s of prefill on a "
        f"node running {args.parallel} generations at once) given up after {args.timeout:g} s and resent "
        f"{args.resends} times, through 2 replicas sharing Redis\n"
    )
    header = ("mode", "node requests", "generations", "finished", "cut off", "busy s", "answered", "answer s")
    print("{:<14}{:>14}{:>13}{:>10}{:>9}{:>9}{:>10}  {}".format(*header))
    for mode, s, done in rows:
        answered = [t for t in done if t is not None]
        when = f"mean {statistics.mean(answered):.1f}, last {max(answered):.1f}" if answered else "-"
        print(
            f"{mode:<14}{s['requests']:>14}{s['generations']:>13}{s['completed']:>10}{s['disconnects']:>9}"
            f"{s['busy_s']:>9.1f}{len(answered):>7}/{len(done):<2}  {when}"
        )
    on, off = rows[0][1], rows[1][1]
    if on["busy_s"]:
        print(
            f"\nwith joining the node was busy {on['busy_s']:.1f} s, without {off['busy_s']:.1f} s "
            f"({off['busy_s'] / on['busy_s']:.1f}x), for the same {args.sessions} answers"
        )


if __name__ == "__main__":
    main()
