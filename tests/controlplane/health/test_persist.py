"""The SQLite verdict store, and a control plane restarted on the same data directory."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.app import ControlPlane
from controlplane.errors import ConfigError
from controlplane.health.persist import BackgroundStore, VerdictStore
from controlplane.health.store import HealthStatus, Verdict
from controlplane.snapshots.snapshot import version_key
from controlplane.topology.parse import parse_topology
from lab.envoyproc import poll_until

H, U = HealthStatus.HEALTHY, HealthStatus.UNHEALTHY


def document(data_dir: Path, ports: tuple[int, ...] = (8081, 8082, 8083)) -> dict[str, Any]:
    return {
        "controlplane": {"xds": {"port": 0}, "admin": {"port": 0}, "data_dir": str(data_dir)},
        "clusters": [{"name": "web", "endpoints": [{"address": "127.0.0.1", "port": p} for p in ports]}],
    }


def served(cp: ControlPlane) -> dict[str, str]:
    return {f"{e.address}:{e.port}": e.status.name for e in cp.snapshot.endpoints}


def test_a_batch_is_one_transaction_and_reads_back(tmp_path: Path) -> None:
    store = VerdictStore(tmp_path)
    a = Verdict("web", "127.0.0.1:1", U, "http 503", 10.0, "prober:a")
    store.save_batch(verdicts=[a], votes=[a, Verdict("web", "127.0.0.1:1", H, "ok", 11.0, "prober:b")])
    store.save_override("web", "127.0.0.1:2", Verdict("web", "127.0.0.1:2", HealthStatus.DRAINING, "op", 12.0, "o"))
    store.save_epoch(42)
    store.close()
    saved = VerdictStore(tmp_path).load()
    assert saved.verdicts == [a]
    assert sorted(v.source for v in saved.votes) == ["prober:a", "prober:b"]
    assert [o.status for o in saved.overrides] == [HealthStatus.DRAINING]
    assert saved.epoch == 42
    mode = sqlite3.connect(tmp_path / "healthplane.db").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_a_failed_batch_leaves_nothing_half_written(tmp_path: Path) -> None:
    store = VerdictStore(tmp_path)
    good = Verdict("web", "127.0.0.1:1", U, "x", 1.0, "p")

    def verdicts() -> Any:
        yield good
        raise RuntimeError("the batch broke half-way")

    with pytest.raises(RuntimeError):
        store.save_batch(verdicts=verdicts())
    assert store.load().verdicts == []


def test_an_unusable_data_dir_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError) as info:
        VerdictStore(blocker / "sub")
    assert info.value.path == "controlplane.data_dir"


async def test_restart_serves_the_last_verdicts_and_overrides_at_the_first_version(tmp_path: Path) -> None:
    topology = parse_topology(document(tmp_path / "data"))
    first = ControlPlane(topology)
    first.submit_verdicts(
        [Verdict("web", "127.0.0.1:8081", U, "connection refused", source="prober:a"),
         Verdict("web", "127.0.0.1:8082", H, "http 200", source="prober:a")]
    )  # fmt: skip
    first.set_override("web", "127.0.0.1:8083", HealthStatus.DRAINING, who="alice")
    before, last_version = served(first), first.snapshot.version
    first.admission.close()

    second = ControlPlane(topology)
    # The very first snapshot of the new process already carries them: nothing reset to UNKNOWN.
    assert second.snapshot.cause.kind == "start"
    assert (
        served(second)
        == before
        == {
            "127.0.0.1:8081": "UNHEALTHY",
            "127.0.0.1:8082": "HEALTHY",
            "127.0.0.1:8083": "DRAINING",
        }
    )
    assert version_key(second.snapshot.version) > version_key(last_version)
    assert [e.kind for e in second.events.recent(kind="restore")] == ["restore"]
    # The restarted prober's UNKNOWN (it has not decided yet) does not flap the endpoint.
    assert second.submit_verdicts([Verdict("web", "127.0.0.1:8081", HealthStatus.UNKNOWN, source="prober:a")]) is None
    second.admission.close()


async def test_versions_stay_monotonic_when_the_clock_steps_back(tmp_path: Path) -> None:
    topology = parse_topology(document(tmp_path))
    first = ControlPlane(topology, epoch=5_000)
    first.admission.close()
    second = ControlPlane(topology, epoch=1_000)  # the wall clock went back
    assert version_key(second.snapshot.version) > version_key(first.snapshot.version)
    second.admission.close()


async def test_endpoints_gone_from_the_topology_are_dropped_at_start(tmp_path: Path) -> None:
    first = ControlPlane(parse_topology(document(tmp_path)))
    first.submit_verdicts([Verdict("web", "127.0.0.1:8083", U, "gone", source="p")])
    first.admission.close()
    second = ControlPlane(parse_topology(document(tmp_path, (8081, 8082))))
    assert "127.0.0.1:8083" not in served(second)
    second.admission.close()
    assert VerdictStore(tmp_path).load().verdicts == []


def test_without_data_dir_nothing_is_written(tmp_path: Path) -> None:
    doc = document(tmp_path)
    del doc["controlplane"]["data_dir"]
    cp = ControlPlane(parse_topology(doc))
    cp.submit_verdicts([Verdict("web", "127.0.0.1:8081", U, "x", source="p")])
    assert cp.admission.store is None and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("controlplane", "path"),
    [
        ({"data_dir": 5}, "controlplane.data_dir"),
        ({"prober_staleness": "soon"}, "controlplane.prober_staleness"),
        ({"mass_failure": {"share": 1.5}}, "controlplane.mass_failure.share"),
        ({"mass_failure": {"min_endpoints": 0}}, "controlplane.mass_failure.min_endpoints"),
        ({"mass_failure": {"quorum": 2}}, "controlplane.mass_failure.quorum"),
        ({"stuck_stream_timeout": -1}, "controlplane.stuck_stream_timeout"),
    ],
)
def test_bad_fault_settings_name_the_field(controlplane: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_topology({"controlplane": controlplane, "clusters": []})
    assert info.value.path == path


def test_fault_settings_parse() -> None:
    cfg = parse_topology(
        {
            "controlplane": {
                "data_dir": "/var/lib/healthplane",
                "prober_staleness": "30s",
                "mass_failure": {"share": 0.3, "window": "20s", "min_endpoints": 5},
                "stuck_stream_timeout": "2m",
            },
            "clusters": [],
        }
    ).controlplane
    assert (cfg.data_dir, cfg.prober_staleness, cfg.stuck_stream_timeout) == ("/var/lib/healthplane", 30.0, 120.0)
    assert (cfg.mass_failure_share, cfg.mass_failure_window, cfg.mass_failure_min) == (0.3, 20.0, 5)


async def eventually(check: Callable[[], object], what: str) -> None:
    async def probe() -> bool | None:
        return True if check() else None

    await poll_until(probe, timeout=10, what=what)


def _lock(data_dir: Path) -> sqlite3.Connection:
    """Another process's view of the file, holding its write lock (as a backup tool might)."""
    other = sqlite3.connect(data_dir / "healthplane.db", isolation_level=None, timeout=10)  # past our own write
    other.execute("BEGIN EXCLUSIVE")
    return other


