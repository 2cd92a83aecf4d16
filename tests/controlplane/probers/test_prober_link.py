"""The prober link over a real gRPC connection: hello, topology, verdicts, protocol errors."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest

from controlplane.app import ControlPlane
from controlplane.errors import ConfigError
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


# --------------------------------------------------------------------------- issue 19: who holds readiness


async def _readyz(cp: ControlPlane) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{cp.admin_port}/readyz") as r:
        return r.status, await r.json()


async def _hello_and_leave(cp: ControlPlane, prober_id: str) -> None:
    stranger = Prober(cp)
    await stranger.send(hello=prober_pb2.Hello(prober_id=prober_id))
    await stranger.call.read()  # the topology: the control plane took the hello
    await stranger.aclose()

    async def gone() -> bool:
        record = cp.prober_link.probers.get(prober_id)
        return record is not None and not record.connected

    await poll_until(gone, timeout=10, what=f"{prober_id} disconnected")


async def test_a_link_client_that_says_hello_and_leaves_does_not_take_an_embedded_prober_out_of_service() -> None:
    from prober.embedded import attach_embedded_prober

    doc = copy.deepcopy(DOCUMENT)
    doc["clusters"][0]["endpoints"] = [{"address": "127.0.0.1", "port": 9}]  # refused: checked at once
    doc["clusters"][0]["health_check"] = {"tcp": {}, "interval": "200ms", "timeout": "100ms"}
    cp = ControlPlane(parse_topology(doc))
    attach_embedded_prober(cp)
    async with cp:

        async def ready() -> bool:
            return (await _readyz(cp))[0] == 200

        await poll_until(ready, timeout=15, what="ready on the embedded prober's first round")
        await _hello_and_leave(cp, "stranger")
        cp.check_probers(now=time.time() + 3600)  # long silent: its alarm is raised...
        assert [a.subject for a in cp.admission.alarms.active("prober_stale")] == ["stranger"]
        assert (await _readyz(cp))[0] == 200  # ...and it does not decide readiness


async def test_with_remote_probers_only_one_current_prober_makes_ready_whoever_else_connects(cp: ControlPlane) -> None:
    real = Prober(cp)
    try:
        await real.send(hello=prober_pb2.Hello(prober_id="real"))
        await real.send(verdicts=prober_pb2.VerdictBatch(full_state=True, verdicts=[verdict(8081, 1)]))

        async def full() -> bool:
            r = cp.prober_link.probers.get("real")
            return r is not None and r.full_state_at is not None

        await poll_until(full, timeout=10, what="the real prober's full state")
        assert (await _readyz(cp))[0] == 200
        await _hello_and_leave(cp, "stranger")
        assert (await _readyz(cp))[0] == 200
        stranger = cp.prober_link.probers["stranger"]
        cp.check_probers(now=stranger.connected_at + 3600)  # both silent that long: both stale
        code, body = await _readyz(cp)
        assert code == 503 and any("prober real" in w for w in body["waiting_for"])
        cp.prober_link.probers["real"].last_message_at = stranger.connected_at + 3600  # real reports again
        cp.check_probers(now=stranger.connected_at + 3600)
        assert (await _readyz(cp))[0] == 200
    finally:
        await real.aclose()


async def test_a_second_connection_with_a_connected_id_is_refused_and_the_first_keeps_its_record(
    cp: ControlPlane,
) -> None:
    first, twin = Prober(cp), Prober(cp)
    try:
        await first.send(hello=prober_pb2.Hello(prober_id="twin"))
        await first.call.read()
        record = cp.prober_link.probers["twin"]
        await twin.send(hello=prober_pb2.Hello(prober_id="twin"))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await twin.call.read()
        assert info.value.code() is grpc.StatusCode.ALREADY_EXISTS
        assert "prober id 'twin' is already connected" in (info.value.details() or "")
        assert cp.prober_link.probers["twin"] is record and record.connected
        assert cp.prober_link.refused_duplicates == 1
        # Forgetting it is refused while the first is connected (DELETE /probers/twin: 409).
        with pytest.raises(ConfigError, match="is connected"):
            cp.forget_prober("twin", who="test")
        # The first one's verdicts still count, as its own.
        await first.send(verdicts=prober_pb2.VerdictBatch(full_state=True, verdicts=[verdict(8081, 2, "refused")]))

        async def applied() -> bool:
            return cp.health.status("web", "127.0.0.1:8081") is HealthStatus.UNHEALTHY

        await poll_until(applied, timeout=10, what="the first prober's verdict")
    finally:
        await twin.aclose()
        await first.aclose()


@pytest.mark.parametrize(("stamp", "expected"), [(0, "floor"), (1, "floor"), (2**40, "now"), (-5, "floor")])
def test_verdict_times_are_clamped_to_the_last_day(stamp: int, expected: str) -> None:
    from controlplane.probers.link import MAX_VERDICT_AGE, verdicts_from_batch

    now = 1_800_000_000.0
    v = verdict(8081, 1)
    v.time.seconds = stamp
    v.time.nanos = 1 if stamp == 0 else 0  # a zero timestamp means "unset" (now); this one is set
    (out,) = verdicts_from_batch(prober_pb2.VerdictBatch(verdicts=[v]), "prober:p", now)
    assert out.time == (now - MAX_VERDICT_AGE if expected == "floor" else now)
    v.time.seconds, v.time.nanos = int(now) - 30, 0  # a plausible time is kept as it is
    (out,) = verdicts_from_batch(prober_pb2.VerdictBatch(verdicts=[v]), "prober:p", now)
    assert out.time == now - 30


async def test_check_states_of_unknown_endpoints_are_dropped_and_events_per_batch_are_bounded(cp: ControlPlane) -> None:
    from controlplane.probers.link import MAX_EVENTS_PER_BATCH

    prober = Prober(cp)
    try:
        await prober.send(hello=prober_pb2.Hello(prober_id="p1"))
        await prober.call.read()
        states = [prober_pb2.CheckState(cluster="web", endpoint=f"10.9.{i // 250}.{i % 250}:1") for i in range(5000)]
        states.append(prober_pb2.CheckState(cluster="web", endpoint="127.0.0.1:8081", check="tcp"))
        events = [
            prober_pb2.ProbeEvent(cluster="web", endpoint="127.0.0.1:8081", old_status=1, new_status=2, reason=f"r{i}")
            for i in range(5000)
        ]
        before = len(cp.events.recent(10_000, kind="probe"))
        await prober.send(verdicts=prober_pb2.VerdictBatch(full_state=True, checks=states, events=events))

        async def received() -> bool:
            r = cp.prober_link.probers["p1"]
            return r.full_state_at is not None

        await poll_until(received, timeout=10, what="the batch")
        assert set(cp.prober_link.checks) == {("web", "127.0.0.1:8081")}
        probe_events = cp.events.recent(10_000, kind="probe")[before:]
        assert len(probe_events) == MAX_EVENTS_PER_BATCH + 1
        assert "4900 more probe events" in probe_events[-1].message
    finally:
        await prober.aclose()
