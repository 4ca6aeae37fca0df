"""Routing quality on a team workload: cache-aware vs round-robin vs random, side by side in one run.

A real redis-server, three `mlxmux serve` replicas and three sim nodes whose prompt caches hold only a few
conversations each; a team of concurrent multi-turn Claude-Code-shaped sessions, each turn sent through
the next replica. Printed per strategy: the share of prompt tokens the nodes served from their caches
(the nodes' own counters), sessions that were split across nodes, and the wall time of the whole workload
(prefill is simulated at --prefill-tps, so uncached tokens cost time as on a Mac, scaled down).

    python bench/routing.py [--sessions 12] [--turns 6] [--cache 5] [--prefill-tps 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.procs import redis_server, sim_node
from tests.team import gateways, node_report, reset_nodes, run_team


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=12)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--nodes", type=int, default=3)
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--cache", type=int, default=5, help="prompt cache entries per node (mlx default 10)")
    p.add_argument("--prefill-tps", type=int, default=200_000, help="simulated prefill speed, tokens/s")
    p.add_argument("--file-lines", type=int, default=300, help="lines of file each turn adds")
    p.add_argument("--parallel", type=int, default=1, help="generations a node runs at once (prefill is per slot)")
    args = p.parse_args()
    sim_args = (
        "--prefill-tps",
        str(args.prefill_tps),
        "--token-delay-ms",
        "1",
        "--reply-tokens",
        "8",
        "--parallel",
        str(args.parallel),
    )
    strategies = ["cache-aware", "round-robin", "random"]
    rows = []
    with redis_server() as redis_url, contextlib.ExitStack() as stack:
        sims = [
            stack.enter_context(sim_node("--prompt-cache-size", str(args.cache), *sim_args)) for _ in range(args.nodes)
        ]
        best_node = stack.enter_context(sim_node("--prompt-cache-size", "1000", *sim_args))
        runs: list[tuple[str, list, str | None, int]] = [("one node, unbounded cache", [best_node], None, 1)]
        runs += [(s, sims, redis_url, args.replicas) for s in strategies]
        for name, nodes, url, replicas in runs:
            reset_nodes(nodes)
            strategy = name if name in strategies else "cache-aware"
            with gateways(
                nodes, url, strategy=strategy, count=replicas, cache_size=args.cache, key_prefix=f"bench-{strategy}:"
            ) as gws:
                result = asyncio.run(
                    run_team([g.url for g in gws], sessions=args.sessions, turns=args.turns, file_lines=args.file_lines)
                )
            report = node_report(nodes)
            rows.append((name, report, result))
            print(f"  ran {name}: {result.seconds:.1f}s", file=sys.stderr)

    print(
        f"\nworkload: {args.sessions} sessions x {args.turns} turns, {args.nodes} nodes with "
        f"{args.cache}-entry caches, {args.replicas} replicas, prefill {args.prefill_tps} tok/s\n"
    )
    header = ("placement", "cached share", "prompt tokens", "split sessions", "errors", "time s")
    print("{:<28}{:>14}{:>15}{:>16}{:>8}{:>9}  requests per node".format(*header))
    for name, report, result in rows:
        print(
            f"{name:<28}{report.cached_share:>14.3f}{report.prompt_tokens:>15}"
            f"{len(report.sessions_split):>16}{len(result.errors):>8}{result.seconds:>9.2f}"
            f"  {sorted(report.requests_per_node.values())}"
        )
    best = rows[0][1].cached_share
    aware = rows[1][1].cached_share
    print(f"\ncache-aware reaches {aware / best:.1%} of the one-node bound ({aware:.3f} of {best:.3f}).")


if __name__ == "__main__":
    main()
