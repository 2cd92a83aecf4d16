"""The `healthplane` command's validate subcommand and its error reporting."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from controlplane.cli.main import main

EXAMPLE = Path(__file__).parents[3] / "examples" / "topology.yaml"


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


@pytest.mark.parametrize("processes", [1, 2])
async def test_a_standalone_prober_serves_its_own_check_metrics(processes: int) -> None:
    """`healthplane prober --metrics`: every check counted where it ran, scraped from the prober.

    With `--processes 2` the checks run in worker processes, which hand their sums to the parent.
    """
    import asyncio
    import re

    import aiohttp

    from controlplane.app import ControlPlane
    from controlplane.topology.parse import parse_topology
    from lab.demoapp import DemoApp
    from lab.envoyproc import poll_until

    backend = DemoApp("b1")
    await backend.start("127.0.0.1", 0)
    document = {
        "controlplane": {"xds": {"port": 0}, "admin": {"port": 0}, "watch_interval": 0},
        "clusters": [
            {
                "name": "web",
                "endpoints": [{"address": "127.0.0.1", "port": backend.port}],
                "health_check": {"http": {"path": "/livez"}, "interval": "100ms", "timeout": "100ms"},
            }
        ],
    }
    cp = ControlPlane(parse_topology(document))
    await cp.start()
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "controlplane", "prober", "--controlplane", f"127.0.0.1:{cp.xds_port}"],
        *["--id", "m1", "--metrics", "127.0.0.1:0", "--processes", str(processes)],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        found = re.search(r"metrics on (http://127\.0\.0\.1:\d+/metrics)", line)
        assert found, line
        success = re.compile(r'^healthplane_checks_total\{cluster="web",outcome="success"\} (\S+)$', re.M)
        latency = re.compile(r'^healthplane_check_latency_seconds_count\{check="http",cluster="web"\} (\S+)$', re.M)
        async with aiohttp.ClientSession() as session:

            async def checked_three_times() -> bool:
                async with session.get(found.group(1)) as r:
                    text = await r.text()
                ok, timed = success.search(text), latency.search(text)
                return bool(ok and timed and float(ok.group(1)) >= 3 and float(timed.group(1)) >= 3)

            await poll_until(checked_three_times, timeout=20, what="three checks counted by the prober")
        assert "m1" in cp.prober_link.probers  # and it reports to the control plane as usual
    finally:
        proc.terminate()
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
        await cp.aclose(grace=0)
        await backend.stop()
    assert proc.returncode == 0, stderr.decode()[-2000:]


def test_prober_metrics_address_is_checked(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prober", "--controlplane", "127.0.0.1:18000", "--metrics", "nowhere"]) == 2
    assert "--metrics: must be HOST:PORT" in capsys.readouterr().err
