"""The access-log service over a real gRPC socket (issue 15): entries in, passive verdicts out;
malformed or hostile streams closed with a clear INVALID_ARGUMENT, nothing else affected."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2

from controlplane.app import ControlPlane
from controlplane.health.passive import Failure
from controlplane.probers.accesslog import MAX_ENTRIES, SERVICE, failure_of
from controlplane.topology.parse import parse_topology

DOCUMENT: dict[str, Any] = {
    "controlplane": {"xds": {"port": 0}, "admin": {"port": 0}},
    "clusters": [
        {
            "name": "web",
            "endpoints": [{"address": "127.0.0.1", "port": p} for p in (8081, 8082, 8083)],
            "passive": {"unhealthy": {"http_statuses": [500], "http_failures": 3}},
        },
        {"name": "plain", "endpoints": [{"address": "127.0.0.1", "port": 9000}]},
    ],
}


@pytest.fixture
async def cp() -> AsyncIterator[ControlPlane]:
    async with ControlPlane(parse_topology(DOCUMENT)) as cp:
        yield cp


def entry(port: int, status: int, cluster: str = "web", **flags: bool) -> accesslog_pb2.HTTPAccessLogEntry:
    e = accesslog_pb2.HTTPAccessLogEntry()
    e.common_properties.upstream_cluster = cluster
    e.common_properties.upstream_remote_address.socket_address.address = "127.0.0.1"
    e.common_properties.upstream_remote_address.socket_address.port_value = port
    for name, value in flags.items():
        setattr(e.common_properties.response_flags, name, value)
    e.response.response_code.value = status
    return e


def message(entries: Sequence[accesslog_pb2.HTTPAccessLogEntry], node: str = "") -> bytes:
    m = als_pb2.StreamAccessLogsMessage()
    if node:
        m.identifier.node.id = node
        m.identifier.log_name = "healthplane_passive"
    m.http_logs.log_entry.extend(entries)
    return m.SerializeToString()


class Stream:
    """A raw client stream of StreamAccessLogs: bytes as given, so garbage can be sent too."""

    def __init__(self, cp: ControlPlane) -> None:
        self.channel = grpc.aio.insecure_channel(
            f"127.0.0.1:{cp.xds_port}", options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
        )
        self.outbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        method = self.channel.stream_unary(f"/{SERVICE}/StreamAccessLogs")
        self.call = method(self._requests())

    async def _requests(self) -> AsyncIterator[bytes]:
        while (raw := await self.outbox.get()) is not None:
            yield raw

    async def send(self, raw: bytes) -> None:
        await self.outbox.put(raw)

    async def error(self) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await asyncio.wait_for(self.call, 10)
        return info.value

    async def aclose(self) -> None:
        await self.outbox.put(None)
        await self.channel.close()


async def rejected(cp: ControlPlane, *raws: bytes) -> str:
    stream = Stream(cp)
    try:
        for raw in raws:
            await stream.send(raw)
        error = await stream.error()
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, error
        return str(error.details())
    finally:
        await stream.aclose()


async def until(check: Any) -> None:
    for _ in range(200):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in 2 s")


async def test_entries_from_two_envoys_eject_through_the_admission(cp: ControlPlane) -> None:
    one, two = Stream(cp), Stream(cp)
    try:
        await one.send(message([entry(8081, 500), entry(8082, 200)], node="front-1"))
        await two.send(message([entry(8081, 500)], node="front-2"))
        await until(lambda: cp.access_log.entries["counted"] == 3)
        assert cp.health.status("web", "127.0.0.1:8081").name == "UNKNOWN"
        await one.send(message([entry(8081, 500)]))  # later messages carry no identifier
        await until(lambda: cp.health.status("web", "127.0.0.1:8081").name == "UNHEALTHY")
        health = cp.health.effective("web", "127.0.0.1:8081")
        assert health.source == "passive"
        assert "3 consecutive HTTP failures (500 x3) seen by front-1 (2), front-2 (1)" in health.reason
        assert [e.status.name for e in cp.snapshot.endpoints if e.port == 8081] == ["UNHEALTHY"]
    finally:
        await one.aclose()
        await two.aclose()


async def test_entries_of_other_clusters_and_endpoints_are_skipped(cp: ControlPlane) -> None:
    stream = Stream(cp)
    try:
        no_host = entry(0, 503, cluster="web", no_healthy_upstream=True)
        await stream.send(
            message([entry(9000, 500, cluster="plain"), entry(9999, 500), no_host, entry(8081, 200)], "n")
        )
        await until(lambda: cp.access_log.entries["counted"] == 1)
        assert cp.access_log.entries["not_passive"] == 1 and cp.access_log.entries["unknown_endpoint"] == 2
    finally:
        await stream.aclose()


@pytest.mark.parametrize(
    ("raws", "details"),
    [
        ([b"\xff\xff\xff garbage"], "access log: not a StreamAccessLogsMessage (11 bytes)"),
        ([message([entry(8081, 500)])], "access log: the first message must carry identifier.node.id"),
        (
            [message([entry(8081, 500)] * (MAX_ENTRIES + 1), "n")],
            f"at most {MAX_ENTRIES} entries, got {MAX_ENTRIES + 1}",
        ),
        (
            [message([entry(8081, 200)], "n"), message([entry(8081, 500, "nope")])],
            "log_entry[0]: no cluster named 'nope'",
        ),
        (
            [als_pb2.StreamAccessLogsMessage(identifier={"node": {"id": "n"}}, tcp_logs={}).SerializeToString()],
            "TCP access logs are not taken",
        ),
    ],
    ids=["garbage", "no-node", "huge-batch", "unknown-cluster", "tcp-logs"],
)
async def test_hostile_streams_get_invalid_argument_and_others_carry_on(
    cp: ControlPlane, raws: list[bytes], details: str
) -> None:
    good = Stream(cp)
    try:
        await good.send(message([entry(8082, 500)], node="front-1"))
        await until(lambda: cp.access_log.entries["counted"] == 1)
        assert details in await rejected(cp, *raws)
        assert cp.access_log.rejected_streams == 1
        assert [e.kind for e in cp.events.recent(5, kind="accesslog")] == ["accesslog"]
        await good.send(message([entry(8082, 500), entry(8082, 500)]))  # the good stream is still open
        await until(lambda: cp.health.status("web", "127.0.0.1:8082").name == "UNHEALTHY")
        assert cp.health.status("web", "127.0.0.1:8081").name == "UNKNOWN"  # nothing the hostile one sent counted
    finally:
        await good.aclose()


def test_response_flags_map_to_failure_kinds() -> None:
    flags = accesslog_pb2.ResponseFlags
    assert failure_of(flags()) is None
    assert failure_of(flags(upstream_request_timeout=True)) is Failure.TIMEOUT
    for name in ("upstream_connection_failure", "upstream_connection_termination", "upstream_remote_reset"):
        assert failure_of(flags(**{name: True})) is Failure.TCP
    assert failure_of(flags(no_route_found=True)) is None
