"""EtcdStore against a real etcd: seeding once, a compacted revision means a full reload, the
local file gives only a replica's own settings. Control planes run in this process, no Envoy."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from controlplane.app import ControlPlane
from controlplane.errors import StoreUnavailable
from controlplane.health.store import HealthStatus, Verdict
from controlplane.store.changes import OverrideChange
from controlplane.store.etcd import EtcdStore, connect
from controlplane.topology.parse import load_topology
from healthplane.v1 import prober_pb2
from lab.envoyproc import poll_until
from lab.etcd import EtcdCluster, EtcdServer
from tests.controlplane.probers.test_prober_link import Prober
from tests.controlplane.probers.test_prober_shards import SharingProber


def document(etcd: EtcdServer | EtcdCluster, name: str, *ports: int) -> dict[str, Any]:
    endpoints = etcd.endpoints if isinstance(etcd, EtcdCluster) else [etcd.endpoint]
    return {
        "controlplane": {
            "xds": {"port": 0},
            "admin": {"port": 0},
            "watch_interval": "50ms",
            "store": {"replica_id": name, "etcd": {"endpoints": endpoints, "prefix": "/t", "timeout": "2s"}},
        },
        "clusters": [{"name": "web", "endpoints": [{"address": "127.0.0.1", "port": p} for p in ports]}],
    }


class Replicas:
    def __init__(self, tmp_path: Path, etcd: EtcdServer | EtcdCluster) -> None:
        self.tmp_path, self.etcd = tmp_path, etcd
        self.started: list[ControlPlane] = []

    def write(self, name: str, *ports: int) -> Path:
        path = self.tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(document(self.etcd, name, *ports)))
        return path

    def make(self, name: str, *ports: int) -> ControlPlane:
        path = self.write(name, *ports)
        cp = ControlPlane(load_topology(path), config_path=path)
        self.started.append(cp)
        return cp


@pytest.fixture
async def replicas(tmp_path: Path, etcd: EtcdServer) -> AsyncIterator[Replicas]:
    r = Replicas(tmp_path, etcd)
    try:
        yield r
    finally:
        for cp in r.started:
            await cp.aclose()


def ports(cp: ControlPlane) -> list[int]:
    return [e.port for e in cp.topology.clusters[0].endpoints]


async def eventually(condition: Callable[[], bool], what: str) -> None:
    async def probe() -> bool:
        return condition()

    await poll_until(probe, timeout=10, what=what)


async def test_two_replicas_starting_together_seed_once(replicas: Replicas) -> None:
    a, b = replicas.make("a", 1001), replicas.make("b", 1002, 1003)
    await asyncio.gather(a.start(), b.start())
    assert ports(a) == ports(b) and ports(a) in ([1001], [1002, 1003])
    seeded = [e for cp in (a, b) for e in cp.events if e.kind == "store" and "seeded" in e.message]
    assert len(seeded) == 1


async def test_a_compacted_revision_means_a_full_reload(replicas: Replicas, etcd: EtcdServer) -> None:
    a, b = replicas.make("a", 1001, 1002), replicas.make("b", 1001, 1002)
    await a.start()
    await b.start()
    store = a.store
    assert isinstance(store, EtcdStore)
    before = store.reloads
    await store.aclose()  # A stops watching (as if cut off) ...
    # ... while B pins both endpoints, one after the other, and etcd compacts those revisions away.
    await b.store.submit(OverrideChange("web", "127.0.0.1:1001", HealthStatus.UNHEALTHY, "bob"))
    await b.store.submit(OverrideChange("web", "127.0.0.1:1002", HealthStatus.DRAINING, "bob"))
    client = connect(store.settings)
    try:
        head = (await client.get(b"/t/topology")).header.revision
        await client.compact(head)
    finally:
        await client.close()
    await store.start()  # resumes after its last revision: compacted, so it loads the prefix again
    await eventually(lambda: a.overrides() == b.overrides() and len(a.overrides()) == 2, "A has B's pins")
    assert store.reloads == before + 1
    assert store.problems() == []
    metrics = a.metrics.exposition().decode()
    assert "healthplane_store_up 1.0" in metrics and f"healthplane_store_reloads_total {before + 1}.0" in metrics
    assert f"healthplane_store_revision {store.sync.revision}.0" in metrics
    # And the watch runs again afterwards.
    await b.store.submit(OverrideChange("web", "127.0.0.1:1001", None, "bob"))
    await eventually(lambda: ("web", "127.0.0.1:1001") not in a.overrides(), "A sees the clear")


async def test_the_local_file_gives_a_replicas_own_settings_only(replicas: Replicas) -> None:
    a = replicas.make("a", 1001)
    await a.start()
    await asyncio.sleep(0.2)  # the file watcher takes its first look after start() returns
    path = replicas.write("a", 1001, 1002)  # an edit of the fleet's part in A's own file ...
    text = yaml.safe_load(path.read_text())
    text["controlplane"]["stuck_stream_timeout"] = "33s"  # ... and of a fleet-wide setting
    text["controlplane"]["admin"]["token"] = "a-long-token"  # ... and of its own admin token
    path.write_text(yaml.safe_dump(text))
    await eventually(lambda: a.topology.controlplane.admin_token == "a-long-token", "the token applied")
    assert ports(a) == [1001]  # etcd's
    assert a.topology.controlplane.stuck_stream_timeout == 120.0
    assert any(e.kind == "topology_local_only" for e in a.events)


async def call(cp: ControlPlane, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    url = f"http://127.0.0.1:{cp.admin_port}{path}"
    async with aiohttp.ClientSession() as session, session.request(method, url, **kwargs) as response:
        return response.status, await response.json()


async def test_an_accepted_alarm_and_a_forgotten_prober_reach_every_replica(replicas: Replicas) -> None:
    endpoints = tuple(range(1001, 1011))
    a, b = replicas.make("a", *endpoints), replicas.make("b", *endpoints)
    await a.start()
    await b.start()
    b.admission.alarms.raise_("prober_stale", "x", "an alarm of B's alone: the ids of A and B differ")
    # A prober that lost its network reports every endpoint down to both replicas: both hold them.
    down = [Verdict("web", f"127.0.0.1:{p}", HealthStatus.UNHEALTHY, "timeout", source="prober:p") for p in endpoints]
    for cp in (a, b):
        assert cp.submit_verdicts(down) is None
    [held_a], [held_b] = a.admission.alarms.active("mass_failure"), b.admission.alarms.active("mass_failure")
    assert held_a.id != held_b.id

    code, body = await call(a, "POST", f"/alarms/{held_a.id}/accept", json={"who": "alice"})
    assert code == 200 and body["changed"] is True and body["alarm"]["resolution"].startswith("accepted by alice")
    await eventually(lambda: not b.admission.alarms.active("mass_failure"), "B's alarm accepted too")
    for cp in (a, b):
        assert {e.status for e in cp.snapshot.endpoints} == {HealthStatus.UNHEALTHY}
    assert held_b.resolution.startswith("accepted by alice")

    # A prober linked to both replicas, gone for good: forgotten once, on both.
    links = [Prober(cp) for cp in (a, b)]
    for link in links:
        await link.send(hello=prober_pb2.Hello(prober_id="west"))
    await eventually(lambda: all("west" in cp.prober_link.probers for cp in (a, b)), "west linked to both")
    for link in links:
        await link.aclose()
    await eventually(
        lambda: not any(cp.prober_link.probers["west"].connected for cp in (a, b)), "west disconnected from both"
    )
    code, body = await call(b, "DELETE", "/probers/west", headers={"X-Healthplane-Who": "alice"})
    assert code == 200 and body["forgotten"] == "west", body
    await eventually(lambda: all("west" not in cp.prober_link.probers for cp in (a, b)), "west forgotten by both")
    code, body = await call(b, "DELETE", "/probers/nobody")
    assert code == 404  # checked by the replica asked, before anything is written


async def test_a_hung_etcd_is_noticed_and_left_behind(replicas: Replicas, etcd: EtcdServer) -> None:
    a, b = replicas.make("a", 1001), replicas.make("b", 1001)
    await a.start()
    await b.start()
    etcd.pause()  # connections stay open and the watch stays silent: only the lease refresh notices
    try:
        await eventually(lambda: bool(a.store.problems() and b.store.problems()), "both degraded")
        assert "etcd" in a.store.problems()[0]
        change = OverrideChange("web", "127.0.0.1:1001", HealthStatus.DRAINING, "bob")
        with pytest.raises(StoreUnavailable, match=r"etcd 127\.0\.0\.1:"):
            await a.store.submit(change)
    finally:
        etcd.resume()
    await eventually(lambda: not a.store.problems(), "A connected again")
    await a.store.submit(change)
    await eventually(lambda: a.overrides() == b.overrides() and len(b.overrides()) == 1, "B has the pin")


async def test_a_second_replica_with_the_same_id_is_told_and_writes_nothing(
    replicas: Replicas, etcd: EtcdServer
) -> None:
    a = replicas.make("a", 1001)
    await a.start()
    assert isinstance(a.store, EtcdStore)
    client = connect(a.store.settings)

    async def holder() -> str | None:
        got = await client.get(a.store.keys.replica("a").encode())
        return None if got is None else json.loads(got.value)["admin_url"]

    async def probers() -> list[str]:
        return [kv.key.decode() for kv in await client.get_prefix(b"/t/probers/")]

    try:
        await poll_until(lambda: _equals(holder(), a.store.describe().admin_url), timeout=10, what="A registered")
        twin = replicas.make("a", 1001)  # the same controlplane.store.replica_id, by mistake
        await twin.start()
        assert isinstance(twin.store, EtcdStore)
        prober = SharingProber(twin, "p1")  # a sharing prober linked to the twin: registered by it
        await prober.hello()
        keepalive = asyncio.create_task(heard(prober))
        await eventually(lambda: bool(twin.store.problems()), "the twin tells of the clash")
        (problem,) = twin.store.problems()
        assert "replica_id 'a' is held" in problem and a.store.describe().admin_url in problem
        status, body = await call(twin, "GET", "/readyz")
        assert status == 200 and body["status"] == "degraded" and body["degraded"] == [problem]
        assert any(e.kind == "store_clash" for e in twin.events)
        await asyncio.sleep(1.5)  # more than a PUBLISH_INTERVAL: the twin tried again, and wrote nothing
        assert await holder() == a.store.describe().admin_url
        assert await probers() == []
        assert a.store.problems() == []

        # A stops (its lease revoked): the twin takes the id over, and registers its prober.
        replicas.started.remove(a)
        await a.aclose()
        await poll_until(lambda: _equals(holder(), twin.store.describe().admin_url), timeout=10, what="the twin's")
        assert twin.store.problems() == []
        await poll_until(lambda: _equals(probers(), ["/t/probers/p1/a"]), timeout=5, what="the twin's prober")
        assert any(e.kind == "store" and "the clash is over" in e.message for e in twin.events)
        keepalive.cancel()
        await prober.leave()
    finally:
        await client.close()


async def heard(prober: SharingProber) -> None:
    """An idle prober's empty batches, as the real one sends them: it stays a member."""
    while True:
        await prober.send(verdicts=prober_pb2.VerdictBatch())
        await asyncio.sleep(0.5)


