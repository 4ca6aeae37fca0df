"""The Kubernetes manifests (deploy/kubernetes/): every object valid against the Kubernetes schemas that the
kubernetes-validate package bundles (strict: an unknown field is an error), and every setting, port, path and
name in them one that mlxmux really reads: the ConfigMap's TOML and the environment load as the gateway loads
them, env names are `proxy.config.ENV_KEYS`, probe paths are routes of the app, the RBAC allows the request
kubernetes discovery makes. `kubectl kustomize` renders both kustomizations where kubectl is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from kubernetes_validate import utils as kubernetes_validate
from starlette.routing import Route

from proxy.app import build_app
from proxy.config import ENV_KEYS, DiscoveryConfig, Settings, load_settings
from proxy.discovery import KubernetesDiscovery
from state.redis_url import check_store_url
from tests.procs import ROOT

KUBE = ROOT / "deploy" / "kubernetes"
BASE, SIM = KUBE / "base", KUBE / "sim"
VERSIONS = ("1.27", kubernetes_validate.latest_version())
"""The oldest Kubernetes the manifests are for (every API they use is GA there) and the newest schemas bundled."""
ENV_HANDLED_APART = {"MLXMUX_CONFIG", "MLXMUX_NODES", "MLXMUX_API_KEYS"}
"""Read by proxy.config.load_settings itself, not through ENV_KEYS."""
GATEWAY_LABELS = {"app.kubernetes.io/name": "mlxmux", "app.kubernetes.io/component": "gateway"}


def kustomization(folder: Path) -> dict[str, Any]:
    data = yaml.safe_load((folder / "kustomization.yaml").read_text())
    assert isinstance(data, dict)
    return data


def objects(folder: Path) -> list[dict[str, Any]]:
    """The objects of the folder's own manifests (those its kustomization lists as files)."""
    found = []
    for entry in kustomization(folder)["resources"]:
        if (folder / entry).is_file():
            found += [doc for doc in yaml.safe_load_all((folder / entry).read_text()) if doc]
    return found


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return found


def container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def example_secrets() -> dict[str, str]:
    lines = (BASE / "secrets.env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def container_env(c: dict[str, Any], secrets: dict[str, str]) -> dict[str, str]:
    """The container's environment as the kubelet makes it: secretKeyRef values from `secrets` (the example
    file stands for the Secret), `$(NAME)` replaced by a variable defined earlier in the list."""
    env: dict[str, str] = {}
    for var in c.get("env", []):
        if "valueFrom" in var:
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "mlxmux-secrets"
            env[var["name"]] = secrets[ref["key"]]
        else:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), var["value"])
    return env


def port_number(c: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in c["ports"] if p["name"] == port]
    return int(number)


def gateway_settings(folder: Path) -> tuple[Settings, dict[str, str]]:
    """The settings a gateway pod of `folder`'s kustomization runs with, and its environment."""
    deployment = one(objects(BASE), "Deployment", "mlxmux")
    env = container_env(container(deployment, "gateway"), example_secrets())
    mounts = {m["name"]: m["mountPath"] for m in container(deployment, "gateway")["volumeMounts"]}
    (volume,) = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    (generator,) = [g for g in kustomization(folder)["configMapGenerator"] if g["name"] == volume["configMap"]["name"]]
    # MLXMUX_CONFIG names a file of the ConfigMap, mounted where the pod reads it.
    config = Path(env["MLXMUX_CONFIG"])
    assert str(config.parent) == mounts[volume["name"]]
    assert config.name in generator["files"]
    return load_settings(config_file=str(folder / config.name), env=env), env


