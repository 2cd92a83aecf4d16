"""deploy/kubernetes/: every manifest valid for Kubernetes, offline, and consistent with healthplane itself.

kubernetes-validate checks each resource against the OpenAPI schemas it bundles (no cluster and
no network). What a schema cannot say is checked here: the ConfigMap's topology is one
`healthplane validate` accepts, the containers' args are ones healthplane's CLI parses, and the
names, labels and ports that tie the resources together agree.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from controlplane.cli.main import build_parser, main
from controlplane.topology.parse import load_topology

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
MANIFESTS = sorted([*DEPLOY.glob("*.yaml"), *DEPLOY.glob("*/*.yaml")])
CONTROLPLANE = {"app.kubernetes.io/name": "healthplane", "app.kubernetes.io/component": "controlplane"}


def resources() -> list[dict[str, Any]]:
    return [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]


def find(kind: str, name: str) -> dict[str, Any]:
    found = [r for r in resources() if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any attempt to open a socket fails the test: the schemas must come from the package."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("kubernetes-validate tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield


def test_the_manifests_are_there() -> None:
    kinds = sorted((r["kind"], r["metadata"]["name"]) for r in resources())
    assert kinds == [
        ("ConfigMap", "healthplane-topology"),
        ("Deployment", "healthplane"),
        ("Deployment", "healthplane-prober"),
        ("PodDisruptionBudget", "healthplane"),
        ("Secret", "healthplane-admin"),
        ("Service", "healthplane-admin"),
        ("Service", "healthplane-replicas"),
        ("Service", "healthplane-xds"),
    ]
    # Every manifest is applied with the folder (`kubectl apply -f deploy/kubernetes/`): no opt-in subfolder.
    assert [p.parent for p in MANIFESTS] == [DEPLOY] * len(MANIFESTS)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_resource_is_valid_kubernetes_offline(path: Path, no_network: None) -> None:
    version = kubernetes_validate.latest_version()
    for doc in yaml.safe_load_all(path.read_text()):
        # strict: an unknown or misspelt field is an error, not ignored as the API server would.
        kubernetes_validate.validate(doc, version, strict=True)


def test_a_misspelt_field_is_caught(no_network: None) -> None:
    # The check above can fail: a probe field typo is refused by the bundled schema.
    doc = find("Deployment", "healthplane")
    doc["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/readyz", "port": 1}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_the_configmap_topology_passes_healthplane_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "topology.yaml"
    config.write_text(find("ConfigMap", "healthplane-topology")["data"]["topology.yaml"])
    assert main(["validate", str(config)]) == 0
    assert "ok (1 clusters, 3 endpoints, 1 listeners)" in capsys.readouterr().out


def test_the_control_plane_deployment_runs_what_the_configmap_and_secret_hold(tmp_path: Path) -> None:
    deployment = find("Deployment", "healthplane")
    spec = deployment["spec"]
    assert spec["replicas"] == 3
    assert spec["selector"]["matchLabels"] == CONTROLPLANE == spec["template"]["metadata"]["labels"]
    pod = spec["template"]["spec"]
    [container] = pod["containers"]
    # The args are a `healthplane serve` the CLI parses, reading the file the ConfigMap mounts.
    assert container["args"][0] == "healthplane"
    args = build_parser().parse_args(container["args"][1:])
    assert args.func.__name__ == "_serve"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["topology"]["configMap"]["name"] == "healthplane-topology"
    assert args.config == f"{mounts['topology']}/topology.yaml"
    # Ports and data_dir are the ones the topology binds and writes.
    config = tmp_path / "topology.yaml"
    config.write_text(find("ConfigMap", "healthplane-topology")["data"]["topology.yaml"])
    topology = load_topology(config)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"xds": topology.controlplane.xds.port, "admin": topology.controlplane.admin.port}
    assert topology.controlplane.xds.address == topology.controlplane.admin.address == "0.0.0.0"
    assert str(topology.controlplane.data_dir) == mounts["data"]
    assert "emptyDir" in volumes["data"]
    # Readiness is /readyz and liveness /healthz, on the admin port.
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert set(container["resources"]) == {"requests", "limits"}
    # The admin token comes from the Secret, by the environment variable healthplane reads.
    [env] = container["env"]
    assert env["name"] == "HEALTHPLANE_ADMIN_TOKEN"
    ref = env["valueFrom"]["secretKeyRef"]
    assert ref["key"] in find("Secret", ref["name"])["stringData"]
    # Not root, nothing to write but the volumes.
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_services_and_the_budget_select_the_control_plane() -> None:
    xds, admin = find("Service", "healthplane-xds"), find("Service", "healthplane-admin")
    # Headless: one DNS address per ready replica, so a bootstrap's STRICT_DNS cluster has them all.
    assert xds["spec"]["clusterIP"] == "None"
    assert xds["spec"]["selector"] == admin["spec"]["selector"] == CONTROLPLANE
    assert [p["targetPort"] for p in xds["spec"]["ports"]] == ["xds"]
    assert [p["targetPort"] for p in admin["spec"]["ports"]] == ["admin"]
    budget = find("PodDisruptionBudget", "healthplane")["spec"]
    assert budget["selector"]["matchLabels"] == CONTROLPLANE
    assert budget["minAvailable"] < find("Deployment", "healthplane")["spec"]["replicas"]


def test_the_probers_link_to_every_replica_ready_or_not_and_are_the_replicas_only_health() -> None:
    pod = find("Deployment", "healthplane-prober")["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["args"][0] == "healthplane"
    args = build_parser().parse_args(container["args"][1:])
    assert args.func.__name__ == "prober_command"
    # One name: the prober resolves it and links to every address (every replica), re-resolving.
    [target] = args.controlplane
    host, _, port = target.partition(":")
    replicas, xds = find("Service", "healthplane-replicas"), find("Service", "healthplane-xds")
    assert host == replicas["metadata"]["name"]
    assert int(port) == replicas["spec"]["ports"][0]["port"] == xds["spec"]["ports"][0]["port"]
    assert args.resolve_interval > 0 and args.resolve_grace >= args.resolve_interval
    # The same pods and port as the Envoys' Service, headless, but with the replicas that are not
    # ready yet: a replica turns ready only once a prober has sent it its full state.
    assert replicas["spec"]["clusterIP"] == "None"
    assert replicas["spec"]["selector"] == xds["spec"]["selector"] == CONTROLPLANE
    assert [p["targetPort"] for p in replicas["spec"]["ports"]] == ["xds"]
    assert replicas["spec"]["publishNotReadyAddresses"] is True
    assert not xds["spec"].get("publishNotReadyAddresses", False)  # Envoys: ready replicas only
    # The replicas do not check: the probers' verdicts are what they serve.
    cp = find("Deployment", "healthplane")["spec"]["template"]["spec"]["containers"][0]
    assert build_parser().parse_args(cp["args"][1:]).no_prober is True
    # Each prober its own id (a second link with a connected id is refused): the pod name.
    assert args.id == "$(POD_NAME)"
    assert container["env"][0]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert find("Deployment", "healthplane-prober")["spec"]["replicas"] >= 2
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_the_commented_store_snippet_is_a_valid_store(tmp_path: Path) -> None:
    # Uncommented as an operator would (one "# " off each line of the block), it is a
    # controlplane.store that healthplane accepts, with the etcd endpoints it shows.
    lines = find("ConfigMap", "healthplane-topology")["data"]["topology.yaml"].splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "# store:")
    indent = lines[start].index("#")
    end = start
    while end < len(lines) and lines[end].startswith(" " * indent + "#"):
        end += 1
    block = [line[:indent] + line[indent + 2 :] for line in lines[start:end]]
    config = tmp_path / "topology.yaml"
    config.write_text("\n".join([*lines[:start], *block, *lines[end:]]) + "\n")
    store = load_topology(config).controlplane.store
    assert store is not None
    assert store.etcd.endpoints[0] == ("etcd-0.etcd", 2379)
    assert store.etcd.prefix == "/healthplane"
