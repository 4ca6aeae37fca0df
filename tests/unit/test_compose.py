"""The shipped deployment files: docker-compose.yml, Dockerfile, .dockerignore, .env.example.

No Docker daemon is needed: the compose file is read as YAML (and checked by `docker compose config`
when a compose client is installed), the Dockerfile line by line, and the commands the containers run
are parsed by mlxmux's own command line.
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import load_settings
from tests.procs import ROOT

COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
SIMS = ("sim1", "sim2", "sim3")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


def _interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """`${VAR:-default}` as docker compose expands it, with `env` standing for the .env file."""
    env = env or {}
    return re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: env.get(m.group(1)) or m.group(2), value)


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per logical line, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (word.upper(), rest.strip())
        for word, _, rest in (line.partition(" ") for line in lines if line and not line.startswith("#"))
    ]


def _final_stage() -> list[tuple[str, str]]:
    steps = _dockerfile()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def test_services_and_profiles(services: dict[str, dict[str, Any]]) -> None:
    assert {"redis", "gateway", "lb", *SIMS} <= set(services)
    for name in ("redis", "gateway", "lb"):
        assert "profiles" not in services[name], f"{name} must start without a profile"
    for name in SIMS:
        assert services[name]["profiles"] == ["sim"]


def test_every_service_has_a_healthcheck(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"
    assert services["redis"]["healthcheck"]["test"][1:] == ["redis-cli", "ping"]
    assert "http://127.0.0.1:8420/health" in " ".join(services["gateway"]["healthcheck"]["test"])
    for name in SIMS:
        assert "http://127.0.0.1:8080/health" in " ".join(services[name]["healthcheck"]["test"])


def test_gateway_replicas_redis_and_nodes(services: dict[str, dict[str, Any]]) -> None:
    gateway = services["gateway"]
    assert gateway["build"] == "."
    assert _interpolate(str(gateway["deploy"]["replicas"])) == "3"
    assert _interpolate(str(gateway["deploy"]["replicas"]), {"MLXMUX_REPLICAS": "5"}) == "5"
    assert "container_name" not in gateway  # replicas cannot share a fixed name
    assert "ports" not in gateway  # only the load balancer is published
    env = {k: _interpolate(str(v)) for k, v in gateway["environment"].items()}
    assert env["MLXMUX_REDIS_URL"] == "redis://redis:6379/0"
    assert env["MLXMUX_HOST"] == "0.0.0.0"
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    # With MLXMUX_NODES unset the gateway uses the sim profile's nodes, by their service names.
    settings = load_settings(env=env, overrides={("server", "port"): 8420})
    assert [(n.id, n.url) for n in settings.nodes] == [(s, f"http://{s}:8080") for s in SIMS]
    assert settings.redis_url == "redis://redis:6379/0"
    # A value from .env replaces them.
    macs = "mac1=http://mac1.local:8080,mac2=http://mac2.local:8080"
    assert _interpolate(str(gateway["environment"]["MLXMUX_NODES"]), {"MLXMUX_NODES": macs}) == macs


def test_container_commands_are_valid_mlxmux_invocations(services: dict[str, dict[str, Any]]) -> None:
    from proxy.cli import _serve_parser
    from proxy.sim.cli import _parser as sim_parser

    parser = argparse.ArgumentParser(prog="mlxmux")
    _serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(services["gateway"]["command"])
    assert (args.command, args.host, args.port) == ("serve", "0.0.0.0", 8420)
    for name in SIMS:
        command = services[name]["command"]
        assert command[0] == "sim-node"
        sim = sim_parser().parse_args(command[1:])
        assert (sim.host, sim.port, sim.node_id) == ("0.0.0.0", 8080, name)
        assert services[name]["image"] == services["gateway"]["image"]  # the same image


def test_lb_publishes_one_port_and_mounts_the_haproxy_config(services: dict[str, dict[str, Any]]) -> None:
    lb = services["lb"]
    assert lb["image"].startswith("haproxy:")
    assert [_interpolate(p) for p in lb["ports"]] == ["8420:8420"]
    assert [_interpolate(p, {"MLXMUX_PORT": "9000"}) for p in lb["ports"]] == ["9000:8420"]
    assert "./deploy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in lb["volumes"]
    assert (ROOT / "deploy" / "haproxy.cfg").is_file()
    assert lb["environment"]["MLXMUX_GATEWAY_DNS"] == "gateway:8420"
    assert "gateway" in lb["depends_on"]
    assert [name for name, s in services.items() if s.get("ports")] == ["lb"]


def test_dockerfile_runs_mlxmux_as_non_root() -> None:
    steps = _dockerfile()
    assert all(args.startswith("python:3.11-slim") for word, args in steps if word == "FROM")
    final = _final_stage()
    users = [args for word, args in final if word == "USER"]
    assert users, "the final stage has no USER line: it would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    # The user is created in the image (a name must exist in /etc/passwd).
    assert any(word == "RUN" and re.search(rf"\buseradd\b.*\b{re.escape(user)}\b", args) for word, args in final)
    instructions = dict(final)
    assert instructions["EXPOSE"] == "8420"
    assert instructions["ENTRYPOINT"] == '["mlxmux"]'
    assert instructions["CMD"] == '["serve", "--host", "0.0.0.0"]'
    healthcheck = instructions["HEALTHCHECK"]
    assert "python" in healthcheck and "/health" in healthcheck and "curl" not in healthcheck
    assert any(word == "RUN" and "pip install --no-cache-dir" in args for word, args in steps)


def test_dockerignore_keeps_what_the_image_copies() -> None:
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()[:1] not in ("", "#")
    ]

    def ignored(path: str) -> bool:
        result = False
        for pattern in patterns:
            negate = pattern.startswith("!")
            pattern = pattern.lstrip("!").rstrip("/").removeprefix("**/")
            if fnmatch.fnmatch(path, pattern) or any(fnmatch.fnmatch(part, pattern) for part in path.split("/")):
                result = not negate
        return result

    sources = [
        src
        for word, args in _dockerfile()
        if word == "COPY" and not args.startswith("--from")
        for src in shlex.split(args)[:-1]
    ]
    assert sources
    for src in sources:
        assert (ROOT / src).exists(), f"the Dockerfile copies {src}, which does not exist"
        assert not ignored(src), f".dockerignore leaves {src} out of the build context"
    for path in (".git", ".env", "tests", ".venv", "proxy/__pycache__"):
        assert ignored(path), f".dockerignore should leave out {path}"


def test_env_example_names_only_values_the_compose_file_uses() -> None:
    text = (ROOT / ".env.example").read_text()
    names = set(re.findall(r"^#?\s*(MLXMUX_\w+)=", text, re.MULTILINE))
    used = set(re.findall(r"\$\{(\w+)", COMPOSE.read_text()))
    assert {"MLXMUX_NODES", "MLXMUX_PORT", "MLXMUX_REPLICAS"} <= names
    assert names <= used


def _compose_client() -> list[str] | None:
    if shutil.which("docker") is None:
        return None
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.parametrize("profile", [[], ["--profile", "sim"]], ids=["default", "sim"])
def test_docker_compose_config_accepts_the_file(profile: list[str], tmp_path: Path) -> None:
    client = _compose_client()
    if client is None:
        reason = "no docker CLI" if shutil.which("docker") is None else "docker CLI has no compose plugin"
        pytest.skip(f"{reason} (and no docker-compose): `docker compose config` not run")
    # `config` needs no daemon. An empty --env-file so a developer's own .env does not decide the result.
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    run = subprocess.run(
        [*client, "--env-file", str(env_file), "-f", str(COMPOSE), *profile, "config", "-q"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
