"""CSDS: per-resource status from the stream records (pure), then a real Envoy and a real gRPC client."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from envoy.admin.v3 import config_dump_shared_pb2 as dump
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc
from envoy.type.matcher.v3 import node_pb2, string_pb2

from controlplane.errors import LimitExceeded, ProtocolError
from controlplane.snapshots.cache import SnapshotCache
from controlplane.snapshots.snapshot import Snapshot
from controlplane.xds.csds import CsdsService, client_config, client_status
from lab.demoapp import DemoApp
from lab.envoyproc import poll_until
from tests.conftest import Lab, web_topology
from tests.controlplane.xds.test_stream import CDS, EDS, CheckedStream, Fleet
from tests.controlplane.xds.xds_fuzz import HealthyNode

RS = dump.ClientResourceStatus
CS = csds_pb2.ConfigStatus


def statuses(config: csds_pb2.ClientConfig) -> dict[tuple[str, str], tuple[str, str]]:
    return {
        (c.type_url.rsplit(".", 1)[-1], c.name): (RS.Name(c.client_status), CS.Name(c.config_status))
        for c in config.generic_xds_configs
    }


def test_requested_then_acked_then_nacked_with_the_error_and_the_config_as_sent() -> None:
    fleet, stream = Fleet(), CheckedStream()
    history: list[Snapshot] = [fleet.snapshot]
    stream.send(CDS, [])
    stream.send(EDS, ["web", "nope"])
    assert statuses(client_config(stream.state, history)) == {
        ("Cluster", "web"): ("REQUESTED", "NOT_SENT"),
        ("Cluster", "api"): ("REQUESTED", "NOT_SENT"),
        ("ClusterLoadAssignment", "web"): ("REQUESTED", "NOT_SENT"),
        ("ClusterLoadAssignment", "nope"): ("DOES_NOT_EXIST", "UNKNOWN"),
    }
    cds, eds = stream.due(fleet.snapshot)
    assert statuses(client_config(stream.state, history))[("Cluster", "web")] == ("REQUESTED", "STALE")
    stream.ack(cds)
    stream.ack(eds)
    stream.ack(stream.due_one(fleet.snapshot))  # after a CDS push the next EDS request gets everything again
    config = client_config(stream.state, history)
    assert statuses(config)[("Cluster", "web")] == ("ACKED", "SYNCED")
    assert statuses(config)[("ClusterLoadAssignment", "web")] == ("ACKED", "SYNCED")
    sent = {c.name: c for c in config.generic_xds_configs if c.type_url == CDS}
    cluster = cluster_pb2.Cluster()
    assert sent["web"].xds_config.Unpack(cluster) and cluster.name == "web"
    assert sent["web"].version_info == fleet.snapshot.version and sent["web"].last_updated.seconds > 0
    good = fleet.snapshot

    history.append(fleet.flip("web", "127.0.0.1:8082"))
    eds = stream.due_one(fleet.snapshot)
    assert statuses(client_config(stream.state, history))[("ClusterLoadAssignment", "web")] == ("REQUESTED", "STALE")
    stream.nack(eds, "bad endpoint")
    config = client_config(stream.state, history)
    assert statuses(config) == {
        ("Cluster", "web"): ("ACKED", "SYNCED"),
        ("Cluster", "api"): ("ACKED", "SYNCED"),
        ("ClusterLoadAssignment", "web"): ("NACKED", "ERROR"),
        ("ClusterLoadAssignment", "nope"): ("DOES_NOT_EXIST", "UNKNOWN"),
    }
    (web,) = [c for c in config.generic_xds_configs if c.type_url == EDS and c.name == "web"]
    assert web.error_state.details == "bad endpoint" and web.error_state.version_info == fleet.snapshot.version
    rejected, running = endpoint_pb2.ClusterLoadAssignment(), endpoint_pb2.ClusterLoadAssignment()
    assert web.error_state.failed_configuration.Unpack(rejected) and web.xds_config.Unpack(running)
    assert [e.health_status for e in rejected.endpoints[0].lb_endpoints] == [0, 2]
    assert running.SerializeToString(deterministic=True) == good.resources[EDS]["web"].serialized
    # Without contents: the statuses alone.
    bare = client_config(stream.state, history, include_contents=False)
    assert statuses(bare) == statuses(config) and not any(c.HasField("xds_config") for c in bare.generic_xds_configs)


def _matcher(**kwargs: Any) -> node_pb2.NodeMatcher:
    return node_pb2.NodeMatcher(node_id=string_pb2.StringMatcher(**kwargs))


@pytest.mark.parametrize(
    ("matcher", "expected"),
    [
        (None, ["front-1", "sidecar-1"]),
        (_matcher(exact="front-1"), ["front-1"]),
        (_matcher(prefix="SIDE", ignore_case=True), ["sidecar-1"]),
        (_matcher(safe_regex={"regex": ".*-1"}), ["front-1", "sidecar-1"]),
        (_matcher(suffix="-2"), []),
    ],
)
def test_node_matchers_pick_nodes(matcher: node_pb2.NodeMatcher | None, expected: list[str]) -> None:
    fleet = Fleet()
    streams = [CheckedStream("sidecar"), CheckedStream("front")]
    for s in streams:
        s.send(CDS, [])
    request = csds_pb2.ClientStatusRequest(node_matchers=[matcher] if matcher is not None else [])
    response = client_status(request, [s.state for s in streams], [fleet.snapshot])
    assert [c.node.id for c in response.config] == expected


def test_metadata_matchers_are_refused_by_name() -> None:
    stream = CheckedStream()
    stream.send(CDS, [])
    matcher = node_pb2.NodeMatcher(node_metadatas=[{"path": [{"key": "a"}], "value": {"null_match": {}}}])
    with pytest.raises(ProtocolError, match="node_metadatas"):
        client_status(csds_pb2.ClientStatusRequest(node_matchers=[matcher]), [stream.state], [Fleet().snapshot])


@pytest.mark.envoy
async def test_real_envoy_status_over_csds_acked_then_nacked(
    lab: Lab, backends: list[DemoApp], listener_port: int
) -> None:
    cp = await lab.start_control_plane(web_topology(backends, listener_port))
    await lab.start_envoy("front-1")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{cp.xds_port}") as channel:
        stub = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(channel)

        async def all_acked() -> dict[tuple[str, str], tuple[str, str]] | None:
            response = await stub.FetchClientStatus(csds_pb2.ClientStatusRequest())
            if len(response.config) != 1:
                return None
            seen = statuses(response.config[0])
            ok = len(seen) == 4 and all(v == ("ACKED", "SYNCED") for v in seen.values())
            return seen if ok else None

        seen = await poll_until(all_acked, timeout=10, what="every resource ACKED in CSDS")
        assert set(seen) == {
            ("Cluster", "web"),
            ("ClusterLoadAssignment", "web"),
            ("Listener", "ingress"),
            ("RouteConfiguration", "ingress"),
        }

        # Valid for the schema, rejected by Envoy: connect_timeout must be > 0.
        lab.write(web_topology(backends, listener_port, envoy={"connect_timeout": "0s"}))
        call = stub.StreamClientStatus()

        async def nacked() -> csds_pb2.ClientConfig.GenericXdsConfig | None:
            await call.write(csds_pb2.ClientStatusRequest(node_matchers=[_matcher(exact="front-1")]))
            response = await call.read()
            (config,) = response.config
            web = next(c for c in config.generic_xds_configs if c.type_url.endswith(".Cluster"))
            return web if web.client_status == RS.NACKED else None

        web = await poll_until(nacked, timeout=10, what="the Cluster NACKED in CSDS")
        await call.done_writing()
        assert "connect_timeout" in web.error_state.details.lower() or "ConnectTimeout" in web.error_state.details
        running, rejected = cluster_pb2.Cluster(), cluster_pb2.Cluster()
        assert web.xds_config.Unpack(running) and web.error_state.failed_configuration.Unpack(rejected)
        assert running.connect_timeout.ToNanoseconds() > 0 and rejected.connect_timeout.ToNanoseconds() == 0
        assert web.config_status == CS.ERROR

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.FetchClientStatus(
                csds_pb2.ClientStatusRequest(node_matchers=[_matcher(safe_regex={"regex": "("})])
            )
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "safe_regex" in (info.value.details() or "")


def _stream_with_id(node_id: str) -> CheckedStream:
    stream = CheckedStream()
    stream.node = base_pb2.Node(id=node_id, cluster="sidecar")
    stream.send(CDS, [])
    return stream


# Python's backtracking `re` takes 2^n steps on these: at 28 characters of node id, seconds; at 64,
# longer than the universe. RE2 is linear. The thread method ends the run if it ever backtracks.
@pytest.mark.timeout(60, method="thread")
@pytest.mark.parametrize("regex", ["(.*)*x", "(a*)*b", "(a|a)*b", "(a+)+$b", "((a?){1,20}a){1,20}b"])
def test_node_id_regexes_match_in_linear_time(regex: str) -> None:
    streams = [_stream_with_id("a" * 64).state, _stream_with_id("sidecar-1").state]
    request = csds_pb2.ClientStatusRequest(node_matchers=[_matcher(safe_regex={"regex": regex})])
    assert client_status(request, streams, [Fleet().snapshot]).config == []


@pytest.mark.parametrize(
    ("regex", "why"),
    [
        (r"(a)\1", "escape"),
        ("(?=a)a", "repetition|missing argument|invalid"),
        ("x{5000}", "repetition"),
        ("a" * 2000, "characters"),
    ],
)
def test_regexes_re2_refuses_are_invalid_argument_naming_safe_regex(regex: str, why: str) -> None:
    """RE2 semantics, as Envoy's safe_regex: backreferences, lookaround and huge programs are refused."""
    request = csds_pb2.ClientStatusRequest(node_matchers=[_matcher(safe_regex={"regex": regex})])
    with pytest.raises(ProtocolError, match=r"node_id\.safe_regex") as info:
        client_status(request, [_stream_with_id("a").state], [Fleet().snapshot])
    assert info.match(why)