async def test_verdicts_and_overrides_are_served_while_the_database_refuses_writes_then_saved(
    tmp_path: Path,
) -> None:
    cp = ControlPlane(parse_topology(document(tmp_path)))
    assert cp.admission.store is not None
    cp.admission.store.store._db.execute("PRAGMA busy_timeout = 50")  # locked: fail fast, not after 5 s
    cp.admission.store.retry = 0.05
    other = _lock(tmp_path)
    try:
        # Accepted while the file is locked: applied and served at once, the write fails on its thread.
        snap = cp.submit_verdicts([Verdict("web", "127.0.0.1:8081", U, "connection refused", source="prober:a")])
        assert snap is not None and served(cp)["127.0.0.1:8081"] == "UNHEALTHY"
        snap = cp.set_override("web", "127.0.0.1:8082", HealthStatus.DRAINING, who="alice")
        assert snap is not None and served(cp)["127.0.0.1:8082"] == "DRAINING"
        assert [e.kind for e in cp.events.recent(kind="override")] == ["override"]
        await eventually(lambda: cp.admission.alarms.active("persistence"), "the persistence alarm")
        (alarm,) = cp.admission.alarms.active("persistence")
        assert "database is locked" in alarm.message and "healthplane.db" in alarm.message
        exposition = cp.metrics.exposition().decode()
        assert 'healthplane_alarms_active{kind="persistence"} 1.0' in exposition
        assert "healthplane_persist_failures_total" in exposition
        assert cp.admission.store.backlog >= 2
        # Still failing after retries: nothing was dropped in between.
        failures = cp.admission.store.failures
        await eventually(
            lambda: cp.admission.store is not None and cp.admission.store.failures > failures + 2, "retries"
        )
    finally:
        other.execute("ROLLBACK")
        other.close()
    # The disk lets it write again: it catches up, and the alarm clears.
    await eventually(lambda: not cp.admission.alarms.active("persistence"), "caught up")
    assert cp.admission.store.backlog == 0
    cp.admission.close()
    saved = VerdictStore(tmp_path).load()
    assert [(v.endpoint, v.status) for v in saved.verdicts] == [("127.0.0.1:8081", U)]
    assert [(o.endpoint, o.status) for o in saved.overrides] == [("127.0.0.1:8082", HealthStatus.DRAINING)]


