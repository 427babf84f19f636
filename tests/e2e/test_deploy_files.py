"""deploy/ for containers, Kubernetes and systemd, validated by real tools: hadolint (the
Dockerfile), kubernetes-validate (the manifests, against the Kubernetes API schemas),
systemd-analyze (the unit), and the proxy's own --check (every config shipped in deploy/).
Docker cannot pull images here, so the image itself is not built in CI (see README)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.support import REPO, require_tool, run_cli

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"


def tool(name: str) -> str:
    return require_tool(name, "pip install -e '.[test]'")


def test_dockerfile_passes_hadolint():
    result = subprocess.run(
        [tool("hadolint"), str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_manifests_pass_schema_validation():
    manifests = sorted(p for p in K8S.glob("*.yaml") if p.name != "podmonitor.yaml")
    assert len(manifests) == 6
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", *map(str, manifests)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" passed for resource ") == 6


def load(name: str) -> dict:
    return yaml.safe_load((K8S / name).read_text())


def test_only_prometheus_reaches_the_admin_port():
    # PodMonitor is a Prometheus Operator CRD: no schema in kubernetes-validate, so it is
    # checked against the Deployment's pod instead.
    monitor, service = load("podmonitor.yaml"), load("service.yaml")
    deployment, policy = load("deployment.yaml"), load("networkpolicy.yaml")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    pod = deployment["spec"]["template"]
    labels = monitor["spec"]["selector"]["matchLabels"]
    assert labels.items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    assert "admin" in {p["name"] for p in container["ports"]}
    # It sends the admin token: the key of the Secret the pods mount as admin.token_file.
    token = {"name": "proxy-admin-token", "key": "token"}
    assert monitor["spec"]["podMetricsEndpoints"] == [
        {"port": "admin", "path": "/metrics", "interval": "15s",
         "authorization": {"type": "Bearer", "credentials": token}}
    ]  # fmt: skip
    # No Service carries the admin port; the NetworkPolicy lets only the monitoring
    # namespace reach it, and everyone reach the proxy port.
    assert {p["targetPort"] for p in service["spec"]["ports"]} == {"http"}
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    rules = {tuple(p["port"] for p in rule["ports"]): rule.get("from") for rule in
             policy["spec"]["ingress"]}  # fmt: skip
    assert rules[("http",)] is None
    assert rules[("admin",)] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
    ]


def checked(tmp_path, text: str) -> dict:
    """`text` (a shipped config) passes --check, with its admin token file made in tmp_path."""
    settings = yaml.safe_load(text)
    token = tmp_path / "admin-token"
    token.write_text("a-token\n")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**settings, "admin": {**settings["admin"],
                                                          "token_file": str(token)}}))  # fmt: skip
    result = run_cli("--config", str(path), "--check")
    assert result.returncode == 0, result.stderr
    return settings


def test_kubernetes_mounts_the_admin_token_the_config_names(tmp_path):
    deployment, configmap = load("deployment.yaml"), load("configmap.yaml")
    settings = checked(tmp_path, configmap["data"]["config.yaml"])
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = [m for m in container["volumeMounts"] if "secret" in volumes[m["name"]]]
    secret = volumes[mount["name"]]["secret"]
    assert secret["secretName"] == "proxy-admin-token"
    assert "items" not in secret and "subPath" not in mount  # updated in place: rotation
    assert settings["admin"]["token_file"] == f"{mount['mountPath']}/token"
    # Readable by the proxy's user (fsGroup), by no one else.
    assert secret["defaultMode"] == 0o440 and pod["securityContext"]["fsGroup"] == 10001
    # The probes need no token: they are the two paths the token does not guard.
    from proxy.guard import PROBES

    probes = {container[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe")}
    assert probes == PROBES


def test_deployment_probes_prestop_and_grace_match_the_config(tmp_path):
    deployment, configmap = load("deployment.yaml"), load("configmap.yaml")
    settings = checked(tmp_path, configmap["data"]["config.yaml"])
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert (ports["http"], ports["admin"]) == (
        settings["listen"]["port"],
        settings["admin"]["port"],
    )
    assert container["lifecycle"]["preStop"]["exec"]["command"] == [
        "sleep",
        str(settings["shutdown"]["delay"]),
    ]
    drain = 2 * settings["shutdown"]["delay"] + settings["shutdown"]["grace"]
    assert pod["terminationGracePeriodSeconds"] > drain
    assert container["resources"]["requests"]


def test_compose_and_image_configs_are_valid_and_files_exist(tmp_path):
    checked(tmp_path, (DEPLOY / "compose" / "config.yaml").read_text())
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {"proxy", "backend1", "backend2", "prometheus", "grafana"}
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert (DEPLOY / source).exists(), source
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (REPO / source).exists(), source


def test_compose_keeps_the_admin_port_on_loopback_and_uses_the_token():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    settings = yaml.safe_load((DEPLOY / "compose" / "config.yaml").read_text())
    admin_port = str(settings["admin"]["port"])
    proxy = compose["services"]["proxy"]
    for published in proxy["ports"]:
        *host, container = str(published).split(":")
        if container == admin_port:
            assert host[:1] == ["127.0.0.1"], published  # never 0.0.0.0 (the default)
    # One token file: the proxy's admin.token_file and Prometheus's credentials_file.
    (source,) = compose["secrets"].values()
    assert source["file"] == "./compose/admin-token"
    assert "deploy/compose/admin-token" in (REPO / ".gitignore").read_text().splitlines()
    assert proxy["secrets"] == compose["services"]["prometheus"]["secrets"] == ["admin-token"]
    token_file = "/run/secrets/admin-token"
    assert settings["admin"]["token_file"] == token_file
    scrape = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())
    (job,) = scrape["scrape_configs"]
    assert job["authorization"] == {"type": "Bearer", "credentials_file": token_file}
    # Prometheus asks for the service's name: the admin listener must answer for it.
    (target,) = job["static_configs"][0]["targets"]
    assert target.split(":")[0] in settings["admin"]["allowed_hosts"]


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI") == "true":
            pytest.fail("systemd-analyze is not installed (apt-get install -y systemd)")
        pytest.skip("systemd-analyze is not installed")
    unit = (DEPLOY / "systemd" / "proxy.service").read_text()
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit
    # verify checks that ExecStart exists: point it at this checkout's interpreter.
    local = unit.replace("/opt/proxy/.venv/bin/proxy", f"{sys.executable} -m proxy")
    path = tmp_path / "proxy.service"
    path.write_text(local)
    result = subprocess.run(
        [analyze, "verify", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
