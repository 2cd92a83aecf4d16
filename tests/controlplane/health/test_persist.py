"""The SQLite verdict store, and a control plane restarted on the same data directory."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from controlplane.app import ControlPlane
from controlplane.errors import ConfigError
from controlplane.health.persist import VerdictStore
from controlplane.health.store import HealthStatus, Verdict
from controlplane.snapshots.snapshot import version_key
from controlplane.topology.parse import parse_topology

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
