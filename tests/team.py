"""A team of Claude Code sessions against a real multi-replica cluster, for the routing test and bench.

`cluster()` starts sim nodes (whose prompt caches hold only a few conversations each) and several
`mlxmux serve` replicas sharing one Redis; `run_team()` drives concurrent multi-turn sessions, each turn
through the next replica, with the official SDK; `node_report()` reads the nodes' own counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import httpx

from tests.claude_code_request import _filler, claude_code_request, sdk_kwargs
from tests.procs import Proc, gateway, sim_node

FAST_SIM = ("--prefill-tps", "0", "--token-delay-ms", "0", "--reply-tokens", "8", "--parallel", "8")


@dataclass
class Cluster:
    nodes: list[Proc]
    replicas: list[Proc]

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]


@contextlib.contextmanager
def cluster(
    redis_url: str | None,
    *,
    strategy: str = "cache-aware",
    nodes: int = 3,
    replicas: int = 3,
    cache_size: int = 5,
    key_prefix: str = "mlxmux:",
    sim_args: Sequence[str] = FAST_SIM,
) -> Iterator[Cluster]:
    """Sim nodes with `cache_size`-entry prompt caches and `replicas` gateways sharing `redis_url`."""
    with contextlib.ExitStack() as stack:
        sims = [stack.enter_context(sim_node("--prompt-cache-size", str(cache_size), *sim_args)) for _ in range(nodes)]
        gws = stack.enter_context(
            gateways(sims, redis_url, strategy=strategy, count=replicas, cache_size=cache_size, key_prefix=key_prefix)
        )
        yield Cluster(sims, gws)


@contextlib.contextmanager
def gateways(
    sims: Sequence[Proc],
    redis_url: str | None,
    *,
    strategy: str = "cache-aware",
    count: int = 3,
    cache_size: int = 5,
    key_prefix: str = "mlxmux:",
) -> Iterator[list[Proc]]:
    """`count` gateway replicas in front of `sims` (nodes `node0`, `node1`, …), sharing `redis_url`."""
    with contextlib.ExitStack() as stack:
        config = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mlxmux-team-"))) / "mlxmux.toml"
        config.write_text(
            "".join(
                f'[[nodes]]\nid = "node{i}"\nurl = "{s.url}"\ncache_slots = {cache_size}\nmax_concurrency = 8\n\n'
                for i, s in enumerate(sims)
            )
        )
        extra = ["--config", str(config), "--strategy", strategy]
        if redis_url:
            extra += ["--redis", redis_url]
        env = {"MLXMUX_KEY_PREFIX": key_prefix, "MLXMUX_HEALTH_INTERVAL_S": "1"}
        yield [stack.enter_context(gateway(extra=extra, env=env)) for _ in range(count)]


@dataclass
class TeamResult:
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    input_tokens: int = 0
    cache_read_tokens: int = 0
    later_input_tokens: int = 0
    """Prompt tokens of turns 2 and later: what placement decides (a first turn's cache hits depend on
    which sessions' first turns happened to finish before it started)."""
    later_cache_read_tokens: int = 0

    @property
    def later_cached_share(self) -> float:
        return self.later_cache_read_tokens / self.later_input_tokens if self.later_input_tokens else 0.0


async def run_team(
    urls: Sequence[str],
    *,
    sessions: int,
    turns: int,
    concurrency: int | None = None,
    tag: str = "s",
    file_lines: int = 300,
) -> TeamResult:
    """`sessions` conversations of `turns` turns each, all at once (at most `concurrency` turns in flight);
    turn t of session s goes through replica (s + t) % len(urls), so no two turns in a row share a replica.

    Like Claude Code, each turn sends the whole conversation so far with the node's own earlier answers
    in it, plus a new prompt carrying a file of `file_lines` lines (what a Read tool result adds)."""
    clients = [anthropic.AsyncAnthropic(base_url=u, api_key="team", max_retries=0, timeout=120) for u in urls]
    gate = asyncio.Semaphore(concurrency or sessions)
    result = TeamResult()

    async def session(s: int) -> None:
        sid = f"{tag}-{s:03d}-0000-4000-8000-000000000000"
        body = claude_code_request(sid, 1, max_tokens=64)
        history: list[dict[str, object]] = []
        for t in range(1, turns + 1):
            add_turn(history, sid, t, file_lines)
            body["messages"] = history
            client = clients[(s + t) % len(clients)]
            async with gate:
                try:
                    async with client.messages.stream(**sdk_kwargs(body, sid)) as stream:
                        final = await stream.get_final_message()
                    history.append(
                        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in final.content]}
                    )
                    prompt = final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0)
                    cached = final.usage.cache_read_input_tokens or 0
                    result.input_tokens += prompt
                    result.cache_read_tokens += cached
                    if t > 1:
                        result.later_input_tokens += prompt
                        result.later_cache_read_tokens += cached
                except anthropic.APIError as exc:
                    result.errors.append(f"{sid} turn {t}: {exc}")
                    history.append({"role": "assistant", "content": "(interrupted)"})
                result.requests += 1

    started = time.monotonic()
    try:
        await asyncio.gather(*(session(s) for s in range(sessions)))
    finally:
        for c in clients:
            await c.close()
    result.seconds = time.monotonic() - started
    return result


def add_turn(history: list[Any], session: str, turn: int, file_lines: int) -> None:
    """Turn `turn` of a Claude-Code-shaped conversation: the user's message with a file it read, and on the
    second turn a mid-conversation system reminder, as Claude Code sends."""
    history.append(_user_turn(session, turn, file_lines))
    if turn == 2:
        history.append({"role": "system", "content": "<system-reminder>Files changed on disk.</system-reminder>"})


def _user_turn(session: str, turn: int, file_lines: int) -> dict[str, object]:
    lines = "\n".join(f"{n:>6}\t{_filler(f'{session}/{turn}/{n}', 8)}" for n in range(1, file_lines + 1))
    prompt = f"Turn {turn}: {_filler(f'{session}/prompt/{turn}', 25)}\n<file path='src/mod{turn}.py'>\n{lines}\n</file>"
    return {"role": "user", "content": [{"type": "text", "text": prompt}]}


@dataclass
class NodeReport:
    prompt_tokens: int
    cached_tokens: int
    nodes_per_session: dict[str, set[str]]
    requests_per_node: dict[str, int]

    @property
    def cached_share(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def sessions_split(self) -> list[str]:
        """Sessions whose turns were served by more than one node."""
        return sorted(s for s, nodes in self.nodes_per_session.items() if len(nodes) > 1)


def node_report(nodes: Sequence[Proc]) -> NodeReport:
    """Totals from the nodes' own `/_sim/stats` (the gateway forwards the session as `x-session-id`)."""
    prompt = cached = 0
    where: dict[str, set[str]] = {}
    per_node: dict[str, int] = {}
    for node in nodes:
        stats = httpx.get(node.url + "/_sim/stats", timeout=10).json()
        prompt += stats["prompt_tokens"]
        cached += stats["cached_tokens"]
        per_node[stats["id"]] = stats["completed"]
        for session in stats["per_conversation"]:
            where.setdefault(session, set()).add(stats["id"])
    return NodeReport(prompt, cached, where, per_node)


def reset_nodes(nodes: Sequence[Proc]) -> None:
    for node in nodes:
        httpx.post(node.url + "/_sim/reset", timeout=10).raise_for_status()
