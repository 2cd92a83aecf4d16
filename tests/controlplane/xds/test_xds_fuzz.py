"""Bad input on the xDS port: fuzzed DiscoveryRequests, oversized messages, too many streams per peer.

Real gRPC on 127.0.0.1; a well-behaved node holds its stream throughout and must get every push.
"""

from __future__ import annotations

import asyncio
import random
import re
import struct
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.status.v3 import csds_pb2
from envoy.type.matcher.v3 import node_pb2, string_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.app import ControlPlane
from controlplane.health.store import HealthStatus
from controlplane.snapshots import resources as rs
from controlplane.topology.parse import parse_topology
from controlplane.xds.csds import client_status
from tests.controlplane.xds.test_stream import CDS, CheckedStream, Fleet
from tests.controlplane.xds.xds_fuzz import HealthyNode, fuzz, send_input, valid_request

FUZZ_COUNT = 2000
FLEET = Fleet()


def topology(**xds: Any) -> dict[str, Any]:
    return {
        "controlplane": {"xds": {"port": 0, **xds}, "admin": {"port": 0}, "watch_interval": 0},
        "clusters": [{"name": "web", "endpoints": [{"address": "127.0.0.1", "port": 18081 + i} for i in range(3)]}],
        "listeners": [{"name": "ingress", "port": 10000, "routes": [{"cluster": "web"}]}],
    }


class Flipper:
    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self.flips = 0

    def __call__(self) -> str:
        status = HealthStatus.UNHEALTHY if self.flips % 2 == 0 else HealthStatus.HEALTHY
        self.flips += 1
        snap = self.cp.set_override("web", "127.0.0.1:18081", status, who="fuzz")
        assert snap is not None
        return snap.type_versions[rs.ENDPOINT]


async def start(**xds: Any) -> tuple[ControlPlane, grpc.aio.Channel]:
    cp = ControlPlane(parse_topology(topology(**xds), source="test"))
    await cp.start()
    return cp, grpc.aio.insecure_channel(f"127.0.0.1:{cp.xds_port}")


@pytest.fixture
async def served() -> AsyncIterator[tuple[ControlPlane, grpc.aio.Channel, HealthyNode]]:
    cp, channel = await start(max_message_bytes=1 << 20)
    healthy = HealthyNode(channel)
    await healthy.start()
    await healthy.wait_version(cp.snapshot.type_versions[rs.ENDPOINT])
    try:
        yield cp, channel, healthy
    finally:
        await healthy.aclose()
        await channel.close()
        await cp.aclose(grace=0)


async def test_fuzzed_requests_get_a_clear_status_and_the_healthy_node_keeps_its_pushes(
    served: tuple[ControlPlane, grpc.aio.Channel, HealthyNode],
) -> None:
    cp, channel, healthy = served
    report = await fuzz(channel, healthy, Flipper(cp), count=FUZZ_COUNT, seed=7, push_every=50)
    assert report.findings == []
    assert report.inputs == FUZZ_COUNT
    # The generator reaches both sides: inputs the server accepts and inputs it refuses, for each reason.
    assert report.codes["OK"] > 0 and report.codes["INVALID_ARGUMENT"] > 0 and report.codes["RESOURCE_EXHAUSTED"] > 0
    assert report.healthy_pushes == FUZZ_COUNT // 50
    assert healthy.task is not None and not healthy.task.done()
    assert len(cp.ads.streams) == 1  # every fuzzed stream is gone; the healthy one stays
    assert cp.ads.peers.open == {"127.0.0.1": 1}
    exposition = cp.metrics.exposition().decode()
    for code in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"):
        line = f'healthplane_xds_streams_ended_by_server_total{{code="{code}"}} {float(report.codes[code])}'
        assert line in exposition


async def test_fuzzed_delta_requests_get_a_clear_status_and_a_delta_node_keeps_its_pushes() -> None:
    cp, channel = await start(max_message_bytes=1 << 20)
    healthy = HealthyNode(channel, "healthy-delta", delta=True)
    try:
        await healthy.start()
        await healthy.wait_version(cp.snapshot.type_versions[rs.ENDPOINT])
        report = await fuzz(channel, healthy, Flipper(cp), count=FUZZ_COUNT, seed=11, push_every=50, delta=True)
        assert report.findings == []
        assert report.inputs == FUZZ_COUNT
        assert report.codes["OK"] > 0 and report.codes["INVALID_ARGUMENT"] > 0
        assert report.codes["RESOURCE_EXHAUSTED"] > 0
        assert report.healthy_pushes == FUZZ_COUNT // 50
        assert healthy.task is not None and not healthy.task.done()
        assert len(cp.ads.streams) == 1 and cp.ads.streams[min(cp.ads.streams)].protocol == "delta"
        assert cp.ads.peers.open == {"127.0.0.1": 1}
    finally:
        await healthy.aclose()
        await channel.close()
        await cp.aclose(grace=0)


