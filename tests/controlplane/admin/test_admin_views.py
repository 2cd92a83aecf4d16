"""The admin API's pure views: diffs, status page rows and escaping, and the admin token setting."""

from __future__ import annotations

import csv
import io

import pytest

from controlplane.admin.views import endpoint_rows, passive_row, snapshot_diff, status_csv, status_html, status_rows
from controlplane.errors import ConfigError
from controlplane.health.passive import PassiveState
from controlplane.health.store import HealthStatus, HealthStore
from controlplane.snapshots.snapshot import Cause, VersionClock, build_snapshot
from controlplane.topology.parse import parse_topology, parse_topology_text

TOPOLOGY = """\
clusters:
  - name: web
    endpoints: [{address: 127.0.0.1, port: 8081}, {address: 127.0.0.1, port: 8082}]
"""


def test_diff_lists_added_removed_and_moved_endpoints() -> None:
    clock = VersionClock(epoch=1)
    health: dict[tuple[str, str], HealthStatus] = {}

    def lookup(cluster: str, endpoint: str) -> HealthStatus:
        return health.get((cluster, endpoint), HealthStatus.UNKNOWN)

    a = build_snapshot(parse_topology_text(TOPOLOGY), lookup, version=clock.next(), cause=Cause("start", "", 0))
    health[("web", "127.0.0.1:8081")] = HealthStatus.HEALTHY
    edited = TOPOLOGY.replace("port: 8082", "port: 8083") + "  - name: api\n    endpoints: []\n"
    b = build_snapshot(
        parse_topology_text(edited), lookup, version=clock.next(), cause=Cause("topology", "", 0), previous=a
    )
    diff = snapshot_diff(a, b)
    assert diff["endpoints"] == {
        "added": [{"cluster": "web", "endpoint": "127.0.0.1:8083", "status": "UNKNOWN"}],
        "removed": [{"cluster": "web", "endpoint": "127.0.0.1:8082", "status": "UNKNOWN"}],
        "status_changed": [{"cluster": "web", "endpoint": "127.0.0.1:8081", "from": "UNKNOWN", "to": "HEALTHY"}],
    }
    assert diff["resources"]["cds"] == {"added": ["api"], "removed": [], "changed": []}
    assert diff["resources"]["eds"] == {"added": ["api"], "removed": [], "changed": ["web"]}
    assert snapshot_diff(b, b)["resources"] == {}


ROW = {
    "cluster": "web",
    "endpoint": "127.0.0.1:8081",
    "status": "UNHEALTHY",
    "override": None,
    "reason": '<script>alert("x")</script>, "quoted"',
    "check": {
        "check_type": "http",
        "counters": {"successes": 0, "http_failures": 2, "tcp_failures": 1, "timeouts": 0},
        "last_check": {"result": "http_failure", "time": 100.0, "latency_ms": 1.5},
    },
}


def test_status_rows_take_the_failure_counter_nearest_its_threshold_and_escape_html() -> None:
    (row,) = status_rows([ROW])
    assert (row["rise"], row["fall"], row["last_result"], row["latency_ms"]) == (0, 2, "http_failure", 1.5)
    page = status_html([row], version="1.2", refresh=0, now=103.0)
    assert "<script>" not in page and "&lt;script&gt;" in page and "3.0s ago" in page
    assert 'http-equiv="refresh"' not in page
    (parsed,) = csv.DictReader(io.StringIO(status_csv([row])))
    assert parsed["status"] == "UNHEALTHY" and parsed["override"] == "" and parsed["latency_ms"] == "1.5"


@pytest.mark.parametrize(("token", "ok"), [("long-enough", True), ("short", False), ("has space in", False)])
def test_admin_token_is_validated_with_its_path(token: str, ok: bool) -> None:
    document = {"controlplane": {"admin": {"port": 0, "token": token}}}
    if ok:
        assert parse_topology(document).controlplane.admin_token == token
    else:
        with pytest.raises(ConfigError) as info:
            parse_topology(document)
        assert info.value.path == "controlplane.admin.token"
    assert "token" not in repr(parse_topology(document if ok else {}).controlplane)


def test_passive_row_shows_the_counters_the_envoys_and_the_hold() -> None:
    counting = PassiveState(0, 2, 1, 0, {"front-2": 1, "front-1": 2}, 0, None, None, False)
    assert passive_row(counting, now=100.0) == {
        "successes": 0,
        "http_failures": 2,
        "tcp_failures": 1,
        "timeouts": 0,
        "seen_by": {"front-1": 2, "front-2": 1},
        "ejected": False,
        "ejections_in_a_row": 0,
        "ejected_at": None,
        "ejected_until": None,
        "remaining_s": None,
    }
    held = PassiveState(0, 0, 0, 0, {}, 2, 90.0, 110.0, True)
    row = passive_row(held, now=100.0)
    assert (row["ejected"], row["ejections_in_a_row"], row["ejected_until"], row["remaining_s"]) == (
        True,
        2,
        110.0,
        10.0,
    )
    over = passive_row(PassiveState(3, 0, 0, 0, {}, 2, 90.0, 110.0, False), now=120.0)
    assert (over["ejected"], over["remaining_s"], over["ejected_until"], over["successes"]) == (False, None, 110.0, 3)


def test_only_rows_of_passive_clusters_carry_passive_and_the_status_rows_keep_it() -> None:
    topology = parse_topology_text(TOPOLOGY)
    snap = build_snapshot(topology, lambda c, e: HealthStatus.UNKNOWN, version="1", cause=Cause("start", "", 0))
    state = PassiveState(0, 1, 0, 0, {"e1": 1}, 0, None, None, False)
    rows = endpoint_rows(
        snap,
        HealthStore().effective,
        lambda c, e: None,
        passive=lambda c, e: state if e.endswith("8081") else None,
        now=0.0,
    )
    assert rows[0]["passive"]["http_failures"] == 1 and rows[0]["passive"]["seen_by"] == {"e1": 1}
    assert "passive" not in rows[1]
    flat = status_rows(rows)
    assert flat[0]["passive"] == rows[0]["passive"] and "passive" not in flat[1]
