"""xDS worker processes on real sockets (simulated nodes, lab/adsclient.py): what one process does
for its streams holds across workers (the watchdog, limits, the modelled delay, metrics and
propagation), and a stuck worker is replaced."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc

from controlplane.app import ControlPlane
from controlplane.health.store import HealthStatus
from controlplane.snapshots import resources as rs
from controlplane.topology.parse import load_topology, parse_topology
from lab.adsclient import AdsClient, AdsStream, DeltaAdsClient, DeltaAdsStream
from lab.envoyproc import poll_until
from tests.controlplane.health.test_faults import metric
from tests.controlplane.xds import test_delta_server as in_process
from tests.controlplane.xds import test_security
from tests.controlplane.xds.certs import Certs, make_certs
from tests.controlplane.xds.test_delta_server import DeltaNode, _acked, document

# An own TCP connection per channel: the kernel then spreads them over the workers.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


@pytest.fixture
async def cp() -> AsyncIterator[ControlPlane]:
    """As test_delta_server's, with two xDS workers."""
    topology = parse_topology(document(stuck_stream_timeout="60s", xds={"port": 0, "max_streams_per_peer": 2}))
    async with ControlPlane(topology, workers=2) as plane:
        yield plane


# The same tests, their assertions unchanged, against two workers.
test_a_stuck_delta_node_is_closed_by_the_watchdog_and_the_peer_limit_counts_delta_streams = (
    in_process.test_a_stuck_delta_node_is_closed_by_the_watchdog_and_the_peer_limit_counts_delta_streams
)
test_delta_streams_count_in_metrics_and_propagation = in_process.test_delta_streams_count_in_metrics_and_propagation


def slots(cp: ControlPlane) -> dict[str, int]:
    assert cp.workers is not None
    owner = cp.workers.mirror.owner
    return {s.node_key: owner[s.stream_id] for s in cp.nodes.streams() if s.stream_id in owner}


class SotwNode:
    """A state-of-the-world node subscribed to EDS for `web`, ACKing every response."""

    def __init__(self, channel: grpc.aio.Channel, node_id: str, *, ack: bool = True) -> None:
        self.client = AdsClient(base_pb2.Node(id=node_id, cluster="test"))
        self.stream = AdsStream(ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel), self.client)
        self.ack = ack
        self.error: grpc.aio.AioRpcError | None = None
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            await self.stream.send(self.client.subscribe(rs.ENDPOINT, ["web"]))
            while (response := await self.stream.read()) is not None:
                if self.ack:
                    await self.stream.send(self.client.ack(response))
        except grpc.aio.AioRpcError as exc:
            self.error = exc

    async def aclose(self) -> None:
        self.stream.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def nodes_on_both_workers(
    cp: ControlPlane, make: Any, prefix: str, channels: list[grpc.aio.Channel], *, at_most: int = 16
) -> list[Any]:
    """Nodes `prefix-N`, each on its own connection, until both workers hold some."""
    nodes = []
    for i in range(at_most):
        channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{cp.xds_port}", options=OWN_CONNECTION))
        node = make(channels[-1], f"{prefix}-{i}")
        if isinstance(node, DeltaNode):
            await node.start()
        nodes.append(node)
        name = f"{prefix}-{i}"
        await poll_until(lambda name=name: asyncio.sleep(0, _acked(cp, name)), timeout=10, what=f"{name} ACKed")
        on = {slot for node, slot in slots(cp).items() if node.startswith(prefix)}
        if len(nodes) >= 2 and len(on) == 2:
            return nodes
    raise AssertionError(f"{at_most} connections all on one worker")