async def test_random_bytes_are_invalid_argument_naming_the_message(
    served: tuple[ControlPlane, grpc.aio.Channel, HealthyNode],
) -> None:
    _, channel, _ = served
    code, details = await send_input(channel, [b"\xff\xff\xff\xff"])
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "DiscoveryRequest does not parse" in details


async def test_a_request_without_node_is_invalid_argument_naming_node(
    served: tuple[ControlPlane, grpc.aio.Channel, HealthyNode],
) -> None:
    _, channel, _ = served
    request = discovery_pb2.DiscoveryRequest(type_url=rs.CLUSTER)
    code, details = await send_input(channel, [request.SerializeToString()])
    assert (code, details) == (grpc.StatusCode.INVALID_ARGUMENT, "the first request on a stream must carry node")


async def test_an_oversized_request_is_resource_exhausted_naming_the_limit(
    served: tuple[ControlPlane, grpc.aio.Channel, HealthyNode],
) -> None:
    _, channel, healthy = served
    request = valid_request(random.Random(1))
    request.resource_names.extend(["x" * 1000] * 1100)  # ~1.1 MB against a 1 MiB limit
    code, details = await send_input(channel, [request.SerializeToString()])
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "controlplane.xds.max_message_bytes (1048576)" in details
    assert healthy.task is not None and not healthy.task.done()


async def test_a_huge_resource_name_list_is_resource_exhausted_naming_the_field(
    served: tuple[ControlPlane, grpc.aio.Channel, HealthyNode],
) -> None:
    _, channel, _ = served
    request = valid_request(random.Random(2))
    request.resource_names.extend(str(i) for i in range(100_001))
    code, details = await send_input(channel, [request.SerializeToString()])
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details.startswith("resource_names lists 10000") and details.endswith("more than 100000 allowed")


async def test_absurd_version_and_nonce_strings_are_refused_naming_the_field(
    served: tuple[ControlPlane, grpc.aio.Channel, HealthyNode],
) -> None:
    _, channel, _ = served
    request = valid_request(random.Random(3))
    request.response_nonce = "9" * 10_000
    code, details = await send_input(channel, [request.SerializeToString()])
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert details.startswith("response_nonce is 10000 characters long")


async def test_streams_beyond_the_per_peer_limit_are_refused_with_resource_exhausted() -> None:
    cp, channel = await start(max_streams_per_peer=2)
    nodes = [HealthyNode(channel, f"n{i}") for i in range(2)]
    try:
        for node in nodes:
            await node.start()
            await node.wait_version(cp.snapshot.type_versions[rs.ENDPOINT])
        code, details = await send_input(channel, [valid_request(random.Random(4)).SerializeToString()])
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details == "127.0.0.1 already holds 2 ADS streams: controlplane.xds.max_streams_per_peer is 2"
        assert cp.ads.peers.refused == 1
        assert "healthplane_xds_streams_refused_per_peer_total 1.0" in cp.metrics.exposition().decode()
        # The two held streams are untouched, and a slot frees up when one closes.
        version = Flipper(cp)()
        for node in nodes:
            await node.wait_version(version)
        await nodes[0].aclose()
        nodes.pop(0)
        code, _ = await send_input(channel, [valid_request(random.Random(5)).SerializeToString()])
        assert code is grpc.StatusCode.OK
    finally:
        for node in nodes:
            await node.aclose()
        await channel.close()
        await cp.aclose(grace=0)


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


