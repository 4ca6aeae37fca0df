"""The command line: every subcommand and option explains itself; tables count in words a person reads."""

from __future__ import annotations

import argparse

import pytest

from proxy.cli import build_parser, main
from proxy.demo import _parser as demo_parser
from proxy.demo import announcement
from proxy.ops import plural, render_sessions, render_status
from proxy.sim.cli import _parser as sim_parser


def _parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    """Every parser under `mlxmux`, by command line, plus sim-node's and demo's own."""
    found = []

    def walk(name: str, parser: argparse.ArgumentParser) -> None:
        found.append((name, parser))
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, child in action.choices.items():
                    walk(f"{name} {sub}", child)

    walk("mlxmux", build_parser())  # sim-node and demo are placeholders there: their own parsers follow
    return [*found, ("mlxmux sim-node (its own)", sim_parser()), ("mlxmux demo (its own)", demo_parser())]


PARSERS = _parsers()


@pytest.mark.parametrize(("name", "parser"), PARSERS, ids=[n for n, _ in PARSERS])
def test_every_option_and_subcommand_has_a_help_line(name: str, parser: argparse.ArgumentParser) -> None:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            missing += [f"{name} {c.dest}" for c in action._choices_actions if not c.help]
        elif not action.help or action.help == argparse.SUPPRESS:
            missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == []


def test_the_commands_an_operator_looks_for_are_there() -> None:
    names = {n for n, _ in PARSERS}
    assert {"mlxmux status", "mlxmux sessions", "mlxmux nodes add", "mlxmux serve"} <= names
    options = {o for _, p in PARSERS for a in p._actions for o in a.option_strings}
    assert {"--limit", "--json", "--protocol", "--max-concurrency", "--cache-slots", "--log-level"} <= options


def test_sessions_takes_redis_like_status() -> None:
    args = build_parser().parse_args(["sessions", "--redis", "redis://h:1/0", "--key-prefix", "x:"])
    assert (args.redis, args.key_prefix, args.limit) == ("redis://h:1/0", "x:", 1000)


@pytest.mark.parametrize(
    "argv",
    [["status", "--watch", "0"], ["sessions", "--limit", "0"], ["nodes", "add", "http://m:1", "--cache-slots", "0"]],
)
def test_numbers_out_of_range_are_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "must be" in capsys.readouterr().err


@pytest.mark.parametrize(("count", "text"), [(0, "no sessions"), (1, "1 session"), (2, "2 sessions")])
def test_plural(count: int, text: str) -> None:
    assert plural(count, "session") == text


def test_sessions_table_counts_in_words() -> None:
    assert render_sessions([]) == "no sessions bound"
    one = render_sessions([{"session": "s1", "pool": "default", "node_id": "mac1", "ttl_ms": 1_799_000}])
    assert one.endswith("\n\n1 session bound: mac1 1"), one


def test_status_header_names_cluster_strategy_and_store_and_problems() -> None:
    view = {
        "status": "healthy",
        "strategy": "cache-aware",
        "store": "memory",
        "nodes": [{"id": "mac1", "state": "healthy", "url": "http://mac1:8080"}],
        "problems": ["pool 'small' has no nodes, but the model map sends claude-*haiku* there: …"],
    }
    text = render_status(view, "http://gw:8420")
    assert text.splitlines()[0] == "cluster healthy · 1 node · strategy cache-aware · store memory · via http://gw:8420"
    assert text.endswith("problems:\n  pool 'small' has no nodes, but the model map sends claude-*haiku* there: …")


@pytest.mark.parametrize(
    ("ports", "words"),
    [([8431], "gateway on http://127.0.0.1:8420, 1 sim node on port 8431 "),
     ([8431, 8432, 8433], "gateway on http://127.0.0.1:8420, 3 sim nodes on ports 8431-8433 ")],
)  # fmt: skip
def test_the_demo_counts_its_nodes_in_words(ports: list[int], words: str) -> None:
    text = announcement("http://127.0.0.1:8420", ports)
    assert text.startswith(f"mlxmux demo: {words}")
    assert "ANTHROPIC_BASE_URL=http://127.0.0.1:8420 ANTHROPIC_AUTH_TOKEN=mlxmux" in text
