from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from proxy.config import ConfigError, Settings, load_settings, parse_node, redact_credentials, redact_url
from tests.procs import ROOT


@pytest.mark.parametrize(
    ("spec", "node_id", "url"),
    [
        ("http://mac1:8080", "mac1:8080", "http://mac1:8080"),
        ("mac1=http://mac1:8080", "mac1", "http://mac1:8080"),
        ("http://mac1:8080/v1/", "mac1:8080", "http://mac1:8080"),
        ("http://studio.local", "studio.local:80", "http://studio.local"),
    ],
)
def test_node_specs(spec: str, node_id: str, url: str) -> None:
    (node,) = load_settings(nodes=[spec], env={}).nodes
    assert (node.id, node.url) == (node_id, url)


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "mlxmux.toml"
    cfg.write_text('[server]\nport = 1111\nhost = "0.0.0.0"\n[routing]\nstrategy = "least-loaded"\n')
    s = load_settings(
        config_file=str(cfg), env={"MLXMUX_PORT": "2222"}, overrides={("routing", "strategy"): "round-robin"}
    )
    assert s.server.port == 2222
    assert s.server.host == "0.0.0.0"
    assert s.routing.strategy == "round-robin"


def test_nodes_from_env_and_model_map(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[models]\n"claude-*haiku*" = "small"\n')
    s = load_settings(config_file=str(cfg), env={"MLXMUX_NODES": "a=http://a:1, http://b:2"})
    assert [n.id for n in s.nodes] == ["a", "b:2"]
    assert s.pool_for("claude-haiku-4-5-20251001") == "small"
    assert s.pool_for("claude-opus-4-8") == "default"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[routing]\nstrategyy = 'x'\n", "strategyy"),
        ("[server]\nport = 'abc'\n", "$.server.port"),
        ("[routing]\nstrategy = 'fastest'\n", "$.routing.strategy"),
        ("[[nodes]]\nurl = 'ftp://x'\n", "ftp://x"),
        ("[[nodes]]\nid = 'a'\n", "url"),
        ("not toml = = =\n", "c.toml"),
    ],
)
def test_bad_config_names_the_problem(tmp_path: Path, text: str, needle: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=str(cfg), env={})
    assert needle in str(info.value)


def test_duplicate_ids_rejected() -> None:
    with pytest.raises(ConfigError, match="share the id"):
        load_settings(nodes=["a=http://x:1", "a=http://y:2"], env={})


def test_parse_node_keeps_urls_with_equals_in_query() -> None:
    assert parse_node("http://h:1/?a=b").url == "http://h:1/?a=b"


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "--config", "/nonexistent/mlxmux.toml"],
        ["serve", "--node", "not a url"],
        ["serve", "--port", "99999"],
        ["serve", "--node", "http://mac1:0"],
    ],
)
def test_cli_bad_config_is_one_line_exit_2(args: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "proxy.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mlxmux: error:"), proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://mac1.local:8080", "http://mac1.local:8080"),
        ("http://user:secret@mac1.local:8080/v1", "http://***@mac1.local:8080/v1"),
        ("https://token@gpu-box", "https://***@gpu-box"),
    ],
)
def test_node_url_credentials_are_redacted(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("node n failed: http://user:secret@mac1:8080/v1 refused", "node n failed: http://***@mac1:8080/v1 refused"),
        ("'http://u:p@ss@h:1' and mail x@y", "'http://***@h:1' and mail x@y"),  # a raw @ inside the password
        ('{"url":"http://u:p@h:1","x":"a@b"}', '{"url":"http://***@h:1","x":"a@b"}'),  # JSON stays JSON
        ("https://h/p@q and a@b, no credentials", "https://h/p@q and a@b, no credentials"),
        ("http://a:b@h and https://c@k", "http://***@h and https://***@k"),
    ],
)
def test_credentials_in_any_text_are_redacted(text: str, shown: str) -> None:
    assert redact_credentials(text) == shown


def test_stream_deadline_from_env_and_checked() -> None:
    assert load_settings(env={}).timeouts.stream_deadline_s == 1800
    assert load_settings(env={"MLXMUX_STREAM_DEADLINE_S": "2.5"}).timeouts.stream_deadline_s == 2.5
    assert load_settings(env={"MLXMUX_STREAM_DEADLINE_S": "0"}).timeouts.stream_deadline_s == 0  # 0 = no deadline
    with pytest.raises(ConfigError, match=r"timeouts\.stream_deadline_s must be >= 0, not -1"):
        load_settings(env={"MLXMUX_STREAM_DEADLINE_S": "-1"})


