"""Probers that take a share (issue 17), over real gRPC: who is sent what, whose votes count,
and what happens when a prober leaves."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest

from controlplane.app import ControlPlane
from controlplane.health.store import HealthStatus, Verdict
from controlplane.probers.ownership import owners
from controlplane.topology.parse import parse_topology
from healthplane.v1 import prober_pb2
from lab.envoyproc import poll_until
from prober.link import merge_shares
from tests.controlplane.probers.test_prober_link import Prober

H, U, UNKNOWN = HealthStatus.HEALTHY, HealthStatus.UNHEALTHY, HealthStatus.UNKNOWN
PORTS = list(range(8001, 8013))


def document(replicas: int = 1, staleness: str = "30s") -> dict[str, Any]:
    return {
        "controlplane": {"xds": {"port": 0}, "admin": {"port": 0}, "prober_staleness": staleness},
        "probers": {"replicas": replicas},
        "clusters": [
            {
                "name": "web",
                "endpoints": [{"address": "127.0.0.1", "port": p} for p in PORTS],
                "health_check": {"tcp": {}, "interval": "1s"},
            }
        ],
    }


class SharingProber(Prober):
    """A raw link client that takes a share and keeps the last topology it was sent."""

    def __init__(self, cp: ControlPlane, prober_id: str) -> None:
        super().__init__(cp)
        self.prober_id = prober_id
        self.share: set[int] | None = None
        self.reader: asyncio.Task[None] | None = None

    async def hello(self) -> None:
        await self.send(hello=prober_pb2.Hello(prober_id=self.prober_id, shards=True))
        await self.send(verdicts=prober_pb2.VerdictBatch(full_state=True))
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with_error = (grpc.aio.AioRpcError, asyncio.CancelledError)
        try:
            while (message := await self.call.read()) is not grpc.aio.EOF:
                clusters = json.loads(message.topology.clusters_json)["clusters"]
                self.share = {ep["port"] for c in clusters for ep in c["endpoints"]}
        except with_error:
            pass

    async def vote(self, port: int, status: HealthStatus) -> None:
        v = prober_pb2.Verdict(cluster="web", endpoint=f"127.0.0.1:{port}", status=status.value, reason=self.prober_id)
        await self.send(verdicts=prober_pb2.VerdictBatch(verdicts=[v]))

    async def kill(self) -> None:
        """Gone without ending its stream (a crash): the channel closes under the call."""
        await self.channel.close()
        if self.reader is not None:
            self.reader.cancel()

    async def leave(self) -> None:
        """A clean stop: say goodbye, end the stream, wait for the control plane to end the call."""
        await self.send(goodbye=prober_pb2.Goodbye(reason="test"))
        await self.outbox.put(None)
        if self.reader is not None:
            await asyncio.wait_for(self.reader, 5)
        await self.channel.close()


def owned(prober_id: str, members: list[str], replicas: int = 1) -> set[int]:
    return {p for p in PORTS if prober_id in owners(f"web/127.0.0.1:{p}", members, replicas)}


async def _true(value: object) -> object:
    return value


async def wait(check: Any, what: str, within: float = 10) -> None:
    await poll_until(lambda: _true(check()), timeout=within, what=what)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def test_each_sharing_prober_is_sent_its_share_and_shares_move_with_the_members(
    session: aiohttp.ClientSession,
) -> None:
    async with ControlPlane(parse_topology(document())) as cp:
        a, b = SharingProber(cp, "a"), SharingProber(cp, "b")
        await a.hello()
        await wait(lambda: a.share == set(PORTS), "a alone owns everything")
        await b.hello()
        await wait(lambda: a.share == owned("a", ["a", "b"]) and b.share == owned("b", ["a", "b"]), "split")
        assert a.share and b.share and not (a.share & b.share) and a.share | b.share == set(PORTS)

        # A prober without shards (an older prober) is sent everything and splits nothing.
        legacy = Prober(cp)
        await legacy.send(hello=prober_pb2.Hello(prober_id="legacy"))
        first = await asyncio.wait_for(legacy.call.read(), 5)
        assert len(json.loads(first.topology.clusters_json)["clusters"][0]["endpoints"]) == len(PORTS)
        assert cp.prober_link.ownership.members == ("a", "b")

        async with session.get(f"http://127.0.0.1:{cp.admin_port}/probers") as r:
            body = await r.json()
        assert body["shards"] == {"replicas": 1, "members": ["a", "b"]}
        rows = {p["id"]: p for p in body["remote"]}
        assert (rows["a"]["member"], rows["a"]["owns"], rows["legacy"]["owns"]) == (True, len(a.share), None)
        async with session.get(f"http://127.0.0.1:{cp.admin_port}/endpoints") as r:
            endpoints = (await r.json())["endpoints"]
        assert {e["port"]: e["owners"] for e in endpoints} == {p: ["a"] if p in a.share else ["b"] for p in PORTS}

        await b.leave()
        await wait(lambda: a.share == set(PORTS), "b's share moved to a")
        await a.leave()
        await legacy.aclose()


async def test_two_replicas_per_endpoint_with_three_probers() -> None:
    async with ControlPlane(parse_topology(document(replicas=2))) as cp:
        probers = [SharingProber(cp, name) for name in ("a", "b", "c")]
        for p in probers:
            await p.hello()
        members = ["a", "b", "c"]
        await wait(lambda: all(p.share == owned(p.prober_id, members, 2) for p in probers), "shares of three")
        for port in PORTS:
            assert sum(port in (p.share or ()) for p in probers) == 2
        for p in probers:
            await p.leave()


async def test_a_departed_probers_vote_neither_wins_nor_blocks_and_nothing_flips() -> None:
    async with ControlPlane(parse_topology(document())) as cp:
        a, b = SharingProber(cp, "a"), SharingProber(cp, "b")
        await a.hello()
        await b.hello()
        await wait(lambda: a.share == owned("a", ["a", "b"]) and b.share == owned("b", ["a", "b"]), "split")
        port = min(owned("b", ["a", "b"]))
        ep = f"127.0.0.1:{port}"
        await a.vote(port, H)  # a checks it for nobody: not its endpoint, its vote is not counted
        await b.vote(port, U)
        await wait(lambda: cp.health.status("web", ep) is U, "b's verdict served")
        assert [v.source for v in cp.admission.quorum.votes("web", ep)] == ["prober:b"]

        await b.kill()  # b dies: its share moves to a; the endpoint keeps its last verdict
        await wait(lambda: a.share == set(PORTS), "b's share moved to a")
        version = cp.snapshot.version
        assert cp.health.status("web", ep) is U and cp.admission.quorum.votes("web", ep) == []
        await a.send(verdicts=prober_pb2.VerdictBatch(full_state=True, verdicts=[prober_pb2.Verdict(
            cluster="web", endpoint=ep, status=0)]))  # fmt: skip
        await asyncio.sleep(0.2)
        cp.flush_verdicts()
        assert cp.health.status("web", ep) is U and cp.snapshot.version == version  # no UNKNOWN, no flip

        # a's first real verdict decides alone: b's old vote does not make it a tie.
        await a.vote(port, H)
        await wait(lambda: cp.health.status("web", ep) is H, "a's verdict served")
        assert cp.health.effective("web", ep).source == "prober:a"
        # No staleness alarm for b: its share is a's now (a is heard, b is not).
        cp.prober_link.probers["a"].last_message_at = time.time() + 60
        cp.check_probers(now=time.time() + 60)
        assert cp.admission.alarms.active("prober_stale") == []
        await a.leave()


async def test_staleness_alarms_only_for_a_prober_nobody_took_over_from() -> None:
    async with ControlPlane(parse_topology(document(staleness="5s"))) as cp:
        a, b = SharingProber(cp, "a"), SharingProber(cp, "b")
        await a.hello()
        await b.hello()
        await wait(lambda: cp.prober_link.ownership.members == ("a", "b"), "two members")
        await b.leave()  # a clean stop
        await wait(lambda: not cp.prober_link.probers["b"].connected, "b gone")
        assert cp.prober_link.probers["b"].left
        await a.kill()  # a crashes, and nobody is left to take its share over
        await wait(lambda: not cp.prober_link.probers["a"].connected, "a gone")
        assert not cp.prober_link.probers["a"].left
        cp.check_probers(now=time.time() + 10)
        assert [alarm.subject for alarm in cp.admission.alarms.active("prober_stale")] == ["a"]


async def test_a_connected_prober_silent_past_the_staleness_bound_gives_its_share_up() -> None:
    async with ControlPlane(parse_topology(document(staleness="5s"))) as cp:
        a, b = SharingProber(cp, "a"), SharingProber(cp, "b")
        await a.hello()
        await b.hello()
        await wait(lambda: cp.prober_link.ownership.members == ("a", "b"), "two members")
        cp.prober_link.probers["a"].last_message_at = time.time()
        cp.check_probers(now=time.time() + 6)  # b said nothing for 6 s (a's clock is moved as well)
        assert cp.prober_link.ownership.members == ()  # both silent at that time: nobody shares
        cp.prober_link.probers["a"].last_message_at = time.time() + 6
        cp.check_probers(now=time.time() + 6)
        assert cp.prober_link.ownership.members == ("a",)
        await wait(lambda: a.share == set(PORTS), "b's share moved to a")
        assert cp.admission.alarms.active("prober_stale") == []  # b's share is a's: no alarm
        await b.send(verdicts=prober_pb2.VerdictBatch())  # b speaks again: back in
        await wait(lambda: cp.prober_link.ownership.members == ("a", "b"), "b back")
        await wait(lambda: b.share == owned("b", ["a", "b"]), "b's share back")
        await a.leave()
        await b.leave()


def test_quorum_counts_only_eligible_votes_and_unknown_is_no_vote_with_shards() -> None:
    cp = ControlPlane(parse_topology(document()))
    ep = "127.0.0.1:8001"
    cp.submit_verdicts([Verdict("web", ep, U, "b", source="prober:b")])
    cp.admission.on_ownership(lambda v: v.source != "prober:b")
    assert cp.admission.quorum.votes("web", ep) == []
    assert cp.submit_verdicts([Verdict("web", ep, H, "b", source="prober:b")]) is None
    assert cp.submit_verdicts([Verdict("web", ep, UNKNOWN, "a", source="prober:a")]) is None
    assert cp.health.status("web", ep) is U
    assert cp.submit_verdicts([Verdict("web", ep, H, "a", source="prober:a")]) is not None
    assert cp.health.status("web", ep) is H


def test_merge_shares_is_the_union_with_each_endpoint_once() -> None:
    one = parse_topology({"clusters": [{"name": "web", "endpoints": [{"address": "10.0.0.1", "port": 1}]}]})
    two = parse_topology(
        {
            "clusters": [
                {"name": "web", "endpoints": [{"address": "10.0.0.1", "port": 1}, {"address": "10.0.0.2", "port": 1}]},
                {"name": "api", "endpoints": [{"address": "10.0.0.3", "port": 1}]},
            ]
        }
    )
    merged = merge_shares([one, two])
    assert {c.name: [e.key for e in c.endpoints] for c in merged.clusters} == {
        "web": ["10.0.0.1:1", "10.0.0.2:1"],
        "api": ["10.0.0.3:1"],
    }
    assert merge_shares([]).clusters == ()


async def test_a_new_share_gets_the_verdicts_the_prober_already_has() -> None:
    """A replica that starts counting a prober's votes for an endpoint gets its current verdict at once."""
    from prober.link import ControlPlaneLink

    class Known:
        def update_topology(self, topology: Any) -> Any:
            return None

        def current_verdicts(self) -> list[Verdict]:
            return [Verdict("web", f"127.0.0.1:{p}", U, "known", source="prober:x") for p in PORTS]

        def endpoints(self) -> list[tuple[str, str]]:
            return []

        def endpoint(self, cluster: str, endpoint: str) -> None:
            return None

    doc = document()
    doc["controlplane"]["mass_failure"] = {"share": 1.0}  # every endpoint UNHEALTHY here, on purpose
    async with ControlPlane(parse_topology(doc)) as cp:
        link = ControlPlaneLink(f"127.0.0.1:{cp.xds_port}", Known(), prober_id="x", backoff_base=0.05)  # type: ignore[arg-type]
        other = SharingProber(cp, "y")
        await other.hello()
        task = asyncio.create_task(link.run())
        await wait(lambda: cp.prober_link.ownership.members == ("x", "y"), "x and y share")
        await other.kill()  # x's share grows: x sends what it knows of its new endpoints
        mine = owned("y", ["x", "y"])
        await wait(
            lambda: all(cp.health.status("web", f"127.0.0.1:{p}") is U for p in mine), "x's verdicts of y's share"
        )
        await link.leave()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        assert cp.prober_link.probers["x"].left