async def test_readyz_says_degraded_while_changes_cannot_be_saved(tmp_path: Path) -> None:
    doc = document(tmp_path)
    cp = ControlPlane(parse_topology(doc))
    assert cp.admission.store is not None
    cp.admission.store.store._db.execute("PRAGMA busy_timeout = 50")
    other = _lock(tmp_path)
    cp.submit_verdicts([Verdict("web", "127.0.0.1:8081", U, "x", source="prober:a")])
    await eventually(lambda: cp.admission.alarms.active("persistence"), "the persistence alarm")
    await cp.start()
    try:
        async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{cp.admin_port}/readyz") as r:
            body = await r.json()
        assert r.status == 200  # serving what it should: still in service
        assert body["status"] == "degraded" and "database is locked" in body["degraded"][0]
    finally:
        other.execute("ROLLBACK")
        other.close()
        await cp.aclose(grace=0)


_keys = st.sampled_from(["127.0.0.1:1", "127.0.0.1:2"])
_sources = st.sampled_from(["prober:a", "prober:b"])
_status = st.sampled_from([H, U])
_op = st.one_of(
    st.tuples(st.just("verdict"), _keys, _sources, _status),
    st.tuples(st.just("vote"), _keys, _sources, _status),
    st.tuples(st.just("override"), _keys, _sources, st.one_of(st.none(), _status)),
    st.tuples(st.just("forget"), _keys, _sources, _status),
    st.tuples(st.just("lock"), _keys, _sources, _status),
    st.tuples(st.just("unlock"), _keys, _sources, _status),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_op, max_size=25))
