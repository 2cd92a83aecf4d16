"""`healthplane status | endpoints | nodes | override` against a real control plane and a real Envoy."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from typing import Any

import pytest

from controlplane.cli.admin import clusters_table, nodes_table, table
from lab.demoapp import DemoApp
from lab.envoyproc import free_port, poll_until
from tests.conftest import Lab, web_topology


async def healthplane(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "controlplane",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def test_tables_line_up_and_show_lag_when_present() -> None:
    assert table(["A", "LONGER"], [["x", None], ["yyyy", 3]]).splitlines() == ["A     LONGER", "x     -", "yyyy  3"]
    rows = [{"cluster": "web", "status": s} for s in ("HEALTHY", "HEALTHY", "UNHEALTHY", "TIMEOUT")]
    assert clusters_table(rows).splitlines()[1].split() == ["web", "4", "2", "1", "0", "0", "0", "1"]
    node: dict[str, Any] = {"id": "n1", "types": {"cds": {"version_acked": "1.2", "last_nack": None}}}
    assert nodes_table([node], "1.2").splitlines()[1].split()[-2:] == ["-", "-"]
    assert "0.250s" in nodes_table([{**node, "lag": {"seconds": 0.25}}], "1.2")


@pytest.mark.envoy
async def test_status_endpoints_nodes_and_override(lab: Lab, backends: list[DemoApp], listener_port: int) -> None:
    document = web_topology(backends, listener_port)
    document["controlplane"]["admin"] = {"port": 0, "token": "cli-token-123"}
    cp = await lab.start_control_plane(document)
    await lab.start_envoy("front-1")
    admin = f"http://127.0.0.1:{cp.admin_port}"
    b2 = f"127.0.0.1:{backends[1].port}"

    async def acked() -> bool:
        node = cp.nodes.get("front-1")
        return node is not None and all(t.acked_version for t in node.types.values()) and len(node.types) == 4

    await poll_until(acked, timeout=10, what="front-1 to ACK everything")

    code, out, err = await healthplane("override", "web", b2, "unhealthy", "--admin", admin)
    assert code == 2 and "401" in err and "Bearer" in err
    code, out, err = await healthplane("override", "web", b2, "sick", "--admin", admin, "--token", "cli-token-123")
    assert code == 2 and "(status)" in err and "unknown health status 'sick'" in err
    code, out, err = await healthplane(
        "override", "web", b2, "unhealthy", "--admin", admin, env={"HEALTHPLANE_ADMIN_TOKEN": "cli-token-123"}
    )
    assert code == 0, err
    assert out.startswith(f"web {b2}: UNHEALTHY, pinned UNHEALTHY; new version {cp.snapshot.version}")

    code, out, err = await healthplane("status", "--admin", admin)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"healthplane version {cp.snapshot.version} (override:")
    web = next(line for line in lines if line.startswith("web "))
    assert web.split()[:4] == ["web", "3", "0", "1"]  # 3 endpoints, 0 HEALTHY, 1 UNHEALTHY
    assert any(line.startswith("front-1 ") and "front-proxy" in line for line in lines)
    assert any(re.match(r"\d\d:\d\d:\d\d +override +cli:", line) for line in lines), out

    code, out, err = await healthplane("endpoints", "--admin", admin, "--status", "unhealthy")
    assert code == 0, err
    assert len(out.splitlines()) == 2 and b2 in out and "UNHEALTHY" in out

    code, out, err = await healthplane("nodes", "--admin", admin)
    assert code == 0, err
    node = out.splitlines()[1].split()
    assert node[:2] == ["front-1", "front-proxy"] and node[2].startswith("ipv4:127.0.0.1:") and node[3] in ("yes", "no")
    assert node[4].startswith("cds=")
    assert re.fullmatch(r"\d+\.\d{3}s( \d+v)?", node[5]), node  # the propagation records' lag (issue 5)

    async def up_to_date() -> bool:
        _, nodes = await lab.admin("GET", "/nodes")
        return bool(nodes["nodes"][0]["up_to_date"])

    await poll_until(up_to_date, timeout=10, what="front-1 to ACK the override's version")
    code, out, err = await healthplane("nodes", "--admin", admin, "--json")
    assert code == 0 and '"up_to_date": true' in out


async def test_unreachable_admin_api_is_a_clear_error() -> None:
    code, _, err = await healthplane("status", "--admin", f"http://127.0.0.1:{free_port()}")
    assert code == 2 and "cannot reach the admin API at http://127.0.0.1:" in err


async def test_alarms_accept_and_forget_prober_commands() -> None:
    from controlplane.app import ControlPlane
    from controlplane.health.store import HealthStatus, Verdict
    from controlplane.topology.parse import parse_topology

    token = "cli-token-456"
    document = {
        "controlplane": {"xds": {"port": 0}, "admin": {"port": 0, "token": token}},
        "clusters": [{"name": "web", "endpoints": [{"address": "10.0.0.1", "port": 8000 + j} for j in range(4)]}],
    }
    async with ControlPlane(parse_topology(document)) as cp:
        admin = f"http://127.0.0.1:{cp.admin_port}"
        code, out, err = await healthplane("alarms", "--admin", admin)
        assert (code, out) == (0, "no active alarms (--all shows the resolved ones)\n"), err

        # The prober loses its network: every endpoint fails at once, and the guard holds them.
        down = [
            Verdict("web", f"10.0.0.1:{8000 + j}", HealthStatus.UNHEALTHY, "connect timeout", source="prober:a")
            for j in range(4)
        ]
        assert cp.submit_verdicts(down) is None
        [alarm] = cp.admission.alarms.active("mass_failure")

        code, out, err = await healthplane("status", "--admin", admin)
        assert code == 0, err
        assert "ALARMS" in out and re.search(rf"^{alarm.id} +mass_failure +web +", out, re.M), out
        code, out, err = await healthplane("alarms", "--admin", admin)
        assert code == 0 and re.search(rf"^{alarm.id} +mass_failure +web .* active ", out, re.M), out

        code, out, err = await healthplane("accept", str(alarm.id), "--admin", admin)
        assert code == 2 and "401" in err
        code, out, err = await healthplane("accept", str(alarm.id), "--admin", admin, "--token", token)
        assert code == 0, err
        assert out.startswith(f"alarm {alarm.id} (mass_failure web) accepted by cli:")
        assert f"new version {cp.snapshot.version}" in out
        assert cp.health.status("web", "10.0.0.1:8000") is HealthStatus.UNHEALTHY

        code, out, err = await healthplane("forget-prober", "ghost", "--admin", admin, "--token", token)
        assert code == 2 and "404" in err and "no remote prober 'ghost'" in err


def test_nodes_table_says_which_protocol_each_node_speaks() -> None:
    nodes: list[dict[str, Any]] = [{"id": "a", "protocol": "sotw"}, {"id": "b", "protocol": "delta"}]
    lines = nodes_table(nodes, "1.2").splitlines()
    assert lines[0].split()[0] == "NODE" and lines[0].split()[-1] == "XDS"
    assert [(line.split()[0], line.split()[-1]) for line in lines[1:]] == [("a", "sotw"), ("b", "delta")]
    # A server that does not report protocols: no column.
    assert "XDS" not in nodes_table([{"id": "a"}], "1.2")
