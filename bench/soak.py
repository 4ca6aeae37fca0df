"""Soak: sessions coming and going for many minutes; replica memory and Redis keys must level off.

A real redis-server, two `mlxmux serve` replicas sharing it and two sim nodes. A team of 12
concurrent teammates: each runs Claude-Code-shaped sessions of a few turns (every turn through a
random replica), then starts a new session — so session ids, prompts and prefix blocks keep changing
for the whole run. Binding and prefix TTLs are shortened (`--session-ttl`, `--prefix-ttl`) so that
expiry, not the end of the run, bounds the state: without bounds, the key count and the replicas'
memory would grow with the number of sessions ever seen.

Every `--every` seconds it samples each replica's resident memory (VmRSS), the number of keys
under the soak's prefix and Redis' used memory, and prints a row; at the end a first-half vs
second-half comparison and a CSV (`--csv`).

    python bench/soak.py [--minutes 10] [--every 20] [--csv docs/soak.csv]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path

import anthropic
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.claude_code_request import claude_code_request, sdk_kwargs
from tests.procs import Proc, gateway, redis_server, sim_node

PREFIX = "soak:"


def rss_mb(proc: Proc) -> float:
    for line in Path(f"/proc/{proc.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def redis_figures(url: str) -> tuple[int, float]:
    client = redis.Redis.from_url(url)
    try:
        keys = sum(1 for _ in client.scan_iter(f"{PREFIX}*", count=1000))
        used = int(client.info("memory")["used_memory"]) / 1024 / 1024
        return keys, used
    finally:
        client.close()


async def teammate(urls: list[str], stop_at: float, counts: dict[str, int]) -> None:
    clients = [anthropic.AsyncAnthropic(base_url=u, api_key="soak", max_retries=2, timeout=120) for u in urls]
    try:
        while time.monotonic() < stop_at:
            session = str(uuid.uuid4())
            for turn in range(1, random.randint(2, 5) + 1):
                if time.monotonic() >= stop_at:
                    break
                body = claude_code_request(session, turn, max_tokens=32, file_lines=20)
                try:
                    async with random.choice(clients).messages.stream(**sdk_kwargs(body, session)) as stream:
                        await stream.get_final_message()
                    counts["ok"] += 1
                except anthropic.APIError:
                    counts["errors"] += 1
                await asyncio.sleep(random.uniform(0.0, 0.5))  # a teammate reading the answer
            counts["sessions"] += 1
    finally:
        for c in clients:
            await c.close()


async def drive(urls: list[str], seconds: float, team: int, counts: dict[str, int]) -> None:
    stop_at = time.monotonic() + seconds
    await asyncio.gather(*(teammate(urls, stop_at, counts) for _ in range(team)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--every", type=float, default=20.0, help="seconds between samples")
    p.add_argument("--team", type=int, default=12, help="concurrent teammates")
    p.add_argument("--session-ttl", type=float, default=60.0)
    p.add_argument("--prefix-ttl", type=float, default=120.0)
    p.add_argument("--csv", default="", help="write the samples to this CSV file")
    args = p.parse_args()
    sim = ("--prefill-tps", "200000", "--token-delay-ms", "2", "--reply-tokens", "16", "--prompt-cache-size", "4")
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(redis_server())
        nodes = [stack.enter_context(sim_node(*sim, name=f"sim{i}")) for i in range(2)]
        cfg = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mlxmux-soak-"))) / "mlxmux.toml"
        cfg.write_text(
            f"[routing]\nsession_ttl_s = {args.session_ttl}\nprefix_ttl_s = {args.prefix_ttl}\n"
            f'key_prefix = "{PREFIX}"\n\n' + "".join(f'[[nodes]]\nurl = "{n.url}"\n' for n in nodes)
        )
        env = {"MLXMUX_LOG_LEVEL": "warning"}
        replicas = [
            stack.enter_context(gateway(extra=["--config", str(cfg), "--redis", url], env=env)) for _ in range(2)
        ]
        counts = {"ok": 0, "errors": 0, "sessions": 0}
        rows: list[dict[str, float]] = []
        started = time.monotonic()
        print(
            f"soak: {args.minutes:g} min, {args.team} teammates, 2 replicas, 2 sim nodes, "
            f"session TTL {args.session_ttl:g} s, prefix TTL {args.prefix_ttl:g} s\n"
        )
        header = ("t s", "requests", "sessions", "errors", "rss1 MB", "rss2 MB", "keys", "redis MB")
        print("{:>6} {:>9} {:>9} {:>7} {:>8} {:>8} {:>7} {:>9}".format(*header))

        async def sample_loop() -> None:
            driver = asyncio.ensure_future(drive([r.url for r in replicas], args.minutes * 60, args.team, counts))
            while not driver.done():
                await asyncio.wait({driver}, timeout=args.every)
                keys, used = await asyncio.to_thread(redis_figures, url)
                row = {
                    "t": time.monotonic() - started,
                    "requests": counts["ok"],
                    "sessions": counts["sessions"],
                    "errors": counts["errors"],
                    "rss1": rss_mb(replicas[0]),
                    "rss2": rss_mb(replicas[1]),
                    "keys": keys,
                    "redis_mb": used,
                }
                rows.append(row)
                print(
                    f"{row['t']:>6.0f} {row['requests']:>9.0f} {row['sessions']:>9.0f} {row['errors']:>7.0f} "
                    f"{row['rss1']:>8.1f} {row['rss2']:>8.1f} {row['keys']:>7.0f} {row['redis_mb']:>9.2f}",
                    flush=True,
                )
            await driver

        asyncio.run(sample_loop())

    half = len(rows) // 2
    if half >= 2:

        def peak(key: str, part: list[dict[str, float]]) -> float:
            return max(r[key] for r in part)

        # Compare the middle of the run with its end: after the TTLs have passed, growth should stop.
        settle = [r for r in rows if r["t"] >= 2 * max(args.session_ttl, args.prefix_ttl)]
        first, second = settle[: len(settle) // 2], settle[len(settle) // 2 :]
        if first and second:
            print("\nafter the TTLs have passed (peak in each half of that stretch):")
            for key, label in (("rss1", "replica 1 RSS MB"), ("rss2", "replica 2 RSS MB"), ("keys", "Redis keys")):
                a, b = peak(key, first), peak(key, second)
                print(f"  {label:<18} {a:>9.1f} -> {b:>9.1f}  ({(b - a) / a:+.1%})" if a else f"  {label}: -")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"\nsamples written to {args.csv}")


if __name__ == "__main__":
    main()