class SlowControlPlane:
    """A real gRPC server on the prober link that takes the hello and then never reads again."""

    def __init__(self) -> None:
        self.server = grpc.aio.server()
        self.hello = asyncio.Event()
        handler = grpc.method_handlers_generic_handler(
            "healthplane.v1.ProberLink",
            {
                "Report": grpc.stream_stream_rpc_method_handler(
                    self.report,
                    request_deserializer=prober_pb2.ProberMessage.FromString,
                    response_serializer=prober_pb2.ControlPlaneMessage.SerializeToString,
                )
            },
        )
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    async def report(self, requests: Any, context: Any) -> None:
        await context.read()
        self.hello.set()
        await asyncio.sleep(3600)  # a replica stuck: nothing read, nothing written


async def test_a_replica_that_stops_reading_delays_nothing_for_the_others() -> None:
    from prober.link import ControlPlaneLinks

    class Nothing:
        def update_topology(self, topology: Any) -> Any:
            return None

        def current_verdicts(self) -> list[Verdict]:
            return []

        def endpoints(self) -> list[tuple[str, str]]:
            return []

        def endpoint(self, cluster: str, endpoint: str) -> None:
            return None

    slow = SlowControlPlane()
    await slow.server.start()
    doc = document()
    doc["controlplane"]["mass_failure"] = {"share": 1.0}
    async with ControlPlane(parse_topology(doc)) as cp:
        links = ControlPlaneLinks(
            [f"127.0.0.1:{slow.port}", f"127.0.0.1:{cp.xds_port}"],
            Nothing(),
            prober_id="x",
            max_queued=4,  # type: ignore[arg-type]
        )
        task = asyncio.create_task(links.run())
        await asyncio.wait_for(slow.hello.wait(), 10)
        await wait(lambda: cp.prober_link.ownership.members == ("x",), "x linked to the fast replica")
        # Enough bytes for the stuck stream's HTTP/2 window many times over: each verdict names
        # an endpoint of its own with a 1 KB reason (the fast replica drops unknown endpoints).
        reason = "r" * 1000
        for _ in range(5):
            for i in range(2000):
                await links.on_verdict(Verdict("web", f"10.9.{i // 250}.{i % 250}:80", U, reason, source="prober:x"))
            await asyncio.sleep(0.05)
        status = [U, H]
        for round_ in range(4):  # the real endpoints flip; the fast replica follows each time
            for port in PORTS:
                await links.on_verdict(
                    Verdict("web", f"127.0.0.1:{port}", status[round_ % 2], "flip", source="prober:x")
                )
            await wait(
                lambda r=round_: all(cp.health.status("web", f"127.0.0.1:{p}") is status[r % 2] for p in PORTS),
                f"round {round_} at the fast replica",
                within=5,
            )
        stuck = links.links[0]
        # Its queue is full and stays at the bound; what it has not taken waits as the latest
        # verdict per endpoint (coalesced), or in the one batch its sender holds.
        assert stuck._outbox_now is not None and stuck._outbox_now.qsize() == 4
        assert len(stuck._verdicts) <= 2000 + len(PORTS)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await slow.server.stop(None)


def test_a_share_handed_over_does_not_announce_a_configured_initial_status_over_the_served_verdict() -> None:
    from controlplane.probers.link import share_message

    doc = document()
    doc["clusters"][0]["health_check"]["initial_status"] = "healthy"
    topology = parse_topology(doc)
    served = {f"127.0.0.1:{PORTS[0]}": U, f"127.0.0.1:{PORTS[1]}": H}
    message = share_message(
        topology, "v1", lambda c, e: e != f"127.0.0.1:{PORTS[2]}", lambda c, e: served.get(e, UNKNOWN)
    )
    sent = parse_topology(json.loads(message.topology.clusters_json))
    initial = {e.port: e.health_check.initial_status for e in sent.clusters[0].endpoints if e.health_check}
    # Served UNHEALTHY or HEALTHY: the new owner starts from nothing and its checks decide; an
    # endpoint nobody has a verdict for yet is announced as configured. Not in the share: not sent.
    assert initial == {PORTS[0]: "unknown", PORTS[1]: "unknown", **dict.fromkeys(PORTS[3:], "healthy")}
