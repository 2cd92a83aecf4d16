"""lab.fleet: simulated ADS nodes over real gRPC against a real control plane, and `healthplane fleet`."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from envoy.service.discovery.v3 import ads_pb2_grpc

from controlplane.app import ControlPlane
from controlplane.errors import ConfigError
from controlplane.health.store import HealthStatus
from controlplane.snapshots import resources as rs
from controlplane.topology.parse import parse_topology
from lab.envoyproc import poll_until
from lab.fleet import CHANNEL_OPTIONS, Fleet, SimNode, parse_apply
from tests.controlplane.admin.test_admin import DOCUMENT


@pytest.fixture
async def cp() -> AsyncIterator[ControlPlane]:
    doc: dict[str, Any] = json.loads(json.dumps(DOCUMENT))
    doc["controlplane"]["watch_interval"] = 0
    async with ControlPlane(parse_topology(doc, source="test")) as plane:
        yield plane


def test_apply_times_parse_or_name_the_flag() -> None:
    rng = random.Random(1)
    assert parse_apply("5ms")(rng) == 0.005
    assert all(0.0 <= parse_apply("0ms-20ms")(rng) <= 0.02 for _ in range(100))
    for bad in ("soon", "20ms-10ms"):
        with pytest.raises(ConfigError) as info:
            parse_apply(bad)
        assert info.value.path == "--apply"


async def test_nodes_subscribe_like_envoy_and_ack_every_type(cp: ControlPlane) -> None:
    async with Fleet(f"127.0.0.1:{cp.xds_port}", 4, zones=("a", "b")) as fleet:
        snapshot = cp.snapshot
        for type_url in rs.ADS_ORDER:
            await poll_until(
                lambda t=type_url: asyncio.sleep(0, fleet.acked(t, snapshot.type_versions[t]) == 4),
                timeout=10,
                what=f"every node to ACK {rs.SHORT_NAMES[type_url]}",
            )
        streams = {s.node_id: s for s in cp.nodes.streams()}
        assert sorted(streams) == ["sim-0", "sim-1", "sim-2", "sim-3"]
        assert streams["sim-1"].node_zone == "b" and streams["sim-1"].node_cluster == "fleet"
        assert streams["sim-0"].types[rs.ENDPOINT].names == {"web", "api"}
        assert streams["sim-0"].types[rs.ROUTE].names == {"ingress"}


async def test_delta_nodes_follow_clusters_and_listeners_and_resume_with_what_they_hold(cp: ControlPlane) -> None:
    async with Fleet(f"127.0.0.1:{cp.xds_port}", 3, delta=True) as fleet:
        snapshot = cp.snapshot
        for type_url in rs.ADS_ORDER:
            await poll_until(
                lambda t=type_url: asyncio.sleep(0, fleet.acked(t, snapshot.type_versions[t]) == 3),
                timeout=10,
                what=f"every delta node to ACK {rs.SHORT_NAMES[type_url]}",
            )
        streams = {s.node_id: s for s in cp.nodes.streams()}
        assert {s.protocol for s in streams.values()} == {"delta"}
        assert streams["sim-0"].types[rs.ENDPOINT].names == {"web", "api"}
        assert streams["sim-0"].types[rs.ROUTE].names == {"ingress"}
        node = fleet.nodes[0]
        assert node.held[rs.CLUSTER] == {n: r.delta_version for n, r in snapshot.resources[rs.CLUSTER].items()}

        # A removed cluster: announced as removed, and the node unsubscribes its endpoints.
        edited = dict(
            cp.topology.document, clusters=[c for c in cp.topology.document["clusters"] if c["name"] == "web"]
        )
        edited["listeners"] = [
            {**ln, "routes": [r for r in ln["routes"] if r["cluster"] == "web"]} for ln in edited["listeners"]
        ]
        after = cp.update_topology(parse_topology(edited, source="test"))
        assert after is not None
        await poll_until(
            lambda: asyncio.sleep(0, all(n.held[rs.CLUSTER].keys() == {"web"} for n in fleet.nodes)),
            timeout=10,
            what="every delta node to drop cluster api",
        )
        await poll_until(
            lambda: asyncio.sleep(0, streams["sim-0"].types[rs.ENDPOINT].names == {"web"}),
            timeout=10,
            what="the node to unsubscribe api's endpoints",
        )
        # A new stream lists what the node holds: nothing unchanged is sent again.
        before = cp.nodes.responses
        replay = SimNode("sim-0", delta=True, held=node.held, routes_of=node.routes_of)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{cp.xds_port}", options=CHANNEL_OPTIONS)
        task = asyncio.create_task(replay.run(ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)))
        try:
            await poll_until(lambda: asyncio.sleep(0, len(replay.history) >= 4), timeout=10, what="4 answers")
            stream = cp.nodes.get("sim-0")
            assert stream is not None
            assert {t: ts.sent_names for t, ts in stream.types.items()} == {t: () for t in rs.ADS_ORDER}
            assert cp.nodes.responses - before == 4
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await channel.close(grace=None)


async def test_a_nacking_node_is_recorded_as_such(cp: ControlPlane) -> None:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{cp.xds_port}", options=CHANNEL_OPTIONS)
    node = SimNode("nacker", nack_rate=1.0)
    task = asyncio.create_task(node.run(ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)))
    try:
        await poll_until(lambda: asyncio.sleep(0, cp.nodes.nacks >= 1), timeout=10, what="the first NACK")
        edited = dict(
            cp.topology.document, clusters=[c for c in cp.topology.document["clusters"] if c["name"] == "web"]
        )
        snapshot = cp.update_topology(parse_topology(edited, source="test"))
        assert snapshot is not None and cp.propagation is not None
        record = cp.propagation.get(snapshot.version)
        assert record is not None
        await poll_until(lambda: asyncio.sleep(0, record.pending == 0), timeout=10, what="the NACK of the edit")
        [delivery] = record.deliveries.values()
        assert delivery.status == "nacked" and delivery.error == "simulated NACK"
        assert cp.propagation.lag("nacker").versions_behind == 0  # NACKed: answered, not awaited
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await channel.close(grace=None)


async def test_the_fleet_command_reports_versions_and_stops_on_sigint(cp: ControlPlane) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controlplane", "fleet", "--nodes", "3", "--controlplane",
        f"127.0.0.1:{cp.xds_port}", "--apply", "0ms-5ms", "--seed", "1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(30):
            line = (await proc.stdout.readline()).decode()
            assert line.startswith("healthplane fleet: 3 nodes connected"), line
            snapshot = cp.set_override("web", "127.0.0.1:8081", HealthStatus.UNHEALTHY, who="test")
            assert snapshot is not None
            while f"version {snapshot.version}: 3 answers" not in line:
                line = (await proc.stdout.readline()).decode()
                assert line, "the fleet command ended early"
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_the_fleet_command_speaks_delta(cp: ControlPlane) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controlplane", "fleet", "--nodes", "2", "--controlplane",
        f"127.0.0.1:{cp.xds_port}", "--delta", "--prefix", "d",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(30):
            line = (await proc.stdout.readline()).decode()
            assert line.startswith("healthplane fleet: 2 nodes connected"), line
            assert {s.protocol for s in cp.nodes.streams()} == {"delta"}
            snapshot = cp.set_override("web", "127.0.0.1:8081", HealthStatus.UNHEALTHY, who="test")
            assert snapshot is not None
            while f"version {snapshot.type_versions[rs.ENDPOINT]}: 2 answers" not in line:
                line = (await proc.stdout.readline()).decode()
                assert line, "the fleet command ended early"
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_the_fleet_command_fails_when_the_control_plane_goes_away() -> None:
    doc: dict[str, Any] = json.loads(json.dumps(DOCUMENT))
    doc["controlplane"]["watch_interval"] = 0
    plane = ControlPlane(parse_topology(doc, source="test"))
    await plane.start()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controlplane", "fleet", "--nodes", "2", "--controlplane", f"127.0.0.1:{plane.xds_port}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(30):
            assert (await proc.stdout.readline()).startswith(b"healthplane fleet: 2 nodes connected")
            await plane.aclose(grace=0)
            rest = (await proc.stdout.read()).decode()
            assert "nodes lost their stream" in rest and await proc.wait() == 1
    finally:
        await plane.aclose()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
