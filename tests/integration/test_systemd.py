"""The systemd units in deploy/systemd: checked by `systemd-analyze verify` where it is installed, parsed
everywhere, and the commands they run run here: the sim node's and the gateway's, with the settings of the
shipped EnvironmentFile (nodes and Redis pointed at this test's own)."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import anthropic
import httpx
import pytest

from proxy.config import load_settings
from proxy.environment import unknown_variables
from tests.procs import ROOT, Proc, free_port, wait_http_ok

UNITS = ROOT / "deploy" / "systemd"
GATEWAY = UNITS / "mlxmux@.service"
SIM = UNITS / "mlxmux-sim@.service"
ENV_FILE = UNITS / "mlxmux.env"
INSTALLED = "/opt/mlxmux/bin/mlxmux"
"""Where docs/operations.md installs mlxmux (a venv), and so where the units run it from."""


def read_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Section -> (key, value) in order, as systemd reads a unit file (comments, repeated keys, continuations)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    text = path.read_text().replace("\\\n", " ")
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not key=value: {raw!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines as systemd's EnvironmentFile= reads them (comments and blank lines skipped)."""
    env = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and line[0] not in "#;":
            key, sep, value = line.partition("=")
            assert sep and key == key.strip() and key.isidentifier(), raw
            env[key] = value.strip()
    return env


def command(unit: dict[str, list[tuple[str, str]]], instance: str, env: dict[str, str]) -> list[str]:
    """The unit's ExecStart for an instance, as systemd would run it: %i expanded, $VAR split into words, the
    installed mlxmux replaced by this checkout's."""
    (exec_start,) = values(unit, "Service", "ExecStart")
    words = shlex.split(exec_start.replace("%i", instance))
    expanded: list[str] = []
    for word in words:
        expanded += env.get(word[1:], "").split() if word.startswith("$") else [word]
    assert expanded[0] == INSTALLED
    return [sys.executable, "-m", "proxy.cli", *expanded[1:]]


def unit_environment(unit: dict[str, list[tuple[str, str]]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for assignment in values(unit, "Service", "Environment"):
        key, _, value = assignment.partition("=")
        env[key] = value
    return env


def test_the_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    binary = shutil.which("systemd-analyze")
    if binary is None:
        pytest.skip("systemd-analyze is not installed: the units are only parsed (the other tests here)")
    # verify checks that ExecStart's program exists: point it at one that does, change nothing else.
    for unit in (GATEWAY, SIM):
        (tmp_path / unit.name).write_text(unit.read_text().replace(INSTALLED, sys.executable))
    done = subprocess.run(
        [binary, "verify", str(tmp_path / "mlxmux@8421.service"), str(tmp_path / "mlxmux-sim@8081.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and not done.stderr.strip() and not done.stdout.strip(), done.stderr + done.stdout


def test_the_gateway_unit_stops_gracefully_and_does_not_loop_on_a_bad_setting() -> None:
    unit = read_unit(GATEWAY)
    assert values(unit, "Service", "EnvironmentFile") == ["/etc/mlxmux/mlxmux.env", "-/etc/mlxmux/mlxmux-%i.env"]
    assert command(unit, "8421", {})[3:] == ["serve", "--port", "8421"]
    assert values(unit, "Service", "RestartPreventExitStatus") == ["2"]  # a config error exits 2
    assert values(unit, "Service", "KillSignal") == ["SIGTERM"]
    grace = load_settings(env={}).server.shutdown_grace_s
    (stop,) = values(unit, "Service", "TimeoutStopSec")
    assert int(stop) > grace  # systemd must not SIGKILL streams the replica is still letting finish
    assert values(unit, "Install", "WantedBy") == ["multi-user.target"]


def test_the_environment_file_is_a_valid_configuration() -> None:
    env = read_env_file(ENV_FILE)
    assert unknown_variables(env) == []
    settings = load_settings(env=env)
    assert [n.id for n in settings.nodes] == ["sim1", "sim2"]
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert "MLXMUX_PORT" not in env  # the instance name is the port


@pytest.mark.redis
def test_what_the_units_run_serves_claude_code(redis_url: str) -> None:
    sim_unit, gateway_unit = read_unit(SIM), read_unit(GATEWAY)
    sim_port, gateway_port = free_port(), free_port()
    env = read_env_file(ENV_FILE)
    env["MLXMUX_NODES"] = f"sim1=http://127.0.0.1:{sim_port}"  # the file's nodes, moved to a free port
    env["MLXMUX_REDIS_URL"] = redis_url
    env["MLXMUX_KEY_PREFIX"] = f"systemd-{gateway_port}:"
    sim_cmd = command(sim_unit, str(sim_port), unit_environment(sim_unit))
    with Proc(sim_cmd, port=sim_port, env=unit_environment(sim_unit), name="sim-unit") as sim:
        sim.wait_ready()
        gateway_cmd = command(gateway_unit, str(gateway_port), env)
        with Proc(gateway_cmd, port=gateway_port, env={**unit_environment(gateway_unit), **env}, name="gw") as gw:
            gw.wait_ready()
            wait_http_ok(gw.url + "/ready")
            ready = httpx.get(gw.url + "/ready", timeout=5).json()
            assert (ready["mode"], ready["problems"]) == ("shared", [])
            with anthropic.Anthropic(base_url=gw.url, api_key="any", max_retries=0, timeout=30) as client:
                answer = client.messages.create(
                    model="claude-opus-4-8", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
                )
            assert answer.content[0].type == "text" and f"sim-{sim_port}" in answer.content[0].text
            assert "WARNING" not in gw.output(), gw.output()  # no misspelled variable, no empty pool