def test_writes_that_fail_in_any_order_end_with_the_file_holding_every_last_change(
    tmp_path: Path, ops: list[tuple[str, str, str, HealthStatus | None]]
) -> None:
    """Whatever fails when, once the disk lets it write, the file holds what a store that never failed would."""
    data = tmp_path / f"d{len(list(tmp_path.iterdir()))}"
    store = BackgroundStore(VerdictStore(data, busy_timeout=0))
    verdicts: dict[str, HealthStatus] = {}
    votes: dict[tuple[str, str], HealthStatus] = {}
    overrides: dict[str, HealthStatus] = {}
    other: sqlite3.Connection | None = None
    for kind, key, source, status in ops:
        v = Verdict("web", key, status or H, "r", 1.0, source)
        if kind == "verdict":
            store.save_batch(verdicts=[v])
            verdicts[key] = v.status
        elif kind == "vote":
            store.save_batch(votes=[v])
            votes[(key, source)] = v.status
        elif kind == "override":
            store.save_override("web", key, None if status is None else v)
            if status is None:
                overrides.pop(key, None)
            else:
                overrides[key] = status
        elif kind == "forget":
            store.forget_source(source)
            votes = {k: s for k, s in votes.items() if k[1] != source}
        elif kind == "lock" and other is None:
            other = _lock(data)
        elif kind == "unlock" and other is not None:
            other.execute("ROLLBACK")
            other.close()
            other = None
    if other is not None:
        assert store.backlog == 0 or store.error is not None
        other.execute("ROLLBACK")
        other.close()
    saved = store.load()
    store.close()
    assert store.error is None and store.backlog == 0
    assert {v.endpoint: v.status for v in saved.verdicts} == verdicts
    assert {(v.endpoint, v.source): v.status for v in saved.votes} == votes
    assert {o.endpoint: o.status for o in saved.overrides} == overrides


@pytest.mark.parametrize("where", ["table pages", "everything after the header"])
def test_a_damaged_database_file_is_a_config_error_naming_data_dir(tmp_path: Path, where: str) -> None:
    first = ControlPlane(parse_topology(document(tmp_path)))
    first.submit_verdicts([Verdict("web", f"127.0.0.1:{p}", U, "x" * 200, source="p") for p in (8081, 8082, 8083)])
    first.admission.close()
    db = tmp_path / "healthplane.db"
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"healthplane.db{suffix}").unlink(missing_ok=True)
    data = bytearray(db.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    assert len(data) >= 3 * page  # the header page and table pages
    start = page if where == "table pages" else 100
    data[start:] = b"\xa5" * (len(data) - start)  # the 100-byte header stays valid
    db.write_bytes(bytes(data))
    with pytest.raises(ConfigError) as info:
        ControlPlane(parse_topology(document(tmp_path)))
    assert info.value.path == "controlplane.data_dir" and str(db) in info.value.message
    config = tmp_path / "t.yaml"
    config.write_text(yaml.safe_dump(document(tmp_path)))
    result = subprocess.run(
        [sys.executable, "-m", "controlplane", "serve", "--no-prober", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "controlplane.data_dir" in result.stderr


def test_a_held_mass_failure_and_its_alarm_outlive_a_restart(tmp_path: Path) -> None:
    doc = document(tmp_path, tuple(range(8081, 8091)))
    first = ControlPlane(parse_topology(doc))
    down = [Verdict("web", f"127.0.0.1:{p}", U, "connect timeout", source="prober:a") for p in range(8081, 8091)]
    assert first.submit_verdicts(down) is None  # held
    [alarm] = first.admission.alarms.active("mass_failure")
    first.admission.close()

    second = ControlPlane(parse_topology(doc))
    [again] = second.admission.alarms.active("mass_failure")
    assert again.subject == "web" and "10 failures held" in again.message
    assert set(second.admission.guard.held["web"]) == {f"127.0.0.1:{p}" for p in range(8081, 8091)}
    assert set(served(second).values()) == {"UNKNOWN"}  # still held, not applied by the restart
    _, snapshot = second.accept_alarm(again.id, who="alice")
    assert snapshot is not None and set(served(second).values()) == {"UNHEALTHY"}
    second.admission.close()

    third = ControlPlane(parse_topology(doc))  # accepted: nothing held any more, the verdicts stay
    assert third.admission.alarms.active() == [] and third.admission.guard.held == {}
    assert set(served(third).values()) == {"UNHEALTHY"}
    third.admission.close()
    assert alarm.id >= 1