async def test_the_modelled_delay_holds_responses_on_every_worker() -> None:
    doc = document(propagation={"delays": [{"node": "slow-*", "fixed": "300ms"}]})
    channels: list[grpc.aio.Channel] = []
    async with ControlPlane(parse_topology(doc), workers=2) as cp:
        try:
            slow = await nodes_on_both_workers(cp, DeltaNode, "slow", channels)
            fast = await nodes_on_both_workers(cp, SotwNode, "fast", channels)
            began = time.monotonic()
            cp.set_override("web", "10.0.0.1:8002", HealthStatus.UNHEALTHY, who="test")
            for i in range(len(fast)):
                await poll_until(lambda i=i: asyncio.sleep(0, _acked(cp, f"fast-{i}")), timeout=10, what="fast")
            fast_s = time.monotonic() - began
            for i in range(len(slow)):
                await poll_until(lambda i=i: asyncio.sleep(0, _acked(cp, f"slow-{i}")), timeout=10, what="slow")
            slow_s = time.monotonic() - began
            assert fast_s < 0.3 <= slow_s
            for node in [*slow, *fast]:
                await node.aclose()
        finally:
            for channel in channels:
                await channel.close()


async def test_the_streams_per_peer_limit_holds_across_workers() -> None:
    doc = document(xds={"port": 0, "max_streams_per_peer": 3})
    channels: list[grpc.aio.Channel] = []
    async with ControlPlane(parse_topology(doc), workers=2) as cp:
        assert cp.workers is not None
        try:
            for _ in range(8):
                channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{cp.xds_port}", options=OWN_CONNECTION))
            # No ACKs: gRPC's aio client reports a write that races the server's status as INTERNAL.
            nodes = [SotwNode(channel, f"n-{i}", ack=False) for i, channel in enumerate(channels)]

            async def settled() -> bool:
                ended = [n for n in nodes if n.task.done()]
                return len(ended) == 5 and len(cp.nodes.streams()) == 3

            await poll_until(settled, timeout=10, what="three streams served, five refused")
            codes = collections.Counter(n.error.code() for n in nodes if n.error is not None)
            assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED: 5}, [n.error for n in nodes if n.error]
            details = [n.error.details() or "" for n in nodes if n.error is not None]
            assert all("max_streams_per_peer is 3" in d for d in details), details
            # Each refusal counted once, by the worker that refused it or by the main process (across
            # workers); the workers' counts arrive with their heartbeats.
            pool = cp.workers
            await poll_until(lambda: asyncio.sleep(0, pool.peers.refused == 5), timeout=5, what="5 refusals counted")
            assert len(cp.nodes.streams()) == 3
            for node in nodes:
                await node.aclose()
        finally:
            for channel in channels:
                await channel.close()


async def test_a_stuck_worker_is_replaced_and_its_nodes_served_by_the_others() -> None:
    channels: list[grpc.aio.Channel] = []
    async with ControlPlane(parse_topology(document(xds={"port": 0})), workers=2) as cp:
        assert cp.workers is not None
        cp.workers.stuck_after = 1.0
        try:
            nodes = await nodes_on_both_workers(cp, SotwNode, "n", channels)
            on = slots(cp)
            victim = on["n-0"]
            pid = cp.workers.pids()[victim]
            os.kill(pid, signal.SIGSTOP)  # alive, holding its connections, answering nothing

            async def replaced() -> bool:
                assert cp.workers is not None
                return cp.workers.restarts == 1 and cp.workers.pids().get(victim) not in (None, pid)

            await poll_until(replaced, timeout=15, what="the stuck worker replaced")
            [event] = cp.events.recent(kind="worker")
            assert "stopped answering" in event.fields["why"] and event.fields["slot"] == victim
            assert "no CPU time either" in event.fields["why"]  # stopped, not busy
            async with aiohttp.ClientSession() as session:
                assert await metric(cp, session, "healthplane_xds_worker_restarts_total") == 1
                assert await metric(cp, session, "healthplane_xds_workers") == 2
            # Its nodes' connections were reset with it: they reconnect (a new stream) and are served.
            held = [i for i, node in enumerate(nodes) if on[f"n-{i}"] == victim]
            for i in held:
                await poll_until(lambda i=i: asyncio.sleep(0, nodes[i].task.done()), timeout=10, what=f"n-{i} cut")
                nodes[i] = SotwNode(channels[i], f"n-{i}")
            cp.set_override("web", "10.0.0.1:8000", HealthStatus.UNHEALTHY, who="test")
            for i in range(len(nodes)):
                await poll_until(lambda i=i: asyncio.sleep(0, _acked(cp, f"n-{i}")), timeout=10, what=f"n-{i}")
            for node in nodes:
                await node.aclose()
        finally:
            for channel in channels:
                await channel.close()


