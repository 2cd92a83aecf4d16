"""The `healthplane` command's validate subcommand and its error reporting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from controlplane.cli import main

EXAMPLE = Path(__file__).parents[2] / "examples" / "topology.yaml"


def test_validate_accepts_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(EXAMPLE)]) == 0
    assert "ok (1 clusters, 3 endpoints, 1 listeners)" in capsys.readouterr().out


def test_validate_names_file_and_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(EXAMPLE.read_text().replace("port: 8082", "port: 80820"))
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: clusters[0].endpoints[1].port: must be 1..65535" in err


def test_serve_refuses_to_start_on_an_invalid_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("clusters: [{name: web, endpoints: [{address: not-an-ip, port: 1}]}]\n")
    result = subprocess.run(
        [sys.executable, "-m", "controlplane", "serve", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "clusters[0].endpoints[0].address: 'not-an-ip' is not an IP address" in result.stderr
