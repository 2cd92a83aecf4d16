"""The prober link over a real gRPC connection: hello, topology, verdicts, protocol errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from controlplane.app import ControlPlane
from controlplane.health.store import HealthStatus
from controlplane.topology.parse import parse_topology
from healthplane.v1 import prober_pb2, prober_pb2_grpc
from lab.envoyproc import poll_until

DOCUMENT: dict[str, Any] = {
    "controlplane": {"xds": {"port": 0}, "admin": {"port": 0}},
    "clusters": [
        {
            "name": "web",
            "endpoints": [{"address": "127.0.0.1", "port": 8081}, {"address": "127.0.0.1", "port": 8082}],
            "health_check": {"http": {"path": "/livez"}, "interval": "1s", "timeout": "500ms"},
        }
    ],
}


@pytest.fixture
async def cp() -> AsyncIterator[ControlPlane]:
    async with ControlPlane(parse_topology(DOCUMENT)) as cp:
        yield cp


class Prober:
    """A raw client of the link: what a prober sends, message by message."""

    def __init__(self, cp: ControlPlane) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{cp.xds_port}")
        self.outbox: asyncio.Queue[prober_pb2.ProberMessage | None] = asyncio.Queue()
        self.call = prober_pb2_grpc.ProberLinkStub(self.channel).Report(self._requests())

    async def _requests(self) -> AsyncIterator[prober_pb2.ProberMessage]:
        while (message := await self.outbox.get()) is not None:
            yield message

    async def send(self, **message: Any) -> None:
        await self.outbox.put(prober_pb2.ProberMessage(**message))

    async def aclose(self) -> None:
        await self.outbox.put(None)
        await self.channel.close()


def verdict(port: int, status: int, reason: str = "") -> prober_pb2.Verdict:
    return prober_pb2.Verdict(cluster="web", endpoint=f"127.0.0.1:{port}", status=status, reason=reason)


async def test_prober_gets_topology_and_its_verdicts_drive_eds(cp: ControlPlane) -> None:
    prober = Prober(cp)
    try:
        await prober.send(hello=prober_pb2.Hello(prober_id="p1", version="test"))
        message = await prober.call.read()
        clusters = json.loads(message.topology.clusters_json)["clusters"]
        assert [c["name"] for c in clusters] == ["web"]
        assert clusters[0]["health_check"]["http"]["path"] == "/livez"

        await prober.send(
            verdicts=prober_pb2.VerdictBatch(
                full_state=True,
                verdicts=[
                    verdict(8081, prober_pb2.HEALTHY),
                    verdict(8082, prober_pb2.UNHEALTHY, "http 506"),
                ],
            )
        )

        async def applied() -> bool:
            return cp.health.status("web", "127.0.0.1:8082") is HealthStatus.UNHEALTHY

        await poll_until(applied, timeout=5, what="verdicts applied")
        health = cp.health.effective("web", "127.0.0.1:8082")
        assert health.reason == "http 506" and health.source == "prober:p1"
        assert cp.snapshot.cause.kind == "verdict"
        assert cp.prober_link.probers["p1"].full_state_at is not None

        # A topology edit reaches the connected prober.
        cp.update_topology(parse_topology({**DOCUMENT, "clusters": [*DOCUMENT["clusters"], {"name": "api"}]}))
        message = await asyncio.wait_for(prober.call.read(), 5)
        assert [c["name"] for c in json.loads(message.topology.clusters_json)["clusters"]] == ["web", "api"]
    finally:
        await prober.aclose()

    async def disconnected() -> bool:
        return not cp.prober_link.probers["p1"].connected

    await poll_until(disconnected, timeout=5, what="prober marked disconnected")
    # Verdicts outlive the prober's connection.
    assert cp.health.status("web", "127.0.0.1:8082") is HealthStatus.UNHEALTHY


@pytest.mark.parametrize(
    ("first", "second", "error"),
    [
        ({"verdicts": prober_pb2.VerdictBatch()}, None, "the first message must be hello"),
        ({"hello": prober_pb2.Hello(prober_id="")}, None, "the first message must be hello"),
        ({"hello": prober_pb2.Hello(prober_id="p")}, {"hello": prober_pb2.Hello(prober_id="p")}, "only verdicts"),
        (
            {"hello": prober_pb2.Hello(prober_id="p")},
            {"verdicts": prober_pb2.VerdictBatch(verdicts=[prober_pb2.Verdict(cluster="web", endpoint="x")])},
            "verdicts[0]: needs cluster and endpoint",
        ),
        (
            {"hello": prober_pb2.Hello(prober_id="p")},
            {"verdicts": prober_pb2.VerdictBatch(verdicts=[verdict(8081, 42)])},
            "verdicts[0].status: unknown value 42",
        ),
    ],
)
async def test_protocol_errors_close_the_stream_with_invalid_argument(
    cp: ControlPlane, first: dict[str, Any], second: dict[str, Any] | None, error: str
) -> None:
    version = cp.snapshot.version
    prober = Prober(cp)
    try:
        await prober.send(**first)
        if second is not None:
            await prober.send(**second)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            while True:  # the topology may come first; then the stream must fail
                message = await asyncio.wait_for(prober.call.read(), 5)
                assert message is not grpc.aio.EOF, "the stream ended without an error"
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert error in (info.value.details() or "")
    finally:
        await prober.aclose()
    assert cp.snapshot.version == version
