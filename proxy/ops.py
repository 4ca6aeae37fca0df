"""Operator commands: `mlxmux status` and `mlxmux nodes …`, talking to a running gateway over HTTP.

Every failure is one line on stderr (`mlxmux: error: …`) and exit status 1; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import msgspec

from proxy.config import redact_url
from proxy.pools import without_node_id
from state.health import cluster_status

DEFAULT_URL = "http://127.0.0.1:8420"


class OpsError(Exception):
    pass


def _at_least(low: float, kind: type[int] | type[float]) -> Callable[[str], float]:
    """An argparse type: a number >= `low` (> 0 for floats when low is 0), else a usage error naming it."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value < low or (kind is float and low == 0 and value <= 0):
            raise argparse.ArgumentTypeError(f"must be {'> 0' if kind is float and low == 0 else f'>= {low}'}")
        return value

    return parse


def add_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=None, help=f"a gateway (MLXMUX_URL, default {DEFAULT_URL})")
    common.add_argument("--token", default=None, help="admin token (MLXMUX_ADMIN_TOKEN)")
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--redis", metavar="URL", help="read the shared state from Redis instead of a gateway")
    shared.add_argument("--key-prefix", default="mlxmux:", help="with --redis: the key prefix (default mlxmux:)")

    p = sub.add_parser("status", parents=[common, shared], help="the cluster as a gateway (or Redis) sees it")
    p.add_argument("--json", action="store_true", help="print GET /cluster as JSON")
    p.add_argument(
        "--watch", nargs="?", const=2.0, type=_at_least(0, float), metavar="SECONDS", help="refresh (default every 2 s)"
    )

    s = sub.add_parser("sessions", parents=[common, shared], help="which session is bound to which node")
    s.add_argument(
        "--limit", type=_at_least(1, int), default=1000, help="show at most this many sessions (default 1000)"
    )
    s.add_argument("--json", action="store_true", help="print the bindings as JSON")

    n = sub.add_parser("nodes", parents=[common], help="list, add, remove, drain and undrain nodes on every replica")
    actions = n.add_subparsers(dest="action", metavar="ACTION")
    actions.add_parser("list", parents=[common], help="the nodes (default)")
    add = actions.add_parser("add", parents=[common], help="add a node: mlxmux nodes add [ID=]URL")
    add.add_argument("spec", metavar="[ID=]URL", help="the node's URL, e.g. mac3=http://mac3.local:8080")
    add.add_argument("--model", help="model id the node serves (default: none sent, the node uses its own)")
    add.add_argument("--pool", help="pool (default: default)")
    add.add_argument(
        "--protocol",
        choices=["openai", "anthropic"],
        help="openai: chat completions, translated (mlx_lm.server; default); anthropic: native /v1/messages",
    )
    add.add_argument(
        "--max-concurrency",
        type=_at_least(1, int),
        help="in-flight requests at which the node counts as fully loaded (default 4)",
    )
    add.add_argument(
        "--cache-slots",
        type=_at_least(1, int),
        help="entries its prompt cache holds: mlx_lm.server --prompt-cache-size (default 10)",
    )
    for name, text in (
        ("remove", "remove a node (its sessions move)"),
        ("drain", "stop sending new work to a node"),
        ("undrain", "end a drain"),
    ):
        a = actions.add_parser(name, parents=[common], help=text)
        a.add_argument("node_id", metavar="ID", help="the node's id, as `mlxmux nodes list` shows it")


def run(args: argparse.Namespace) -> int:
    try:
        if args.command == "status":
            return _status(args)
        if args.command == "sessions":
            return _sessions(args)
        return _nodes(args)
    except OpsError as exc:
        print(f"mlxmux: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _client(args: argparse.Namespace) -> tuple[httpx.Client, str]:
    url = (args.url or os.environ.get("MLXMUX_URL") or DEFAULT_URL).rstrip("/")
    token = args.token or os.environ.get("MLXMUX_ADMIN_TOKEN")
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=url, headers=headers, timeout=10), url


