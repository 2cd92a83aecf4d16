"""The pure half of the etcd store: key layout, values, watch events in revision order, full reloads."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from controlplane.health.store import HealthStatus
from controlplane.store.changes import AcceptChange, ForgetChange, OverrideChange, TopologyChange
from controlplane.store.fleet import fleet_document, ignored_local_keys, merge, with_local_settings
from controlplane.store.sync import (
    Keys,
    KeyValue,
    Skipped,
    Sync,
    WatchEvent,
    encode_act,
    encode_override,
    encode_topology,
    write_ops,
)
from controlplane.topology.model import Topology
from controlplane.topology.parse import parse_topology

KEYS = Keys("/hp")


def doc(*ports: int, staleness: str = "60s") -> dict[str, Any]:
    return {
        "controlplane": {
            "xds": {"port": 18001},
            "admin": {"port": 19001},
            "data_dir": "/var/lib/hp",
            "prober_staleness": staleness,
        },
        "clusters": [{"name": "web", "endpoints": [{"address": "127.0.0.1", "port": p} for p in ports]}],
    }


def topology(*ports: int, **kw: Any) -> Topology:
    return parse_topology(doc(*ports, **kw), source="local.yaml")


class Replica:
    """What Sync reads of a replica: its running topology and its pins."""

    def __init__(self, t: Topology) -> None:
        self.topology = t
        self.pins: dict[tuple[str, str], HealthStatus] = {}

    def apply(self, items: Any) -> list[Any]:
        out = []
        for revision, item in items:
            if isinstance(item, TopologyChange):
                self.topology = item.topology
            elif isinstance(item, OverrideChange):
                if item.status is None:
                    self.pins.pop((item.cluster, item.endpoint), None)
                else:
                    self.pins[(item.cluster, item.endpoint)] = item.status
            out.append((revision, item))
        return out

    def overrides(self) -> Mapping[tuple[str, str], HealthStatus]:
        return dict(self.pins)


def put(key: str, value: bytes, revision: int) -> WatchEvent:
    return WatchEvent("put", key, value, revision)


def pin(status: HealthStatus | None, who: str = "alice") -> bytes:
    return encode_override(status, who=who, now=1.0)


# --------------------------------------------------------------------------- keys and values


def test_keys_round_trip() -> None:
    assert KEYS.topology == "/hp/topology"
    assert KEYS.parse(KEYS.override("web", "[::1]:80")) == ("overrides", "web", "[::1]:80")
    assert KEYS.parse(KEYS.forgotten("a/b c")) == ("forgotten", "a/b c")
    assert KEYS.parse(KEYS.accept("web")) == ("accepts", "web")
    assert KEYS.parse("/hp/overrides/web") == ()  # not our shape
    assert KEYS.parse("/hpx/topology") == () and KEYS.parse("/hp/other/x") == ()


def test_the_fleet_part_leaves_each_replicas_own_settings_out() -> None:
    document = doc(1, 2)
    fleet = fleet_document(document)
    assert fleet == {"clusters": document["clusters"], "controlplane": {"prober_staleness": "60s"}}
    assert sorted(ignored_local_keys(document)) == ["controlplane.admin", "controlplane.data_dir", "controlplane.xds"]
    assert fleet_document({**document, "probers": {"replicas": 2}})["probers"] == {"replicas": 2}
    local = {"xds": {"port": 7}, "prober_staleness": "5s"}
    merged = merge(fleet, local)
    assert merged["controlplane"] == {"xds": {"port": 7}, "prober_staleness": "60s"}  # the fleet's setting wins


def test_a_reread_file_gives_its_own_settings_only() -> None:
    running = topology(1, 2)
    edited = parse_topology({**doc(3), "controlplane": {"xds": {"port": 18001}, "watch_interval": "2s"}})
    result = with_local_settings(running, edited)
    assert [e.port for e in result.clusters[0].endpoints] == [1, 2]
    assert result.controlplane.watch_interval == 2.0
    assert result.controlplane.prober_staleness == 60.0  # the fleet's


def test_a_topology_write_drops_the_pins_of_endpoints_it_no_longer_has() -> None:
    change = TopologyChange(topology(1, 2), "bob", "PUT")
    ops = write_ops(KEYS, change, orphans=[KEYS.override("web", "127.0.0.1:1"), KEYS.override("web", "127.0.0.1:9")])
    assert [k for k, _ in ops] == ["/hp/topology", KEYS.override("web", "127.0.0.1:9")]
    assert ops[1][1] is None


# --------------------------------------------------------------------------- watch events


def test_events_are_applied_in_revision_order_and_older_ones_refused() -> None:
    replica = Replica(topology(1, 2))
    sync = Sync(KEYS, lambda: replica.topology)
    list(sync.reload([], 10, replica.overrides))
    ep1, ep2 = "127.0.0.1:1", "127.0.0.1:2"
    items = replica.apply(
        sync.events(
            [
                put(KEYS.override("web", ep1), pin(HealthStatus.HEALTHY), 13),
                put(KEYS.override("web", ep1), pin(HealthStatus.UNHEALTHY), 12),
                put(KEYS.override("web", ep2), pin(HealthStatus.DRAINING), 11),
                put(KEYS.override("web", ep2), pin(None), 9),  # in the load at 10 already
            ]
        )
    )
    assert [r for r, _ in items] == [11, 12, 13]
    assert replica.pins == {("web", ep1): HealthStatus.HEALTHY, ("web", ep2): HealthStatus.DRAINING}
    assert sync.revision == 13
    # A late event from before what is applied is dropped; one of the same revision (a transaction) is not.
    assert sync.events([put(KEYS.override("web", ep1), pin(None), 12)]) == []
    same = sync.events([WatchEvent("delete", KEYS.override("web", ep2), b"", 13)])
    assert same == [(13, OverrideChange("web", ep2, None, "etcd (key deleted)"))]


def test_a_topology_event_is_merged_with_this_replicas_settings() -> None:
    replica = Replica(topology(1))
    sync = Sync(KEYS, lambda: replica.topology)
    fleet = doc(1, 2, staleness="5s")
    other = parse_topology({**fleet, "controlplane": {**fleet["controlplane"], "xds": {"port": 5}}})
    value = encode_topology(other, who="bob", detail="PUT /topology by bob")
    [(rev, change)] = sync.events([put(KEYS.topology, value, 4)])
    assert rev == 4 and isinstance(change, TopologyChange)
    assert change.who == "bob" and "revision 4" in change.detail
    assert [e.port for e in change.topology.clusters[0].endpoints] == [1, 2]
    assert change.topology.controlplane.xds.port == 18001  # this replica's, not the writer's
    assert change.topology.controlplane.prober_staleness == 5.0  # the fleet's


def test_what_cannot_apply_is_skipped_with_a_reason() -> None:
    replica = Replica(topology(1))
    sync = Sync(KEYS, lambda: replica.topology)
    bad_topology = b'{"document": {"clusters": [{"name": "web", "endpoints": [{"port": 0}]}]}}'
    items = sync.events(
        [
            put(KEYS.topology, bad_topology, 2),
            put(KEYS.override("web", "127.0.0.1:1"), b"not json", 3),
            put(KEYS.override("web", "127.0.0.1:1"), b'{"status": "SIDEWAYS"}', 4),
            WatchEvent("delete", KEYS.topology, b"", 5),
            put("/hp/replicas/b", b"{}", 6),  # not an operator change
            put(KEYS.accept("web"), encode_act(who="carol"), 7),
            put(KEYS.forgotten("p1"), encode_act(who="dave"), 8),
        ]
    )
    kinds = [(r, type(i).__name__) for r, i in items]
    assert kinds == [
        (2, "Skipped"),
        (3, "Skipped"),
        (4, "Skipped"),
        (5, "Skipped"),
        (7, "AcceptChange"),
        (8, "ForgetChange"),
    ]
    first = items[0][1]
    assert (
        isinstance(first, Skipped)
        and "clusters[0].endpoints[0]" in first.reason
        and "etcd /hp/topology" in first.reason
    )
    assert items[5][1] == ForgetChange("p1", "dave") and items[4][1] == AcceptChange("web", "carol")


# --------------------------------------------------------------------------- full loads (start, compaction)


def test_first_load_applies_state_but_not_past_acts() -> None:
    replica = Replica(topology(1))
    replica.pins[("web", "127.0.0.1:1")] = HealthStatus.DRAINING  # restored from SQLite, not in etcd
    sync = Sync(KEYS, lambda: replica.topology)
    entries = [
        KeyValue(KEYS.topology, encode_topology(topology(1, 2), who="seed", detail="seeded"), 3),
        KeyValue(KEYS.override("web", "127.0.0.1:2"), pin(HealthStatus.UNHEALTHY), 5),
        KeyValue(KEYS.accept("web"), encode_act(who="carol"), 6),
    ]
    items = replica.apply(sync.reload(entries, 8, replica.overrides))
    assert [type(i).__name__ for _, i in items] == ["TopologyChange", "OverrideChange", "OverrideChange"]
    assert replica.pins == {("web", "127.0.0.1:2"): HealthStatus.UNHEALTHY}  # etcd's pins are the truth
    assert sync.revision == 8 and sync.loaded


def test_a_reload_after_compaction_applies_only_what_differs() -> None:
    replica = Replica(topology(1))
    sync = Sync(KEYS, lambda: replica.topology)
    seeded = encode_topology(topology(1, 2), who="seed", detail="seeded")
    replica.apply(sync.reload([KeyValue(KEYS.topology, seeded, 3)], 3, replica.overrides))
    replica.apply(sync.events([put(KEYS.override("web", "127.0.0.1:1"), pin(HealthStatus.UNHEALTHY), 4)]))
    # Revisions 5..20 were compacted while this replica was away: the pin on :1 was cleared, :2 was
    # pinned, a prober was forgotten (after 4: applied) and a cluster accepted (at 2: before, not again).
    entries = [
        KeyValue(KEYS.topology, seeded, 3),
        KeyValue(KEYS.override("web", "127.0.0.1:1"), pin(None, "bob"), 9),
        KeyValue(KEYS.override("web", "127.0.0.1:2"), pin(HealthStatus.DRAINING, "bob"), 12),
        KeyValue(KEYS.override("gone", "127.0.0.1:7"), pin(HealthStatus.DRAINING, "bob"), 13),
        KeyValue(KEYS.forgotten("p1"), encode_act(who="dave"), 15),
        KeyValue(KEYS.accept("web"), encode_act(who="carol"), 2),
    ]
    items = replica.apply(sync.reload(entries, 20, replica.overrides))
    assert items == [
        (9, OverrideChange("web", "127.0.0.1:1", None, "bob")),
        (12, OverrideChange("web", "127.0.0.1:2", HealthStatus.DRAINING, "bob")),
        (15, ForgetChange("p1", "dave")),
    ]  # the topology did not change: not served again; the pin of an unknown cluster is not applied
    assert sync.revision == 20
    assert sync.events([put(KEYS.override("web", "127.0.0.1:2"), pin(None), 20)]) == []  # in the load
    assert len(sync.events([put(KEYS.override("web", "127.0.0.1:2"), pin(None), 21)])) == 1


def test_a_reload_compares_pins_after_the_new_topology() -> None:
    replica = Replica(topology(1, 2))
    replica.pins[("web", "127.0.0.1:2")] = HealthStatus.UNHEALTHY
    sync = Sync(KEYS, lambda: replica.topology)
    entries = [KeyValue(KEYS.topology, encode_topology(topology(1), who="x", detail="x"), 7)]
    items = replica.apply(sync.reload(entries, 7, replica.overrides))
    # Without :2 in the new topology its pin is the topology's to drop, not a change to apply.
    assert [type(i).__name__ for _, i in items] == ["TopologyChange"]


@pytest.mark.parametrize("status", [None, HealthStatus.UNHEALTHY])
def test_override_values_round_trip(status: HealthStatus | None) -> None:
    from controlplane.store.sync import decode_override

    assert decode_override(encode_override(status, who="alice")) == (status, "alice")