def test_an_answer_past_the_size_bound_is_refused_naming_how_to_narrow_it() -> None:
    streams = [_stream_with_id(f"node-{i}").state for i in range(20)]
    one = client_config(streams[0], [Fleet().snapshot]).ByteSize()
    with pytest.raises(LimitExceeded, match="narrow node_matchers or set exclude_resource_contents"):
        client_status(csds_pb2.ClientStatusRequest(), streams, [Fleet().snapshot], max_bytes=one * 5)
    narrowed = csds_pb2.ClientStatusRequest(node_matchers=[_matcher(prefix="node-1")])  # node-1, node-10..19
    assert len(client_status(narrowed, streams, [Fleet().snapshot], max_bytes=one * 12).config) == 11


async def test_a_big_answer_gives_the_event_loop_back_between_nodes() -> None:
    streams = [_stream_with_id(f"node-{i}").state for i in range(50)]
    history = SnapshotCache()
    history.publish(Fleet().snapshot)
    service = CsdsService(lambda: streams, history)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    before = ticks
    response = await service.answer_async(csds_pb2.ClientStatusRequest())
    during = ticks - before
    task.cancel()
    assert len(response.config) == 50
    assert during >= 49  # the loop ran other work between (almost) every node


async def test_csds_over_grpc_refuses_an_oversized_answer_with_resource_exhausted() -> None:
    from controlplane.app import ControlPlane
    from controlplane.topology.parse import parse_topology_text

    cp = ControlPlane(parse_topology_text(CSDS_TOPOLOGY))
    await cp.start()
    try:
        cp.csds.max_bytes = 10  # any node's config is more than this
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{cp.xds_port}")
        node = HealthyNode(channel, "n1")
        await node.start()
        await node.wait_version(cp.snapshot.type_versions[EDS])
        stub = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.FetchClientStatus(csds_pb2.ClientStatusRequest())
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "would exceed 10 bytes" in (info.value.details() or "")
        cp.csds.max_bytes = 1 << 20
        assert [c.node.id for c in (await stub.FetchClientStatus(csds_pb2.ClientStatusRequest())).config] == ["n1"]
        await node.aclose()
        await channel.close()
    finally:
        await cp.aclose(grace=0)


CSDS_TOPOLOGY = """
controlplane: {xds: {port: 0}, admin: {port: 0}, watch_interval: 0}
clusters: [{name: web, endpoints: [{address: 127.0.0.1, port: 18081}]}]
listeners: [{name: ingress, port: 10000, routes: [{cluster: web}]}]
"""
