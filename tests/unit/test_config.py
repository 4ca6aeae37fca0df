from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from proxy.config import ConfigError, load_settings, parse_node, redact_credentials, redact_url
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
    with pytest.raises(ConfigError, match="stream_deadline_s must not be negative"):
        load_settings(env={"MLXMUX_STREAM_DEADLINE_S": "-1"})


@pytest.mark.parametrize("port", ["0", "99999", "-1"])
def test_a_port_out_of_range_stops_the_gateway(port: str) -> None:
    with pytest.raises(ConfigError, match=r"server\.port must be 1\.\.65535"):
        load_settings(env={"MLXMUX_PORT": port})


def test_bare_mlxmux_prints_help_and_version_prints_the_version(capsys: pytest.CaptureFixture[str]) -> None:
    from proxy.cli import main

    assert main([]) == 0
    assert "serve" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("mlxmux ")
