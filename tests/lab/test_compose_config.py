"""docker-compose.yaml passes `docker-compose config`, and what it resolves to matches the lab's topology.

tests/controlplane/cli/test_compose.py checks that the files it refers to exist; test_bootstrap.py
that every bootstrap passes `envoy --mode validate`. This adds Compose's own validation.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.topology.parse import load_topology

ROOT = Path(__file__).parents[2]
COMPOSE = ROOT / "docker-compose.yaml"
TOPOLOGY = ROOT / "examples" / "compose-topology.yaml"


def _compose_command() -> list[str] | None:
    """`docker compose` (v2) when the plugin is there, else Debian's `docker-compose` (v1)."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def _config(command: list[str], text: str) -> subprocess.CompletedProcess[str]:
    # Read from stdin with the repository as the project directory, so a modified copy resolves
    # `build: .` and relative paths exactly like the file itself.
    return subprocess.run(
        [*command, "-f", "-", "--project-directory", str(ROOT), "config"],
        input=text, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    command = _compose_command()
    if command is None:
        pytest.skip(
            "neither `docker compose` nor `docker-compose` is installed "
            "(Debian: apt-get install docker-compose; .ci/run does it)"
        )
    # The file exactly as written (its project name is in .env, which v1 and v2 both read).
    result = _config(command, COMPOSE.read_text())
    assert result.returncode == 0, f"{' '.join(command)} config rejected docker-compose.yaml:\n{result.stderr}"
    resolved: dict[str, Any] = yaml.safe_load(result.stdout)
    return resolved


def test_compose_file_is_valid(resolved: dict[str, Any]) -> None:
    assert set(resolved["services"]) == {
        "controlplane", "front-envoy",
        "webserver01", "webserver01-sidecar", "webserver02", "webserver02-sidecar",
        "webserver03", "webserver03-sidecar",
    }  # fmt: skip


def test_compose_addresses_are_the_topology_endpoints(resolved: dict[str, Any]) -> None:
    topology = load_topology(TOPOLOGY)
    web = topology.cluster("web")
    local = topology.cluster("local_app")
    assert web is not None and local is not None
    services = resolved["services"]
    sidecars = {
        name: svc["networks"]["envoymesh"]["ipv4_address"]
        for name, svc in services.items()
        if name.endswith("-sidecar")
    }
    ingress = next(ln for ln in topology.listeners if ln.name == "ingress")
    sidecar_ingress = next(ln for ln in topology.listeners if ln.name == "sidecar_ingress")
    # The front proxy routes to the three sidecars, on the port of their listener.
    assert sorted(sidecars.values()) == sorted(ep.address for ep in web.endpoints)
    assert {ep.port for ep in web.endpoints} == {sidecar_ingress.port}
    # Each demo app shares its sidecar's network namespace, on the port local_app points at.
    for name in ("webserver01", "webserver02", "webserver03"):
        app = services[name]
        assert app["network_mode"] == f"service:{name}-sidecar"
        assert app["command"][app["command"].index("--port") + 1] == str(local.endpoints[0].port)
        assert name in (sidecar_ingress.nodes or ())
    # localhost:10000 is the front proxy's `ingress` listener, as in `healthplane lab`.
    ports = services["front-envoy"]["ports"]
    published = {(str(p["published"]), int(p["target"])) for p in ports}
    assert ("10000", ingress.port) in published
    # The control plane's xDS address in the bootstraps resolves on the compose network.
    assert "controlplane" in services["controlplane"]["networks"]["envoymesh"]["aliases"]