async def _equals(value: Any, expected: Any) -> bool:
    return await value == expected


async def test_a_replica_goes_on_through_another_member_when_its_etcd_member_dies(
    tmp_path: Path, etcd_cluster: EtcdCluster
) -> None:
    cluster = etcd_cluster
    replicas = Replicas(tmp_path, cluster)
    try:
        a, b = replicas.make("a", 1001, 1002), replicas.make("b", 1001, 1002)
        await a.start()
        await b.start()
        assert isinstance(a.store, EtcdStore) and isinstance(b.store, EtcdStore)
        assert a.store.member == cluster.endpoints[0]  # the first endpoint listed, to begin with
        await cluster.members[0].kill()  # A's member (and B's): the other two keep the quorum

        b1 = "127.0.0.1:1001"

        async def written() -> bool:
            try:
                await a.store.submit(OverrideChange("web", b1, HealthStatus.DRAINING, "alice"))
            except StoreUnavailable:
                return False
            return True

        await poll_until(written, timeout=15, what="A's write through another member")
        assert a.store.member != cluster.endpoints[0]
        await eventually(lambda: b.overrides().get(("web", b1)) is HealthStatus.DRAINING, "B has A's pin")
        await b.store.submit(OverrideChange("web", "127.0.0.1:1002", HealthStatus.UNHEALTHY, "bob"))
        await eventually(lambda: len(a.overrides()) == 2, "A has B's pin too")
        # Each took its replica id over from its lease on the lost member's session: no clash.
        await eventually(lambda: a.store.problems() == [] and b.store.problems() == [], "both ready")
    finally:
        for cp in replicas.started:
            await cp.aclose()


async def test_a_write_cut_off_by_a_reconnect_is_told_as_unavailable(replicas: Replicas, etcd: EtcdServer) -> None:
    a = replicas.make("a", 1001)
    await a.start()
    assert isinstance(a.store, EtcdStore)
    etcd.pause()  # the write hangs in flight ...
    try:
        write = asyncio.create_task(a.store.submit(OverrideChange("web", "127.0.0.1:1001", HealthStatus.DRAINING, "x")))
        await asyncio.sleep(0.3)
        await a.store._close_client()  # ... when the store drops the connection to reconnect, as after a failure
        with pytest.raises(StoreUnavailable, match="connection closed during the write"):
            await write  # not grpc.aio's CancelledError, which would end the admin request's handler
    finally:
        etcd.resume()
