"""Prober membership from etcd (issue 17): two replicas sharing one real etcd, `healthplane prober`
processes over real gRPC, real backends counting the checks they get.

- Each prober linked to only one replica (p1 -> A, p2 -> B): with the members from etcd both
  replicas still compute the same owners (from their own links they would not: A would see p1
  alone, B p2 alone) and each endpoint is checked once.
- etcd killed: the members come from each replica's own links, with the reason shown, and the
  shares keep working; etcd back: from etcd again.
- A prober killed: its registrations go with its links, its share moves within the staleness
  bound (well inside lease TTL + staleness), and no endpoint flips on either replica.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from controlplane.app import ControlPlane
from controlplane.health.store import HealthStatus
from controlplane.probers.link import live_members
from controlplane.probers.ownership import owners
from controlplane.snapshots.snapshot import Snapshot
from controlplane.topology.parse import load_topology
from lab.demoapp import DemoApp
from lab.envoyproc import poll_until
from lab.etcd import EtcdServer
from tests.conftest import web_topology
from tests.integration.test_central_prober import flip
from tests.integration.test_prober_shards import HEALTH_CHECK as SHARDS_HEALTH_CHECK
from tests.integration.test_prober_shards import (
    INTERVAL,
    STALENESS,
    ProberProcess,
    balanced_ids,
    check_source,
    checks,
)

# As tests/integration/test_prober_shards.py, but three failures in a row to fail: these tests
# watch every snapshot for several seconds, and one slow answer on a loaded machine is no flip.
HEALTH_CHECK = {**SHARDS_HEALTH_CHECK, "unhealthy_threshold": 3}


class Pair:
    """Two control planes (a, b) in this process sharing one etcd prefix, each from its own file."""

    def __init__(self, tmp_path: Path, etcd: EtcdServer) -> None:
        self.tmp_path, self.etcd = tmp_path, etcd
        self.replicas: dict[str, ControlPlane] = {}
        self.probers: list[ProberProcess] = []
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    async def start(self, name: str, document: dict[str, Any]) -> ControlPlane:
        doc = dict(document)
        store = {"etcd": {"endpoints": [self.etcd.endpoint], "prefix": "/hp-members", "timeout": "2s"}}
        doc["controlplane"] = {
            **doc["controlplane"],
            "prober_staleness": f"{STALENESS}s",
            "store": {**store, "replica_id": name},
        }
        path = self.tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc))
        cp = ControlPlane(load_topology(path), config_path=path)
        await cp.start()
        self.replicas[name] = cp
        return cp

    async def prober(self, prober_id: str, *replicas: str) -> ProberProcess:
        prober = ProberProcess(prober_id, *(self.replicas[r].xds_port for r in replicas))
        self.probers.append(prober)
        await prober.start()
        return prober

    async def probers_view(self, name: str) -> dict[str, Any]:
        async with self.session.get(f"http://127.0.0.1:{self.replicas[name].admin_port}/probers") as response:
            assert response.status == 200
            body: dict[str, Any] = await response.json()
            return body

    async def aclose(self) -> None:
        for prober in self.probers:
            await prober.stop()
        for cp in self.replicas.values():
            await cp.aclose()
        await self.session.close()


@pytest.fixture
async def pair(tmp_path: Path, etcd: EtcdServer) -> AsyncIterator[Pair]:
    p = Pair(tmp_path, etcd)
    try:
        yield p
    finally:
        await p.aclose()


async def _true(value: object) -> object:
    return value


async def wait(check: Callable[[], object], what: str, within: float = 15) -> None:
    await poll_until(lambda: _true(check()), timeout=within, what=what)


def members(cp: ControlPlane) -> tuple[tuple[str, ...], str]:
    return cp.prober_link.ownership.members, cp.prober_link.members.source


def rates(backends: list[DemoApp], before: dict[int, int], seconds: float) -> list[float]:
    """Checks per endpoint per interval since `before` (1.0: one prober checks it)."""
    after = checks(backends)
    return [(after[p] - before[p]) * INTERVAL / seconds for p in after]


async def share_moved(
    replicas: tuple[ControlPlane, ...],
    endpoints: list[str],
    sharing: tuple[str, ...],
    gone: str,
    taker: str,
    *,
    since: float,
    within: float,
) -> tuple[float, list[str]]:
    """Wait until every endpoint `gone` owned among `sharing` is checked by `taker` after `since`,
    as every one of `replicas` sees it; the seconds since `since`, and those endpoints."""
    moved = [ep for ep in endpoints if owners(f"web/{ep}", sharing, 1)[0] == gone]
    assert moved
    await wait(
        lambda: all(
            check_source(cp, ep)[0] == f"prober:{taker}" and check_source(cp, ep)[1] > since
            for cp in replicas
            for ep in moved
        ),
        f"{gone}'s share checked by {taker} for every replica",
        within=within,
    )
    return time.time() - since, moved


async def test_probers_linked_to_one_replica_each_share_the_endpoints_by_the_members_in_etcd(
    pair: Pair, ten_backends: list[DemoApp], listener_port: int
) -> None:
    doc = web_topology(ten_backends, listener_port, health_check=HEALTH_CHECK)
    a = await pair.start("a", doc)
    b = await pair.start("b", doc)
    endpoints = [f"127.0.0.1:{x.port}" for x in ten_backends]
    one, two = balanced_ids(endpoints)
    await pair.prober(one, "a")
    await pair.prober(two, "b")

    both = tuple(sorted((one, two)))
    await wait(lambda: members(a) == members(b) == (both, "etcd"), "both replicas: both probers, from etcd")
    # From its own links alone each replica would see one prober, and give it every endpoint.
    assert live_members(list(a.prober_link.probers.values()), STALENESS, time.time()) == [one]
    assert live_members(list(b.prober_link.probers.values()), STALENESS, time.time()) == [two]
    mine = {ep: owners(f"web/{ep}", both, 1)[0] for ep in endpoints}
    assert {ep: a.prober_link.owners("web", ep) for ep in endpoints} == {ep: (mine[ep],) for ep in endpoints}
    assert {ep: b.prober_link.owners("web", ep) for ep in endpoints} == {ep: (mine[ep],) for ep in endpoints}
    # Each prober checks its share only, reporting to the replica it is linked to.
    for cp, prober in ((a, one), (b, two)):
        share = [ep for ep in endpoints if mine[ep] == prober]
        await wait(
            lambda cp=cp, share=share, prober=prober: all(  # type: ignore[misc]
                check_source(cp, ep)[0] == f"prober:{prober}" for ep in share
            ),
            f"{prober}'s share checked",
        )

    before = checks(ten_backends)
    await asyncio.sleep(2.0)
    per_endpoint = rates(ten_backends, before, 2.0)
    assert all(0.5 <= rate <= 1.3 for rate in per_endpoint), per_endpoint  # once each, not twice

    body = await pair.probers_view("a")
    membership = body["membership"]
    assert membership["source"] == "etcd" and membership["reason"] == ""
    assert membership["holders"] == {one: ["a"], two: ["b"]}
    assert membership["not_linked_here"] == [two]
    assert f"{two} share the endpoints" in membership["note"] and "no link to this replica" in membership["note"]
    assert body["shards"]["members"] == list(both)

    # B stops: its lease is revoked, and with it the registration of the prober only B held; A's
    # members drop it and A's prober takes every endpoint.
    await b.aclose()
    await wait(lambda: members(a) == ((one,), "etcd"), f"{two} gone from A's members", 5)
    await wait(lambda: all(check_source(a, ep)[0] == f"prober:{one}" for ep in endpoints), f"{one} checks everything")


async def _two_replicas_and_two_probers_linked_to_both(
    pair: Pair, ten_backends: list[DemoApp], listener_port: int
) -> tuple[ControlPlane, ControlPlane, list[str], tuple[str, str], ProberProcess]:
    """Replicas a and b, probers one and two (half the endpoints each) linked to both, all HEALTHY.

    Returns the replicas, the endpoints, the two prober ids and the second prober (to kill or stop).
    """
    doc = web_topology(ten_backends, listener_port, health_check=HEALTH_CHECK)
    a = await pair.start("a", doc)
    b = await pair.start("b", doc)
    endpoints = [f"127.0.0.1:{x.port}" for x in ten_backends]
    one, two = balanced_ids(endpoints)
    await pair.prober(one, "a", "b")
    second = await pair.prober(two, "a", "b")
    both = tuple(sorted((one, two)))
    await wait(lambda: members(a) == members(b) == (both, "etcd"), "both replicas: both probers, from etcd")
    await wait(
        lambda: all(cp.health.status("web", ep) is HealthStatus.HEALTHY for cp in (a, b) for ep in endpoints),
        "all HEALTHY on both",
    )
    return a, b, endpoints, (one, two), second


async def test_a_hung_probers_share_moves_within_the_staleness_bound(
    pair: Pair, ten_backends: list[DemoApp], listener_port: int
) -> None:
    a, b, endpoints, (one, two), hung = await _two_replicas_and_two_probers_linked_to_both(
        pair, ten_backends, listener_port
    )
    both = tuple(sorted((one, two)))
    assert hung.process is not None
    stopped_at = time.time()
    hung.process.send_signal(signal.SIGSTOP)  # its connections stay open; nothing is sent
    try:
        took, _ = await share_moved((a, b), endpoints, both, two, one, since=stopped_at, within=STALENESS + 3)
        assert members(a) == members(b) == ((one,), "etcd")
        assert took < STALENESS + 2, took  # the bound, the check period (<= 1 s) and a check
        assert all(cp.health.status("web", ep) is HealthStatus.HEALTHY for cp in (a, b) for ep in endpoints)
    finally:
        hung.process.send_signal(signal.SIGCONT)


async def test_etcd_down_members_from_the_links_then_a_killed_probers_share_moves_without_a_flip(
    pair: Pair, etcd: EtcdServer, ten_backends: list[DemoApp], listener_port: int
) -> None:
    a, b, endpoints, (one, two), killed = await _two_replicas_and_two_probers_linked_to_both(
        pair, ten_backends, listener_port
    )
    both = tuple(sorted((one, two)))
    # Each replica's registration of a prober comes back through etcd's watch a moment after the
    # members agree (a replica counts its own links at once): the holders are waited for.
    expected_holders = {one: ["a", "b"], two: ["a", "b"]}

    async def holders_seen() -> dict[str, Any] | None:
        view = await pair.probers_view("b")
        return view if view["membership"]["holders"] == expected_holders else None

    body = await poll_until(holders_seen, timeout=10, what="both replicas as holders of both probers, on b")
    assert body["membership"]["holders"] == expected_holders
    assert body["membership"]["not_linked_here"] == []

    # Every snapshot either replica publishes from here on.
    statuses: dict[str, list[tuple[set[HealthStatus], set[HealthStatus]]]] = {"a": [], "b": []}
    cancels = []
    flipped_port = ten_backends[0].port
    flipped = f"127.0.0.1:{flipped_port}"
    for name, cp in (("a", a), ("b", b)):

        def seen(name: str = name, cp: ControlPlane = cp) -> None:
            snapshot: Snapshot | None = cp.cache.current()
            assert snapshot is not None
            others = {e.status for e in snapshot.endpoints if e.port != flipped_port}
            statuses[name].append((others, {e.status for e in snapshot.endpoints if e.port == flipped_port}))

        cancels.append(cp.cache.subscribe(seen))

    # etcd killed: the members come from each replica's links, saying why; nothing moves.
    await etcd.kill()
    await wait(lambda: all(members(cp) == (both, "local") for cp in (a, b)), "members from the links", 10)
    body = await pair.probers_view("a")
    assert body["membership"]["source"] == "local"
    assert body["membership"]["reason"].startswith("etcd unavailable (")
    assert "members from this replica's own prober links" in body["membership"]["reason"]
    assert body["shards"]["members"] == list(both)
    before = checks(ten_backends)
    await asyncio.sleep(1.5)
    per_endpoint = rates(ten_backends, before, 1.5)
    assert all(0.5 <= rate <= 1.3 for rate in per_endpoint), per_endpoint  # still once each
    # Verdicts need no etcd: a failing backend is UNHEALTHY on both replicas.
    await flip(ten_backends[0], "FAIL")
    await wait(lambda: all(cp.health.status("web", flipped) is HealthStatus.UNHEALTHY for cp in (a, b)), "UNHEALTHY")
    await flip(ten_backends[0], "OK")
    await wait(lambda: all(cp.health.status("web", flipped) is HealthStatus.HEALTHY for cp in (a, b)), "HEALTHY")

    # etcd back: from etcd again.
    await etcd.start()
    await wait(lambda: all(members(cp) == (both, "etcd") for cp in (a, b)), "members from etcd again")

    # The second prober dies (SIGKILL): its links close, both replicas drop its registration,
    # and its share moves to the first on both.
    killed_at = time.time()
    await killed.stop(signal.SIGKILL)
    took, moved = await share_moved((a, b), endpoints, both, two, one, since=killed_at, within=STALENESS)
    assert members(a) == members(b) == ((one,), "etcd")
    before = checks(ten_backends)
    await asyncio.sleep(1.0)
    after = checks(ten_backends)
    assert all(after[int(ep.rsplit(":", 1)[1])] > before[int(ep.rsplit(":", 1)[1])] for ep in moved)
    for cancel in cancels:
        cancel()

    assert took < STALENESS, took
    for name in ("a", "b"):
        # No endpoint flipped: the others HEALTHY throughout, the flipped one only as flipped.
        assert statuses[name] and all(others == {HealthStatus.HEALTHY} for others, _ in statuses[name]), name
    assert all(cp.health.status("web", ep) is HealthStatus.HEALTHY for cp in (a, b) for ep in endpoints)
    # The dead prober's share moved: no staleness alarm for it on either replica.
    for cp in (a, b):
        cp.prober_link.probers[one].last_message_at = time.time() + 10
        cp.check_probers(now=time.time() + 10)
        assert cp.admission.alarms.active("prober_stale") == []
