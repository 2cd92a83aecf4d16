"""Propagation over real gRPC: simulated nodes (lab.fleet) against a real control plane and admin API."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controlplane.app import ControlPlane
from controlplane.cli.main import main
from controlplane.health.store import HealthStatus
from controlplane.snapshots import resources as rs
from controlplane.topology.parse import parse_topology
from lab.envoyproc import poll_until
from lab.fleet import Fleet
from tests.controlplane.admin.test_admin import DOCUMENT


def document(propagation: dict[str, Any] | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(json.dumps(DOCUMENT))
    doc["controlplane"]["watch_interval"] = 0
    if propagation is not None:
        doc["controlplane"]["propagation"] = propagation
    return doc


class Live:
    def __init__(self, cp: ControlPlane, fleet: Fleet, session: aiohttp.ClientSession) -> None:
        self.cp, self.fleet, self.session = cp, fleet, session

    async def get(self, path: str) -> Any:
        async with self.session.get(f"http://127.0.0.1:{self.cp.admin_port}{path}") as r:
            assert r.status == 200, await r.text()
            return await r.json() if r.content_type == "application/json" else await r.text()

    async def converged(self, version: str) -> dict[str, Any]:
        async def probe() -> dict[str, Any] | None:
            body: dict[str, Any] = await self.get(f"/versions/{version}")
            return body if body["converged"] else None

        return await poll_until(probe, timeout=20, what=f"version {version} to converge")


async def live(propagation: dict[str, Any] | None, nodes: int) -> AsyncIterator[Live]:
    cp = ControlPlane(parse_topology(document(propagation), source="test"))
    async with cp, aiohttp.ClientSession() as session:
        async with Fleet(f"127.0.0.1:{cp.xds_port}", nodes, seed=1) as fleet:
            yield Live(cp, fleet, session)


@pytest.fixture
async def three() -> AsyncIterator[Live]:
    async for x in live(None, 3):
        yield x


async def test_a_verdict_is_measured_at_every_nodes_ack(three: Live) -> None:
    snap = three.cp.set_override("web", "127.0.0.1:8081", HealthStatus.UNHEALTHY, who="test")
    assert snap is not None
    detail = await three.converged(snap.version)
    assert detail["cause"]["kind"] == "override" and detail["nodes"] == 3 and detail["acked"] == 3
    assert detail["not_acked"] == []
    assert {n["node"] for n in detail["per_node"]} == {"sim-0", "sim-1", "sim-2"}
    for n in detail["per_node"]:
        assert n["status"] == "acked" and 0 <= n["sent_ms"] <= n["ack_ms"] <= detail["convergence_ms"]
    # The tracker's ACK is the one the node sent: each node ACKed this EDS version.
    assert three.fleet.acked(rs.ENDPOINT, snap.type_versions[rs.ENDPOINT]) == 3

    listing = await three.get("/versions")
    assert listing["versions"][0]["version"] == snap.version and listing["current"] == snap.version
    nodes = await three.get("/nodes")
    assert [n["lag"]["versions_behind"] for n in nodes["nodes"]] == [0, 0, 0]
    assert all(n["lag"]["version"] == snap.version for n in nodes["nodes"])
    metrics = await three.get("/metrics")
    assert 'healthplane_convergence_seconds_count{cause="override"} 1.0' in metrics
    assert 'healthplane_propagation_delay_seconds_count{cause="override"} 3.0' in metrics
    page = await three.get("/propagation")
    assert page.count("<svg") == 2 and snap.version in page and "sim-2" in page


async def test_unknown_versions_and_bad_limits_are_json_errors(three: Live) -> None:
    async with three.session.get(f"http://127.0.0.1:{three.cp.admin_port}/versions/9.9") as r:
        assert r.status == 404 and (await r.json())["field"] == "version"
    async with three.session.get(f"http://127.0.0.1:{three.cp.admin_port}/versions?limit=x") as r:
        assert r.status == 400 and (await r.json())["field"] == "limit"
    async with three.session.get(f"http://127.0.0.1:{three.cp.admin_port}/propagation?refresh=-1") as r:
        assert r.status == 400 and (await r.json())["field"] == "refresh"
    page = await three.get("/propagation?refresh=5")
    assert '<meta http-equiv="refresh" content="5">' in page


async def test_the_report_command_draws_the_same_chart(three: Live, tmp_path: Path) -> None:
    snap = three.cp.set_override("web", "127.0.0.1:8082", HealthStatus.UNHEALTHY, who="test")
    assert snap is not None
    await three.converged(snap.version)
    out = tmp_path / "report.html"
    admin = f"http://127.0.0.1:{three.cp.admin_port}"
    code = await asyncio.to_thread(main, ["propagation", "report", "--admin", admin, "--out", str(out)])
    page = out.read_text()
    assert code == 0 and page.count("<svg") == 2 and snap.version in page


async def test_the_model_holds_back_only_the_nodes_it_matches() -> None:
    # A lower bound cannot flake on a slow machine: the matched node's ACK comes >= 300 ms after the cause.
    async for w in live({"seed": 1, "delays": [{"node": "sim-0", "fixed": "300ms"}]}, 2):
        snap = w.cp.set_override("web", "127.0.0.1:8081", HealthStatus.UNHEALTHY, who="test")
        assert snap is not None
        detail = await w.converged(snap.version)
        by_node = {n["node"]: n for n in detail["per_node"]}
        assert by_node["sim-0"]["sent_ms"] >= 300 and by_node["sim-0"]["ack_ms"] >= 300
        assert detail["convergence_ms"] >= 300


async def test_history_follows_the_served_topology(three: Live) -> None:
    assert three.cp.propagation is not None and three.cp.propagation.limit == 32
    three.cp.update_topology(parse_topology(document({"history": 2}), source="test"))
    for status in (HealthStatus.UNHEALTHY, HealthStatus.HEALTHY, HealthStatus.UNHEALTHY):
        three.cp.set_override("web", "127.0.0.1:8081", status, who="test")
    listing = await three.get("/versions")
    assert listing["tracked"] == 2 and len(listing["versions"]) == 2
    assert listing["versions"][0]["version"] == three.cp.snapshot.version