async def garbage_connection(port: int, data: bytes) -> None:
    """Write `data` on a raw TCP connection and read until the server closes it (or 5 s pass)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(5):
            while await reader.read(65536):
                pass
    except (TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()


async def test_raw_garbage_on_the_xds_port_leaves_other_streams_alone(
    served: tuple[ControlPlane, grpc.aio.Channel, HealthyNode],
) -> None:
    """Bytes that are not HTTP/2, and HTTP/2 frames that are nonsense, on the raw port (gRPC core's job)."""
    cp, _, healthy = served
    rng = random.Random(11)
    inputs: list[bytes] = []
    for _ in range(40):
        inputs.append(rng.randbytes(rng.randint(1, 2000)))  # not HTTP/2 at all
        frames = b"".join(
            # length (24 bits), type, flags, stream id, payload: random but well-framed
            struct.pack(">I", n := rng.randint(0, 64))[1:]
            + bytes([rng.randrange(12), rng.randrange(256)])
            + struct.pack(">I", rng.randrange(2**31))
            + rng.randbytes(n)
            for _ in range(rng.randint(1, 10))
        )
        inputs.append(PREFACE + frames)
    flip = Flipper(cp)
    for start in range(0, len(inputs), 20):
        await asyncio.gather(*(garbage_connection(cp.xds_port, data) for data in inputs[start : start + 20]))
        await healthy.wait_version(flip())
    assert healthy.task is not None and not healthy.task.done()
    assert len(cp.ads.streams) == 1


# CSDS node matchers (issue 19): regexes built from nested groups, quantifiers and alternations, the
# class of `(.*)*x` that backtracks exponentially. Each must either be refused by name or match as
# RE2 does: the same answer as Python's `re` on short ids (where backtracking is still cheap), and
# an answer at all on long ones (the thread timeout ends the run if matching ever backtracks).
_atom = st.sampled_from(["a", "b", ".", "x", "[ab]", r"\d", "-"])
_regex = st.recursive(
    _atom,
    lambda inner: st.one_of(
        st.tuples(inner, st.sampled_from(["*", "+", "?", "{1,3}", "*?"])).map(lambda t: f"({t[0]}){t[1]}"),
        st.tuples(inner, inner).map("".join),
        st.tuples(inner, inner).map(lambda t: f"({t[0]}|{t[1]})"),
    ),
    max_leaves=8,
)


@pytest.mark.timeout(120, method="thread")
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(regex=_regex, short=st.text(alphabet="abx-1", min_size=1, max_size=6))
def test_csds_node_regexes_match_as_re2_in_linear_time(regex: str, short: str) -> None:
    long_id = "a" * 80 + "-" + "ab" * 40
    states = []
    for node_id in (short, long_id):
        stream = CheckedStream()
        stream.node = base_pb2.Node(id=node_id, cluster="sidecar")
        stream.send(CDS, [])
        states.append(stream.state)
    matcher = node_pb2.NodeMatcher(node_id=string_pb2.StringMatcher(safe_regex={"regex": regex}))
    request = csds_pb2.ClientStatusRequest(node_matchers=[matcher], exclude_resource_contents=True)
    ids = {c.node.id for c in client_status(request, states, [FLEET.snapshot]).config}
    assert (short in ids) == (re.fullmatch(regex, short) is not None)


async def test_prober_link_and_csds_streams_are_limited_per_peer_too() -> None:
    from envoy.service.status.v3 import csds_pb2_grpc

    from healthplane.v1 import prober_pb2, prober_pb2_grpc

    cp, channel = await start(max_streams_per_peer=1)
    try:
        link = prober_pb2_grpc.ProberLinkStub(channel)
        first = link.Report()
        await first.write(prober_pb2.ProberMessage(hello=prober_pb2.Hello(prober_id="a")))
        await first.read()  # the topology: the first stream is held
        second = link.Report()
        await second.write(prober_pb2.ProberMessage(hello=prober_pb2.Hello(prober_id="b")))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await second.read()
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.details() == (
            "127.0.0.1 already holds 1 prober-link streams: controlplane.xds.max_streams_per_peer is 1"
        )
        csds = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(channel)
        one = csds.StreamClientStatus()
        await one.write(csds_pb2.ClientStatusRequest())
        await one.read()
        two = csds.StreamClientStatus()
        await two.write(csds_pb2.ClientStatusRequest())
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await two.read()
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "CSDS streams" in (
            info.value.details() or ""
        )
        # Each kind is counted on its own: the node's one ADS stream is still allowed.
        code, _ = await send_input(channel, [valid_request(random.Random(6)).SerializeToString()])
        assert code is grpc.StatusCode.OK
        first.cancel()
        one.cancel()
    finally:
        await channel.close()
        await cp.aclose(grace=0)


async def test_access_log_streams_are_limited_per_peer_too() -> None:
    from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

    cp, channel = await start(max_streams_per_peer=1)
    try:
        stub = als_pb2_grpc.AccessLogServiceStub(channel)
        message = als_pb2.StreamAccessLogsMessage()
        message.identifier.node.id = "front-1"
        message.http_logs.SetInParent()
        first = stub.StreamAccessLogs()
        await first.write(message)
        await asyncio.sleep(0.2)  # the first stream is held
        second = stub.StreamAccessLogs()
        await second.write(message)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await second
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert info.value.details() == (
            "127.0.0.1 already holds 1 access-log streams: controlplane.xds.max_streams_per_peer is 1"
        )
        assert cp.access_log.peers.open == {"127.0.0.1": 1}
        first.cancel()
    finally:
        await channel.close()
        await cp.aclose(grace=0)