async def test_an_oversized_request_is_refused_by_the_worker_naming_the_field() -> None:
    doc = document(xds={"port": 0, "max_message_bytes": 2048})
    async with (
        ControlPlane(parse_topology(doc), workers=2) as cp,
        grpc.aio.insecure_channel(f"127.0.0.1:{cp.xds_port}") as channel,
    ):
        stream = DeltaAdsStream(
            ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel), DeltaAdsClient(base_pb2.Node(id="big"))
        )
        await stream.send(stream.client.subscribe(rs.ENDPOINT, [f"cluster-{i:04d}" for i in range(400)]))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stream.read()
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_message_bytes" in (refused.value.details() or "")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@contextlib.asynccontextmanager
async def serving_on_workers(doc: dict[str, Any], tmp_path: Path) -> AsyncIterator[ControlPlane]:
    """test_security's `serving`, with two xDS workers."""
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(doc))
    cp = ControlPlane(load_topology(path), workers=2)
    await cp.start()
    try:
        yield cp
    finally:
        await cp.aclose(grace=0)


async def test_prober_names_hold_through_the_relay(
    certs: Certs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The prober link's certificate check, its assertions unchanged, with the link relayed by a worker:
    the names are those of the certificate the prober presented to the worker."""
    monkeypatch.setattr(test_security, "serving", serving_on_workers)
    await test_security.test_prober_names_keep_envoy_certificates_off_the_prober_link(certs, tmp_path)


async def test_a_topology_edit_reaches_the_workers_with_its_settings() -> None:
    """A new topology travels with its snapshot: the new cluster reaches a node on a worker, and the
    worker applies the edit's settings (here a modelled delay that did not exist before)."""
    async with (
        ControlPlane(parse_topology(document(xds={"port": 0})), workers=2) as cp,
        grpc.aio.insecure_channel(f"127.0.0.1:{cp.xds_port}") as channel,
    ):
        client = AdsClient(base_pb2.Node(id="slow-1", cluster="test"))
        stream = AdsStream(ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel), client)
        await stream.send(client.subscribe(rs.CLUSTER))
        first = await asyncio.wait_for(stream.read(), 10)
        assert first is not None and len(first.resources) == 1
        await stream.send(client.ack(first))

        edited = document(xds={"port": 0}, propagation={"delays": [{"node": "slow-*", "fixed": "300ms"}]})
        edited["clusters"].append({"name": "api", "endpoints": [{"address": "10.0.0.9", "port": 9000}]})
        began = time.monotonic()
        snapshot = cp.update_topology(parse_topology(edited))
        assert snapshot is not None
        second = await asyncio.wait_for(stream.read(), 10)
        assert second is not None and second.version_info == snapshot.type_versions[rs.CLUSTER]
        assert len(second.resources) == 2
        assert time.monotonic() - began >= 0.3  # held by the delay the edit brought
        stream.cancel()


async def test_the_relayed_services_keep_the_per_peer_limit() -> None:
    async with (
        ControlPlane(parse_topology(document(xds={"port": 0, "max_streams_per_peer": 1})), workers=2) as cp,
        grpc.aio.insecure_channel(f"127.0.0.1:{cp.xds_port}") as channel,
    ):
        stub = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(channel)
        first = stub.StreamClientStatus()
        await first.write(csds_pb2.ClientStatusRequest())
        assert await asyncio.wait_for(first.read(), 10) is not None  # answered by the main process
        second = stub.StreamClientStatus()  # the same connection: the same worker
        await second.write(csds_pb2.ClientStatusRequest())
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(second.read(), 10)
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_streams_per_peer is 1" in (refused.value.details() or "")
        first.cancel()