def _call(client: httpx.Client, url: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    try:
        r = client.request(method, path, json=body)
    except httpx.HTTPError as exc:
        raise OpsError(f"cannot reach the gateway at {url}: {exc}") from None
    try:
        data = r.json()
    except ValueError:
        raise OpsError(f"{url}{path} answered {r.status_code} with something that is not JSON") from None
    if r.status_code >= 400:
        message = data.get("error", {}).get("message") if isinstance(data, dict) else None
        raise OpsError(f"{method} {path}: {r.status_code} {message or data}")
    return data


def _status(args: argparse.Namespace) -> int:
    client, url = _client(args)
    source = args.redis or url
    with client:
        while True:
            view = redis_view(args.redis, args.key_prefix) if args.redis else _call(client, url, "GET", "/cluster")
            if args.json:
                print(json.dumps(view, indent=2))
            else:
                if args.watch:
                    print("\033[2J\033[H", end="")
                print(render_status(view, source))
            if not args.watch:
                return 0
            time.sleep(args.watch)


def render_status(view: dict[str, Any], url: str) -> str:
    """The status table, pure."""
    store = view.get("store", "?")
    reachable = "" if view.get("store_reachable", True) else " (unreachable: routing locally)"
    lines = [
        f"cluster {view.get('status', '?')} · {plural(len(view.get('nodes', [])), 'node')}"
        f" · strategy {view.get('strategy', '?')} · store {store}{reachable} · via {url}",
        "",
    ]
    header: tuple[str, ...] = ("NODE", "STATE", "IN-FLIGHT", "TTFT p50", "CACHED", "PREDICTED", "MISSES", "ENTRIES")
    header += ("SESSIONS", "OK/ERR", "URL")
    rows = [header]
    for n in view.get("nodes", []):
        stats = n.get("stats") or {}
        ttft = stats.get("ttft_p50_ms")
        prompt = stats.get("prompt_tokens") or 0
        cached = f"{(stats.get('cached_tokens') or 0) / prompt:.0%}" if prompt else "-"
        state = str(n.get("state", "?")) + (" (draining)" if n.get("draining") else "")
        if n.get("breaker") not in (None, "closed"):
            state += f" [{n['breaker']}]"
        rows.append(
            (
                str(n.get("id")),
                state,
                f"{n.get('inflight', '-')}/{n.get('max_concurrency', '-')}",
                f"{ttft:.0f} ms" if isinstance(ttft, int | float) else "-",
                cached,
                *_belief_cells(n.get("cache") or {}),
                str(n.get("sessions", "-")),
                f"{stats.get('ok', 0)}/{stats.get('errors', 0)}",
                str(n.get("url")),
            )
        )
    lines += _table(rows)
    nodes = view.get("nodes", [])
    errors = [f"  {n['id']}: {without_node_id(n['id'], n['last_error'])}" for n in nodes if n.get("last_error")]
    if errors:
        lines += ["", "last errors:", *errors]
    problems = view.get("problems") or []
    if problems:
        lines += ["", "problems:", *(f"  {p}" for p in problems)]
    lines += _inflight_lines(view.get("nodes", []))
    return "\n".join(lines)


def plural(count: int, word: str) -> str:
    """`1 node`, `2 nodes`, `no nodes`."""
    if count == 0:
        return f"no {word}s"
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def _inflight_lines(nodes: Sequence[dict[str, Any]]) -> list[str]:
    """The requests in flight that have run for a second or more, per node: session (hashed), phase, age."""
    rows: list[tuple[str, ...]] = []
    for n in nodes:
        for r in n.get("requests") or []:
            phase, done, total = r.get("phase"), r.get("done", 0), r.get("total", 0)
            if phase == "prefill" and total:
                doing = f"prefill {done}/{total} tokens ({done / total:.0%})"
            elif phase == "generating":
                doing = f"generating, {done} tokens so far"
            else:
                doing = "queued (nothing from the node yet)"
            joined = r.get("joined") or 0
            rows.append(
                (
                    f"  {n.get('id')}",
                    r.get("session") or "-",
                    doing,
                    f"{(r.get('age_ms') or 0) / 1000:.0f} s",
                    f"+{joined} joined" if joined else "",
                )
            )
    if not rows:
        return []
    return [
        "",
        "in flight (requests older than a second):",
        *_table([("  NODE", "SESSION", "DOING", "AGE", ""), *rows]),
    ]


def _belief_cells(cache: dict[str, Any]) -> tuple[str, str, str]:
    """PREDICTED (the cached share the router expected), MISSES (answers where the node had evicted what the
    router believed it held) and ENTRIES (believed entries / capacity) of one node."""
    predicted = cache.get("predicted_share")
    reports, misses = cache.get("reports") or 0, cache.get("misses") or 0
    slots = cache.get("cache_slots")
    capacity = cache.get("capacity") or slots
    entries = f"{cache.get('entries', 0)}/{capacity}" if capacity else str(cache.get("entries", "-"))
    return (
        f"{predicted:.0%}" if isinstance(predicted, int | float) else "-",
        f"{misses}/{reports}" if reports else "-",
        entries if cache else "-",
    )


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Rows as left-aligned columns two spaces apart (the first row is the header)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _nodes(args: argparse.Namespace) -> int:
    client, url = _client(args)
    action = args.action or "list"
    with client:
        if action == "list":
            print(render_status(_call(client, url, "GET", "/cluster"), url))
            return 0
        if action == "add":
            node_id, sep, node_url = args.spec.partition("=")
            if not sep or "://" in node_id:
                node_id, node_url = "", args.spec
            body: dict[str, Any] = {"url": node_url, "id": node_id}
            for key in ("model", "pool", "protocol", "max_concurrency", "cache_slots"):
                if getattr(args, key) is not None:
                    body[key] = getattr(args, key)
            data = _call(client, url, "POST", "/admin/nodes", body)
            print(f"added {data['added']} ({data['url']}) on every replica; it takes traffic once a probe passes")
        elif action == "remove":
            data = _call(client, url, "DELETE", f"/admin/nodes/{args.node_id}")
            print(f"removed {args.node_id} on every replica; its sessions move at their next turn")
        else:
            data = _call(client, url, "POST", f"/admin/nodes/{args.node_id}/{action}")
            done = "draining: no new requests, in-flight ones finish" if data["draining"] else "taking requests again"
            print(f"{args.node_id}: {done} (state {data['state']})")
        if data.get("shared") is False:
            print(
                f"note: {url} cannot reach the shared store: the change applies on that replica now and on the others"
                " once the store is back (that replica writes it then)"
            )
    return 0


def _sessions(args: argparse.Namespace) -> int:
    if args.redis:
        bindings = redis_sessions(args.redis, args.key_prefix, args.limit)
    else:
        client, url = _client(args)
        with client:
            bindings = _call(client, url, "GET", f"/admin/sessions?limit={args.limit}")
    if args.json:
        print(json.dumps(bindings, indent=2))
        return 0
    print(render_sessions(bindings))
    return 0


def render_sessions(bindings: Sequence[dict[str, Any]]) -> str:
    """The sessions table and the count per node, pure."""
    if not bindings:
        return "no sessions bound"
    rows = [("SESSION", "POOL", "NODE", "EXPIRES IN")]
    rows += [(b["session"], b["pool"], b["node_id"], f"{b['ttl_ms'] / 1000:.0f} s") for b in bindings]
    per_node: dict[str, int] = {}
    for b in bindings:
        per_node[b["node_id"]] = per_node.get(b["node_id"], 0) + 1
    counts = ", ".join(f"{n} {c}" for n, c in sorted(per_node.items()))
    return "\n".join(_table(rows)) + f"\n\n{plural(len(bindings), 'session')} bound: {counts}"


def redis_sessions(url: str, prefix: str, limit: int) -> list[dict[str, Any]]:
    """Live session bindings as the shared state in Redis records them (what GET /admin/sessions answers)."""
    import asyncio

    from state import open_store
    from state.errors import StateUnavailable

    async def read() -> list[dict[str, Any]]:
        store = open_store(url, prefix=prefix)
        try:
            return [msgspec.to_builtins(b) for b in await store.sessions(limit)]
        except StateUnavailable as exc:
            raise OpsError(f"cannot read Redis at {url}: {exc}") from None
        finally:
            await store.close()

    try:
        return asyncio.run(read())
    except ValueError as exc:  # a malformed URL
        raise OpsError(f"bad Redis URL {url!r}: {exc}") from None


def redis_view(url: str, prefix: str) -> dict[str, Any]:
    """The cluster as the shared state in Redis records it (nodes known from their health records)."""
    import asyncio

    from state import open_store
    from state.cache_model import belief_view
    from state.errors import StateUnavailable

    shown = redact_url(url.partition("?")[0])  # never the password (nor a sentinel_password in the query)

    async def read() -> dict[str, Any]:
        try:
            store = open_store(url, prefix=prefix)
        except ValueError as exc:
            raise OpsError(f"redis url {shown!r}: {exc}") from None
        try:
            health = await store.health()
            ids = sorted(health)
            views = {v.node_id: v for v in await store.node_views(ids)}
        except StateUnavailable as exc:
            raise OpsError(f"cannot read Redis at {shown}: {exc}") from None
        finally:
            await store.close()
        nodes = []
        for node_id in ids:
            record, view = health[node_id], views[node_id]
            nodes.append(
                {
                    "id": node_id,
                    "url": "",
                    "state": str(record.state),
                    "draining": record.draining,
                    "breaker": str(record.breaker),
                    "last_error": record.last_error,
                    "inflight": view.inflight,
                    "sessions": view.sessions,
                    "stats": msgspec.to_builtins(view.stats),
                    "cache": belief_view(view.cache, None),
                    "requests": [msgspec.to_builtins(r) for r in view.requests],
                }
            )
        status = cluster_status(list(health.values()))
        return {"status": status, "strategy": "-", "store": "shared", "nodes": nodes}

    try:
        return asyncio.run(read())
    except ValueError as exc:  # a malformed URL
        raise OpsError(f"bad Redis URL {url!r}: {exc}") from None
