"""Delta streams through the machinery both protocols share: the stuck-stream watchdog, the
per-peer stream limit, TLS, the modelled delay, metrics and propagation. Real gRPC on 127.0.0.1,
simulated delta nodes (lab/adsclient.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from controlplane.app import ControlPlane
from controlplane.health.store import HealthStatus
from controlplane.snapshots import resources as rs
from controlplane.topology.parse import parse_topology
from lab.adsclient import DeltaAdsClient, DeltaAdsStream
from lab.envoyproc import poll_until
from tests.controlplane.health.test_faults import metric
from tests.controlplane.xds.certs import Certs, make_certs
from tests.controlplane.xds.test_security import client_creds, serving
from tests.controlplane.xds.test_security import document as tls_document


def document(**controlplane: Any) -> dict[str, Any]:
    return {
        "controlplane": {"xds": {"port": 0}, "admin": {"port": 0}, "watch_interval": 0, **controlplane},
        "clusters": [{"name": "web", "endpoints": [{"address": "10.0.0.1", "port": 8000 + j} for j in range(3)]}],
    }


class DeltaNode:
    """A delta node subscribed to EDS for `web` that ACKs every response (or reads nothing)."""

    def __init__(self, channel: grpc.aio.Channel, node_id: str, *, read: bool = True) -> None:
        self.client = DeltaAdsClient(base_pb2.Node(id=node_id, cluster="test"))
        self.stream = DeltaAdsStream(ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel), self.client)
        self.read = read
        self.responses: list[discovery_pb2.DeltaDiscoveryResponse] = []
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.stream.send(self.client.subscribe(rs.ENDPOINT, ["web"]))
        if self.read:
            self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while (response := await self.stream.read()) is not None:
            self.responses.append(response)
            await self.stream.send(self.client.ack(response))

    async def aclose(self) -> None:
        self.stream.cancel()
        if self.task is not None:
            await asyncio.gather(self.task, return_exceptions=True)


@pytest.fixture
async def cp() -> AsyncIterator[ControlPlane]:
    async with ControlPlane(
        parse_topology(document(stuck_stream_timeout="60s", xds={"port": 0, "max_streams_per_peer": 2}))
    ) as plane:
        yield plane


def _acked(cp: ControlPlane, node: str) -> bool:
    stream = cp.nodes.get(node)
    ts = None if stream is None else stream.types.get(rs.ENDPOINT)
    return ts is not None and not ts.awaiting_ack and ts.acked_version == cp.snapshot.type_versions[rs.ENDPOINT]


async def test_a_stuck_delta_node_is_closed_by_the_watchdog_and_the_peer_limit_counts_delta_streams(
    cp: ControlPlane,
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{cp.xds_port}") as channel:
        stuck, normal = DeltaNode(channel, "stuck", read=False), DeltaNode(channel, "normal")
        await stuck.start()
        await normal.start()
        await poll_until(lambda: asyncio.sleep(0, _acked(cp, "normal")), timeout=10, what="normal node ACKed")
        stream = await poll_until(lambda: asyncio.sleep(0, cp.nodes.get("stuck")), timeout=10, what="stuck known")
        assert stream.protocol == "delta" and stream.types[rs.ENDPOINT].awaiting_ack

        # A third stream from the same peer is over max_streams_per_peer (2), delta or not.
        third = DeltaAdsStream(
            ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel), DeltaAdsClient(base_pb2.Node(id="x"))
        )
        await third.send(third.client.subscribe(rs.CLUSTER))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await third.read()
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_streams_per_peer is 2" in (refused.value.details() or "")

        # Health keeps flowing to the normal node; the stuck one holds its single response.
        cp.set_override("web", "10.0.0.1:8000", HealthStatus.UNHEALTHY, who="test")
        await poll_until(lambda: asyncio.sleep(0, _acked(cp, "normal")), timeout=10, what="normal node ACKed again")
        assert stream.types[rs.ENDPOINT].sent_version != cp.snapshot.type_versions[rs.ENDPOINT]

        assert cp.close_stuck_streams(now=time.time() + 61) == [stream.stream_id]
        with pytest.raises(grpc.aio.AioRpcError) as closed:
            while await stuck.stream.read() is not None:
                pass
        assert closed.value.code() is grpc.StatusCode.UNAVAILABLE and "stuck_stream_timeout" in (
            closed.value.details() or ""
        )
        [event] = cp.events.recent(kind="stuck_stream")
        assert event.fields["node"] == "stuck"
        await stuck.aclose()
        await normal.aclose()


async def test_delta_streams_count_in_metrics_and_propagation(cp: ControlPlane) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{cp.xds_port}") as channel, aiohttp.ClientSession() as session:
        node = DeltaNode(channel, "d1")
        await node.start()
        await poll_until(lambda: asyncio.sleep(0, _acked(cp, "d1")), timeout=10, what="first ACK")
        snapshot = cp.set_override("web", "10.0.0.1:8001", HealthStatus.UNHEALTHY, who="test")
        assert snapshot is not None and cp.propagation is not None
        record = cp.propagation.get(snapshot.version)
        assert record is not None and "d1" in record.types
        await poll_until(lambda: asyncio.sleep(0, record.pending == 0), timeout=10, what="the change ACKed")
        assert "d1" in record.acked
        assert cp.propagation.lag("d1").versions_behind == 0
        assert await metric(cp, session, 'healthplane_xds_acks_total{type="eds"}') == 2
        assert await metric(cp, session, 'healthplane_xds_responses_total{type="eds"}') == 2
        await node.aclose()


async def test_the_modelled_delay_holds_delta_responses() -> None:
    doc = document(propagation={"delays": [{"node": "slow-*", "fixed": "300ms"}]})
    async with ControlPlane(parse_topology(doc)) as cp, grpc.aio.insecure_channel(f"127.0.0.1:{cp.xds_port}") as ch:
        slow, fast = DeltaNode(ch, "slow-1"), DeltaNode(ch, "fast-1")
        await slow.start()
        await fast.start()
        await poll_until(
            lambda: asyncio.sleep(0, _acked(cp, "slow-1") and _acked(cp, "fast-1")), timeout=10, what="ACKs"
        )
        began = time.monotonic()
        cp.set_override("web", "10.0.0.1:8002", HealthStatus.UNHEALTHY, who="test")
        await poll_until(lambda: asyncio.sleep(0, _acked(cp, "fast-1")), timeout=10, what="fast node")
        fast_s = time.monotonic() - began
        await poll_until(lambda: asyncio.sleep(0, _acked(cp, "slow-1")), timeout=10, what="slow node")
        slow_s = time.monotonic() - began
        assert fast_s < 0.3 <= slow_s
        await slow.aclose()
        await fast.aclose()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


async def test_delta_over_mutual_tls(certs: Certs, tmp_path: Path) -> None:
    async with serving(tls_document(certs), tmp_path) as cp:
        target = f"127.0.0.1:{cp.xds_port}"
        creds = client_creds(certs, cert=certs.client_cert, key=certs.client_key)
        async with grpc.aio.secure_channel(target, creds) as channel:
            node = DeltaNode(channel, "tls-delta")
            await node.start()
            await poll_until(lambda: asyncio.sleep(0, _acked(cp, "tls-delta")), timeout=10, what="ACK over mTLS")
            [first] = node.responses
            assert [r.name for r in first.resources] == ["web"]
            await node.aclose()
        async with grpc.aio.secure_channel(target, client_creds(certs)) as channel:  # no client certificate
            refused = DeltaNode(channel, "no-cert")
            with pytest.raises((grpc.aio.AioRpcError, TimeoutError)):
                async with asyncio.timeout(5):
                    await refused.start()
                    await refused.stream.read()
            await refused.aclose()
        assert [s.node_id for s in cp.ads.streams.values()] == []
