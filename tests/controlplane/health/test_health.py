"""HealthStore: verdicts, operator overrides, the effective status, and when it changed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from envoy.config.core.v3 import health_check_pb2

from controlplane.health import store as health
from controlplane.health.store import HealthStatus, HealthStore, Verdict
from controlplane.topology.parse import parse_topology

HEALTHY, UNHEALTHY, UNKNOWN, DRAINING = (
    HealthStatus.HEALTHY, HealthStatus.UNHEALTHY, HealthStatus.UNKNOWN, HealthStatus.DRAINING,
)  # fmt: skip
EP = "127.0.0.1:8081"
CLEAR_TIME = 999.0


def verdict(status: HealthStatus, at: float, *, endpoint: str = EP, cluster: str = "web", reason: str = "") -> Verdict:
    return Verdict(cluster, endpoint, status, reason=reason or status.name.lower(), time=at, source="prober:p1")


def override(status: HealthStatus, at: float) -> Verdict:
    return Verdict("web", EP, status, reason="maintenance", time=at, source="override:alice")


@pytest.fixture
def store() -> HealthStore:
    return HealthStore()


@pytest.fixture(autouse=True)
def frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clearing an override stamps `since` with the current time; make that time known."""
    monkeypatch.setattr(health, "time", SimpleNamespace(time=lambda: CLEAR_TIME))


def set_override(store: HealthStore, value: Verdict | None) -> bool:
    return store.set_override(value, cluster="web", endpoint=EP)


# --------------------------------------------------------------------------- statuses


def test_status_values_are_envoy_health_status_numbers() -> None:
    for status in HealthStatus:
        assert health_check_pb2.HealthStatus.Value(status.name) == status.value
    assert len(HealthStatus) == len(health_check_pb2.HealthStatus.keys())


@pytest.mark.parametrize(
    ("text", "status"), [("healthy", HEALTHY), (" Draining\n", DRAINING), ("TIMEOUT", HealthStatus.TIMEOUT)]
)
def test_parse_status(text: str, status: HealthStatus) -> None:
    assert HealthStatus.parse(text) is status


