"""docker-compose.yaml refers only to files the repo has, and they are valid."""

from __future__ import annotations

from pathlib import Path

import yaml

from controlplane.topology.parse import load_topology

ROOT = Path(__file__).parents[3]
MOUNTS = {"/etc/envoy": ROOT / "envoy-configs", "/etc/healthplane": ROOT / "examples"}


def compose_files() -> list[Path]:
    compose = yaml.safe_load((ROOT / "docker-compose.yaml").read_text())
    files = []
    for service in compose["services"].values():
        for arg in service.get("command", []):
            for inside, outside in MOUNTS.items():
                if arg.startswith(inside + "/"):
                    files.append(outside / arg.removeprefix(inside + "/"))
    return files


def test_compose_refers_to_existing_bootstraps_and_topology() -> None:
    files = compose_files()
    assert {f.name for f in files} == {
        "compose-topology.yaml",
        "front-envoy.yaml",
        "webserver01-sidecar.yaml",
        "webserver02-sidecar.yaml",
        "webserver03-sidecar.yaml",
    }
    for f in files:
        assert f.is_file(), f


def test_compose_topology_serves_every_envoy_node_cluster() -> None:
    topology = load_topology(ROOT / "examples" / "compose-topology.yaml")
    services = {
        yaml.safe_load(p.read_text().partition("\n")[2])["node"]["cluster"]
        for p in (ROOT / "envoy-configs").glob("*.yaml")
    }
    for service in services:
        assert any(listener.for_node(service) for listener in topology.listeners), service