@pytest.mark.parametrize("folder", [BASE, SIM], ids=["base", "sim"])
def test_kustomization_lists_every_manifest_and_file(folder: Path) -> None:
    data = kustomization(folder)
    assert data["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and data["kind"] == "Kustomization"
    files = {e for e in data["resources"] if (folder / e).is_file()}
    assert files == {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
    assert all((folder / e).is_file() or (folder / e / "kustomization.yaml").is_file() for e in data["resources"])
    for generator in data.get("configMapGenerator", []):
        assert all((folder / f).is_file() for f in generator["files"])
    assert {d["metadata"].get("namespace", data["namespace"]) for d in objects(folder) if d["kind"] != "Namespace"} == {
        data["namespace"]
    }


def test_secrets_come_from_a_file_git_ignores() -> None:
    (generator,) = kustomization(BASE)["secretGenerator"]
    assert generator["envs"] == ["secrets.env"]
    assert (BASE / "secrets.env.example").is_file()
    ignored = subprocess.run(["git", "check-ignore", "-q", str(BASE / "secrets.env")], cwd=ROOT)
    assert ignored.returncode == 0, "deploy/kubernetes/base/secrets.env must be in .gitignore"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    "path", sorted(p.relative_to(KUBE) for p in KUBE.rglob("*.yaml") if p.name != "kustomization.yaml"), ids=str
)
def test_every_manifest_is_valid_against_the_kubernetes_schemas(path: Path, version: str) -> None:
    docs = [d for d in yaml.safe_load_all((KUBE / path).read_text()) if d]
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("folder", [BASE, SIM], ids=["base", "sim"])
def test_kustomize_renders_valid_objects_wired_to_the_generated_config(folder: Path, tmp_path: Path) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: `kubectl kustomize` not run (the manifests are validated one by one)")
    shutil.copytree(KUBE, tmp_path / "kubernetes")
    shutil.copy(BASE / "secrets.env.example", tmp_path / "kubernetes" / "base" / "secrets.env")
    target = tmp_path / "kubernetes" / folder.name
    run = subprocess.run([kubectl, "kustomize", str(target)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    rendered = [d for d in yaml.safe_load_all(run.stdout) if d]
    for doc in rendered:
        kubernetes_validate.validate(doc, VERSIONS[-1], strict=True)
    names = {d["kind"]: d["metadata"]["name"] for d in rendered if d["kind"] in ("ConfigMap", "Secret")}
    assert names["ConfigMap"].startswith("mlxmux-config-") and names["Secret"].startswith("mlxmux-secrets-")
    gateway = one(rendered, "Deployment", "mlxmux")
    text = yaml.safe_dump(gateway)
    assert names["ConfigMap"] in text and names["Secret"] in text  # the references follow the hashed names
    assert re.findall(r"image: (mlxmux\S*)", run.stdout) and all(
        image == "mlxmux:0.1.0" for image in re.findall(r"image: (mlxmux\S*)", run.stdout)
    )


def test_the_gateway_reads_the_settings_ports_and_paths_the_manifests_name() -> None:
    docs = objects(BASE)
    deployment = one(docs, "Deployment", "mlxmux")
    gateway = container(deployment, "gateway")
    settings, env = gateway_settings(BASE)

    # Every MLXMUX_* variable is one the gateway reads; the others only feed $(…) of an MLXMUX_* value.
    names = [var["name"] for var in gateway["env"]]
    assert {n for n in names if n.startswith("MLXMUX_")} <= set(ENV_KEYS) | ENV_HANDLED_APART
    for other in (n for n in names if not n.startswith("MLXMUX_")):
        assert any(f"$({other})" in var.get("value", "") for var in gateway["env"]), other

    # The command is a valid `mlxmux serve`, on the port the container, the probes and the Service name.
    from proxy.cli import _serve_parser

    parser = argparse.ArgumentParser(prog="mlxmux")
    _serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(gateway["args"])
    assert args.command == "serve" and args.port is None and args.host is None  # both from mlxmux.toml
    assert settings.server.host == "0.0.0.0"
    assert port_number(gateway, "http") == settings.server.port
    service = one(docs, "Service", "mlxmux")
    (service_port,) = service["spec"]["ports"]
    assert port_number(gateway, service_port["targetPort"]) == settings.server.port
    assert service["spec"]["selector"] == GATEWAY_LABELS == deployment["spec"]["template"]["metadata"]["labels"]

    routes = {r.path: r.methods for r in build_app(settings).routes if isinstance(r, Route)}
    probes = {kind: gateway[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert {kind: probe["path"] for kind, probe in probes.items()} == {
        "startupProbe": "/health",
        "livenessProbe": "/health",
        "readinessProbe": "/ready",
    }
    for probe in probes.values():
        assert "GET" in (routes[probe["path"]] or set())
        assert port_number(gateway, probe["port"]) == settings.server.port

    # SIGTERM: the preStop pause, then server.shutdown_grace_s for streams in flight, then leases released.
    pause = int(gateway["lifecycle"]["preStop"]["exec"]["command"][-1])
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= pause + settings.server.shutdown_grace_s + 5

    # The secrets reach the settings: team keys, admin token, Redis password in the URL of the Redis Service.
    assert set(settings.auth.keys) == {"alice", "bob"}
    assert settings.server.admin_token == example_secrets()["MLXMUX_ADMIN_TOKEN"]
    assert settings.redis_url is not None
    check_store_url(settings.redis_url)
    url = httpx.URL(settings.redis_url)
    assert url.password == example_secrets()["REDIS_PASSWORD"] == env["REDIS_PASSWORD"]
    redis_service = one(docs, "Service", "mlxmux-redis")
    (redis_port,) = redis_service["spec"]["ports"]
    assert (url.host, url.port) == (redis_service["metadata"]["name"], redis_port["port"])
    redis = container(one(docs, "StatefulSet", "mlxmux-redis"), "redis")
    assert port_number(redis, redis_port["targetPort"]) == 6379
    assert redis["args"][redis["args"].index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert container_env(redis, example_secrets())["REDIS_PASSWORD"] == url.password

    # The pod runs as the user the image creates.
    dockerfile = (ROOT / "Dockerfile").read_text()
    uid = deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert re.search(rf"useradd [^\n]*--uid {uid}\b", dockerfile)


def test_three_replicas_a_disruption_budget_and_resource_requests() -> None:
    docs = objects(BASE)
    deployment = one(docs, "Deployment", "mlxmux")
    assert deployment["spec"]["replicas"] == 3
    assert deployment["spec"]["selector"]["matchLabels"] == GATEWAY_LABELS
    pdb = one(docs, "PodDisruptionBudget", "mlxmux")
    assert pdb["spec"]["selector"]["matchLabels"] == GATEWAY_LABELS
    assert pdb["spec"]["maxUnavailable"] == 1
    for workload in (d for d in docs if d["kind"] in ("Deployment", "StatefulSet")):
        for c in workload["spec"]["template"]["spec"]["containers"]:
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), c["name"]
            assert "memory" in c["resources"]["limits"], c["name"]


def test_rbac_allows_the_request_kubernetes_discovery_makes(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t")
    seen: list[httpx.Request] = []

    def api(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"items": []})

    config = DiscoveryConfig(
        mode="kubernetes", service="mlx-nodes", namespace="mlxmux", api_server="https://k8s", token_file=str(token)
    )
    asyncio.run(KubernetesDiscovery(config, transport=httpx.MockTransport(api)).poll())
    (request,) = seen
    # GET /apis/<group>/<version>/namespaces/<namespace>/<resource>: the verb "list" on that resource.
    match = re.fullmatch(r"/apis/([^/]+)/[^/]+/namespaces/([^/]+)/([^/]+)", request.url.path)
    assert match and request.method == "GET"
    group, namespace, resource = match.groups()

    docs = objects(BASE)
    deployment = one(docs, "Deployment", "mlxmux")
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    assert one(docs, "ServiceAccount", account)["metadata"]["namespace"] == namespace
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
    assert {"kind": "ServiceAccount", "name": account, "namespace": namespace} in binding["subjects"]
    role = one(docs, "Role", binding["roleRef"]["name"])
    assert binding["roleRef"]["kind"] == "Role" and role["metadata"]["namespace"] == namespace
    assert any(
        group in rule["apiGroups"] and resource in rule["resources"] and "list" in rule["verbs"]
        for rule in role["rules"]
    )


def test_the_sim_overlay_finds_its_nodes_by_kubernetes_discovery() -> None:
    from proxy.sim.cli import _parser as sim_parser

    settings, _ = gateway_settings(SIM)
    assert settings.nodes == [] and settings.discovery.mode == "kubernetes"
    docs = objects(SIM)
    service = one(docs, "Service", settings.discovery.service)
    (port,) = service["spec"]["ports"]
    assert port["name"] == settings.discovery.port_name
    sim = container(one(docs, "Deployment", "mlx-sim"), "sim")
    assert service["spec"]["selector"] == one(docs, "Deployment", "mlx-sim")["spec"]["template"]["metadata"]["labels"]
    assert sim["args"][0] == "sim-node"
    parsed = sim_parser().parse_args(sim["args"][1:])
    assert (parsed.host, parsed.port) == ("0.0.0.0", port_number(sim, port["targetPort"]))
    # The readiness probe's path is one the simulated node answers 200.
    from proxy.sim.app import build_sim_app
    from proxy.sim.cli import config_from_args

    probe = sim["readinessProbe"]["httpGet"]

    async def get() -> int:
        transport = httpx.ASGITransport(app=build_sim_app(config_from_args(parsed)))
        async with httpx.AsyncClient(transport=transport, base_url="http://sim") as client:
            return (await client.get(probe["path"])).status_code

    assert asyncio.run(get()) == 200
    # The overlay replaces the base's ConfigMap (same name), which the gateway Deployment mounts.
    (generator,) = kustomization(SIM)["configMapGenerator"]
    assert generator["behavior"] == "replace"
    assert generator["name"] in {g["name"] for g in kustomization(BASE)["configMapGenerator"]}