@pytest.mark.parametrize(
    ("env", "line"),
    [
        ({"MLXMUX_PORT": "99999"}, "server.port must be 1..65535, not 99999 (MLXMUX_PORT)"),
        ({"MLXMUX_PORT": "0"}, "server.port must be 1..65535, not 0 (MLXMUX_PORT)"),
        ({"MLXMUX_PORT": "-1"}, "server.port must be 1..65535, not -1 (MLXMUX_PORT)"),
        ({"MLXMUX_HEALTH_INTERVAL_S": "0"}, "health.interval_s must be >= 0.1, not 0 (MLXMUX_HEALTH_INTERVAL_S)"),
        ({"MLXMUX_SESSION_TTL_S": "-5"}, "routing.session_ttl_s must be > 0, not -5 (MLXMUX_SESSION_TTL_S)"),
        ({"MLXMUX_CONNECT_TIMEOUT_S": "-1"}, "timeouts.connect_s must be > 0, not -1 (MLXMUX_CONNECT_TIMEOUT_S)"),
        ({"MLXMUX_MAX_ATTEMPTS": "0"}, "routing.max_attempts must be >= 1, not 0 (MLXMUX_MAX_ATTEMPTS)"),
        ({"MLXMUX_DISCOVERY_PORT": "70000"}, "discovery.port must be 1..65535, not 70000 (MLXMUX_DISCOVERY_PORT)"),
        ({"MLXMUX_PORT": "abc"}, "configuration: Expected `int`, got `str` - at `$.server.port` (MLXMUX_PORT)"),
    ],
)
def test_a_setting_out_of_range_is_one_line_naming_it(env: dict[str, str], line: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env=env)
    assert str(info.value) == line


def _numeric_fields(kind: Any, path: str) -> list[tuple[str, Any]]:
    """(config path, msgspec type info) of every number in the configuration, nodes included."""
    found = []
    for f in kind.fields:
        inner = f.type
        if isinstance(inner, msgspec.inspect.ListType):
            inner = inner.item_type
            name = f"{path}{f.name}[0]"
        else:
            name = f"{path}{f.name}"
        if isinstance(inner, msgspec.inspect.StructType):
            found += _numeric_fields(inner, name + ".")
        elif isinstance(inner, msgspec.inspect.IntType | msgspec.inspect.FloatType):
            found.append((name, inner))
    return found


NUMERIC = _numeric_fields(msgspec.inspect.type_info(Settings), "")


def test_every_numeric_setting_has_a_range() -> None:
    """A new number in the configuration without a range fails here: give it one (proxy/config.py)."""
    assert len(NUMERIC) > 40
    unbounded = [name for name, kind in NUMERIC if kind.ge is None and kind.gt is None]
    assert unbounded == []


@pytest.mark.parametrize(("path", "kind"), NUMERIC, ids=[name for name, _ in NUMERIC])
def test_every_numeric_setting_refuses_a_value_below_its_range(tmp_path: Path, path: str, kind: Any) -> None:
    bad = (kind.ge - 1 if kind.ge is not None else kind.gt) if isinstance(kind, msgspec.inspect.IntType) else -1.5
    if isinstance(kind, msgspec.inspect.FloatType) and kind.ge is not None and kind.ge > 0:
        bad = 0
    *sections, key = path.split(".")
    lines = []
    if sections and sections[0] == "nodes[0]":
        lines += ["[[nodes]]", 'url = "http://mac1:8080"', 'id = "mac1"']
        name = f"node 'mac1': {key}"
    else:
        if sections:
            lines.append(f"[{'.'.join(sections)}]")
        if sections == ["discovery"]:
            lines += ['mode = "dns"', 'dns_name = "nodes.local"']
        name = path
    lines.append(f"{key} = {bad}")
    cfg = tmp_path / "c.toml"
    cfg.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as info:
        load_settings(config_file=str(cfg), env={})
    assert str(info.value).startswith(f"{name} must be "), str(info.value)
    assert f", not {bad}" in str(info.value)


@pytest.mark.parametrize(
    "env",
    [{"MLXMUX_HEALTH_INTERVAL_S": "0"}, {"MLXMUX_SESSION_TTL_S": "-1"}, {"MLXMUX_CONNECT_TIMEOUT_S": "-3"}],
)
def test_cli_bad_variable_is_one_line_exit_2(env: dict[str, str]) -> None:
    (name,) = env
    proc = subprocess.run(
        [sys.executable, "-m", "proxy.cli", "serve", "--node", "http://127.0.0.1:9"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **env},
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and name in proc.stderr, proc.stderr


def test_bare_mlxmux_prints_help_and_version_prints_the_version(capsys: pytest.CaptureFixture[str]) -> None:
    from proxy.cli import main

    assert main([]) == 0
    assert "serve" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("mlxmux ")
