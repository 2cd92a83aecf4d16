"""GET /replicas: records, the publish rate limit, the view's agreement flag, the EDS digest; and the
view without a store (this replica alone)."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import yaml

from controlplane.app import ControlPlane
from controlplane.health.store import HealthStatus
from controlplane.snapshots.snapshot import Cause, build_snapshot
from controlplane.store.replicas import PUBLISH_INTERVAL, ReplicaRecord, decode_record, publish_due, replicas_view
from controlplane.topology.parse import load_topology, parse_topology

TOPOLOGY = parse_topology(
    {"clusters": [{"name": "web", "endpoints": [{"address": "127.0.0.1", "port": p} for p in (1, 2)]}]}
)


def record(rid: str, digest: str = "d1", version: str = "1.1", updated: float = 100.0) -> ReplicaRecord:
    return ReplicaRecord(rid, f"http://{rid}:19000", f"{rid}:18000", version, digest, updated)


def test_records_round_trip_and_junk_is_not_one() -> None:
    r = record("a")
    assert decode_record(r.encode()) == r and decode_record(r.encode()).updated == 100.0  # type: ignore[union-attr]
    assert decode_record(b"{}") is None and decode_record(b"\xff") is None


def test_publish_only_a_change_and_at_most_once_per_interval() -> None:
    r = record("a")
    assert publish_due(r, None, 0.0, PUBLISH_INTERVAL)
    assert not publish_due(r, record("a", updated=5.0), 0.0, 100.0)  # the time alone is not a change
    changed = record("a", version="1.2")
    assert not publish_due(changed, r, 10.0, 10.0 + PUBLISH_INTERVAL / 2)
    assert publish_due(changed, r, 10.0, 10.0 + PUBLISH_INTERVAL)


def test_the_view_shows_this_replica_live_and_whether_all_agree() -> None:
    stale_me = record("b", digest="old")
    view = replicas_view([record("a"), stale_me, record("c")], record("b"), store="etcd", problems=[], now=101.0)
    assert [r["id"] for r in view["replicas"]] == ["a", "b", "c"]
    assert view["agree"] is True and view["self"] == "b"
    assert [r["self"] for r in view["replicas"]] == [False, True, False]
    assert view["replicas"][0]["age"] == 1.0
    split = replicas_view([record("a", digest="d2")], record("b"), store="etcd", problems=["etcd down"])
    assert split["agree"] is False and split["eds_digests"] == 2 and split["problems"] == ["etcd down"]


def test_the_eds_digest_is_the_content_not_the_version() -> None:
    def snap(version: str, status: HealthStatus) -> str:
        s = build_snapshot(
            TOPOLOGY,
            lambda c, e: status if e.endswith(":1") else HealthStatus.HEALTHY,
            version=version,
            cause=Cause("start", "", 0.0),
        )
        return s.eds_digest()

    assert snap("1.1", HealthStatus.UNHEALTHY) == snap("7.9", HealthStatus.UNHEALTHY)
    assert snap("1.1", HealthStatus.UNHEALTHY) != snap("1.1", HealthStatus.DRAINING)


async def test_without_a_store_it_lists_this_replica_alone(tmp_path: Path) -> None:
    config = tmp_path / "t.yaml"
    config.write_text(yaml.safe_dump({"controlplane": {"xds": {"port": 0}, "admin": {"port": 0}}}))
    async with ControlPlane(load_topology(config), config_path=config) as cp, aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{cp.admin_port}/replicas") as response:
            assert response.status == 200
            body = await response.json()
    assert body["store"] == "local" and body["agree"] is True and body["problems"] == []
    [me] = body["replicas"]
    assert me["self"] and me["version"] == cp.snapshot.version and me["eds_digest"] == cp.snapshot.eds_digest()
    assert me["xds_address"] == f"127.0.0.1:{cp.xds_port}" and me["admin_url"] == f"http://127.0.0.1:{cp.admin_port}"