def test_parse_unknown_status_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown health status 'sick' \(expected one of UNKNOWN, HEALTHY, "):
        HealthStatus.parse("sick")


# --------------------------------------------------------------------------- verdicts


def test_endpoint_without_verdicts_is_unknown(store: HealthStore) -> None:
    effective = store.effective("web", EP)
    assert (effective.status, effective.reason, effective.since) == (UNKNOWN, "no verdict yet", 0.0)
    assert (effective.verdict, effective.override) == (None, None)
    assert store.status("web", EP) is UNKNOWN


def test_first_verdict_changes_the_status(store: HealthStore) -> None:
    first = verdict(HEALTHY, 10.0)
    assert store.apply(first) is True
    effective = store.effective("web", EP)
    assert (effective.status, effective.reason, effective.source, effective.since) == (
        HEALTHY, "healthy", "prober:p1", 10.0,
    )  # fmt: skip
    assert (effective.verdict, effective.override) == (first, None)


def test_first_unknown_verdict_is_no_change_but_starts_the_clock(store: HealthStore) -> None:
    assert store.apply(verdict(UNKNOWN, 10.0)) is False
    assert store.effective("web", EP).since == 10.0


def test_repeated_status_is_no_change_and_keeps_since(store: HealthStore) -> None:
    store.apply(verdict(HEALTHY, 10.0))
    latest = verdict(HEALTHY, 20.0, reason="200 OK")
    assert store.apply(latest) is False
    effective = store.effective("web", EP)
    assert (effective.since, effective.reason, effective.verdict) == (10.0, "200 OK", latest)


def test_status_flips_update_since(store: HealthStore) -> None:
    timeline = [(HEALTHY, 10.0, True), (UNHEALTHY, 20.0, True), (UNHEALTHY, 30.0, False), (HEALTHY, 40.0, True)]
    for status, at, changed in timeline:
        assert store.apply(verdict(status, at)) is changed, (status, at)
        assert store.status("web", EP) is status
    assert store.effective("web", EP).since == 40.0


def test_endpoints_are_independent(store: HealthStore) -> None:
    assert store.apply(verdict(HEALTHY, 10.0)) is True
    assert store.apply(verdict(UNHEALTHY, 11.0, endpoint="127.0.0.1:8082")) is True
    assert store.apply(verdict(DRAINING, 12.0, cluster="api")) is True  # same address, another cluster
    assert [store.status(c, e) for c, e in [("web", EP), ("web", "127.0.0.1:8082"), ("api", EP)]] == [
        HEALTHY, UNHEALTHY, DRAINING,
    ]  # fmt: skip
    assert len(list(store.verdicts())) == 3


# --------------------------------------------------------------------------- overrides


def test_override_wins_over_the_verdict(store: HealthStore) -> None:
    latest = verdict(HEALTHY, 10.0)
    store.apply(latest)
    drain = override(DRAINING, 20.0)
    assert set_override(store, drain) is True
    effective = store.effective("web", EP)
    assert (effective.status, effective.source, effective.reason, effective.since) == (
        DRAINING, "override:alice", "maintenance", 20.0,
    )  # fmt: skip
    assert (effective.verdict, effective.override) == (latest, drain)
    assert list(store.overrides()) == [drain]


def test_verdicts_under_an_override_change_nothing(store: HealthStore) -> None:
    store.apply(verdict(HEALTHY, 10.0))
    set_override(store, override(DRAINING, 20.0))
    assert store.apply(verdict(UNHEALTHY, 30.0)) is False
    assert store.apply(verdict(HEALTHY, 40.0)) is False
    effective = store.effective("web", EP)
    assert (effective.status, effective.since) == (DRAINING, 20.0)
    assert effective.verdict is not None and effective.verdict.time == 40.0  # still recorded


def test_override_matching_the_verdict_is_no_change(store: HealthStore) -> None:
    store.apply(verdict(HEALTHY, 10.0))
    assert set_override(store, override(HEALTHY, 20.0)) is False
    effective = store.effective("web", EP)
    assert (effective.status, effective.source, effective.since) == (HEALTHY, "override:alice", 10.0)


def test_replacing_an_override(store: HealthStore) -> None:
    set_override(store, override(DRAINING, 20.0))
    assert set_override(store, override(DRAINING, 25.0)) is False
    assert set_override(store, override(UNHEALTHY, 30.0)) is True
    assert store.effective("web", EP).since == 30.0


def test_none_clears_the_override_back_to_the_verdict(store: HealthStore) -> None:
    store.apply(verdict(HEALTHY, 10.0))
    set_override(store, override(UNHEALTHY, 20.0))
    store.apply(verdict(UNHEALTHY, 30.0))  # the override was right after all
    store.apply(verdict(HEALTHY, 40.0))
    assert set_override(store, None) is True
    effective = store.effective("web", EP)
    assert (effective.status, effective.source, effective.override, effective.since) == (
        HEALTHY, "prober:p1", None, CLEAR_TIME,
    )  # fmt: skip
    assert list(store.overrides()) == []


def test_clearing_an_override_that_matches_the_verdict_is_no_change(store: HealthStore) -> None:
    store.apply(verdict(UNHEALTHY, 10.0))
    set_override(store, override(UNHEALTHY, 20.0))
    assert set_override(store, None) is False
    assert store.effective("web", EP).since == 10.0


def test_clearing_without_an_override_is_no_change(store: HealthStore) -> None:
    store.apply(verdict(HEALTHY, 10.0))
    assert set_override(store, None) is False
    assert store.effective("web", EP).since == 10.0


def test_override_without_any_verdict(store: HealthStore) -> None:
    assert set_override(store, override(DRAINING, 20.0)) is True
    assert store.effective("web", EP).verdict is None
    assert set_override(store, None) is True
    assert store.status("web", EP) is UNKNOWN


# --------------------------------------------------------------------------- pruning


def test_prune_forgets_endpoints_the_topology_no_longer_has(store: HealthStore) -> None:
    topology = parse_topology({"clusters": [{"name": "web", "endpoints": [{"address": "127.0.0.1", "port": 8081}]}]})
    kept = verdict(HEALTHY, 10.0)
    store.apply(kept)
    store.apply(verdict(HEALTHY, 10.0, endpoint="127.0.0.1:9999"))
    store.apply(verdict(HEALTHY, 10.0, cluster="api"))
    store.set_override(override(DRAINING, 11.0), cluster="web", endpoint="127.0.0.1:9999")

    store.prune(topology)

    assert list(store.verdicts()) == [kept]
    assert list(store.overrides()) == []
    assert store.status("web", "127.0.0.1:9999") is UNKNOWN
    assert store.effective("api", EP).reason == "no verdict yet"
    # The history went too: the endpoint coming back healthy is a change again.
    assert store.apply(verdict(HEALTHY, 50.0, cluster="api")) is True
    assert store.effective("api", EP).since == 50.0
