"""The passive counting state machine (health/passive.py) and how passive votes meet the probers' (quorum)."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import pytest

from controlplane.health.passive import Failure, PassiveHealth, PassiveState
from controlplane.health.quorum import PASSIVE, Quorum
from controlplane.health.store import HealthStatus, Verdict
from controlplane.topology.model import PassiveCheck

POLICY = PassiveCheck(
    unhealthy_statuses=((500, 504),),
    http_failures=3,
    tcp_failures=2,
    timeouts=2,
    healthy_statuses=((200, 299),),
    successes=3,
    eject_for=10.0,
    max_eject_for=25.0,
)
EP = "10.0.0.1:80"


def machine(policy: PassiveCheck | None = POLICY) -> PassiveHealth:
    return PassiveHealth(lambda cluster: policy if cluster == "web" else None)


def hit(
    p: PassiveHealth, status: int = 200, failure: Failure | None = None, node: str = "e1", now: float = 0.0
) -> Verdict | None:
    return p.observe("web", EP, status=status, failure=failure, node=node, now=now)


def test_consecutive_http_failures_eject_with_the_counts_and_envoys_in_the_reason() -> None:
    p = machine()
    assert hit(p, 500, node="e1") is None
    assert hit(p, 503, node="e2") is None
    v = hit(p, 500, node="e1", now=5.0)
    assert v is not None
    assert (v.status, v.source, v.time) == (HealthStatus.UNHEALTHY, PASSIVE, 5.0)
    assert v.reason == "passive: 3 consecutive HTTP failures (500 x2, 503 x1) seen by e1 (2), e2 (1); ejected for 10s"
    assert hit(p, 500, now=6.0) is None  # in flight when it was ejected: no second verdict
    assert p.ejected_total == 1


def test_a_success_clears_the_failure_counts_and_a_failure_the_successes() -> None:
    p = machine()
    for _ in range(10):
        assert hit(p, 500) is None
        assert hit(p, 500) is None
        assert hit(p, 200) is None
    counts = p.counts[("web", EP)]
    assert (counts.http_failures, counts.successes, counts.seen_by) == (0, 1, {})
    hit(p, 500)
    assert counts.successes == 0


def test_statuses_in_neither_list_count_as_neither() -> None:
    p = machine()
    hit(p, 500)
    hit(p, 500)
    for _ in range(5):
        assert hit(p, 404) is None
    assert p.counts[("web", EP)].http_failures == 2
    assert hit(p, 500) is not None


def test_tcp_failures_and_timeouts_from_the_response_flags() -> None:
    p = machine()
    assert hit(p, 503, Failure.TCP) is None
    v = hit(p, 503, Failure.TCP)
    assert v is not None and "2 consecutive TCP failures seen by e1 (2)" in v.reason
    q = machine()
    assert hit(q, 504, Failure.TIMEOUT) is None
    v = hit(q, 504, Failure.TIMEOUT)
    assert v is not None and "2 consecutive timeouts" in v.reason
    assert q.counts[("web", EP)].http_failures == 0  # the flag decides, not the 504


def test_a_zero_threshold_turns_that_kind_off() -> None:
    p = machine(replace(POLICY, tcp_failures=0))
    assert all(hit(p, 503, Failure.TCP) is None for _ in range(50))


def test_clusters_without_passive_checks_are_not_counted() -> None:
    p = machine()
    assert p.observe("other", EP, status=500, failure=None, node="e1", now=0) is None
    assert p.counts == {}


def eject(p: PassiveHealth, now: float) -> Verdict:
    for _ in range(2):
        hit(p, 500, now=now)
    v = hit(p, 500, now=now)
    assert v is not None
    return v


def test_the_hold_ends_with_a_healthy_passive_verdict() -> None:
    p = machine()
    eject(p, 100.0)
    assert p.next_expiry() == 110.0
    assert p.expire(109.9) == []
    [ended] = p.expire(110.0)
    assert (ended.status, ended.source, ended.reason) == (
        HealthStatus.HEALTHY,
        PASSIVE,
        "passive ejection over after 10s",
    )
    assert p.expire(200.0) == [] and p.next_expiry() is None


def test_repeated_ejections_hold_longer_up_to_the_maximum_and_time_in_service_shortens_them() -> None:
    p = machine()
    assert "ejected for 10s" in eject(p, 0.0).reason
    p.expire(10.0)
    assert "ejected for 20s" in eject(p, 11.0).reason  # back within eject_for: twice as long
    p.expire(31.0)
    assert "ejected for 25s" in eject(p, 32.0).reason  # 30 s capped at max_eject_for
    p.expire(57.0)
    # 25 s in service (two eject_for periods) takes two steps off the multiplier of 3.
    assert "ejected for 20s" in eject(p, 82.0).reason


def test_successes_after_an_ejection_reset_the_multiplier() -> None:
    p = machine()
    eject(p, 0.0)
    p.expire(10.0)
    for _ in range(3):
        hit(p, 200, now=11.0)
    assert "ejected for 10s" in eject(p, 12.0).reason


def test_restore_times_the_hold_from_the_vote() -> None:
    p = machine()
    vote = Verdict("web", EP, HealthStatus.UNHEALTHY, "passive: ...", 100.0, PASSIVE)
    p.restore([vote, replace(vote, endpoint="10.0.0.2:80", source="prober:x")])
    assert p.next_expiry() == 110.0
    assert hit(p, 500) is None and hit(p, 500) is None and hit(p, 500) is None  # still held
    [ended] = p.forget(set(), 105.0)
    assert (ended.endpoint, ended.status, ended.source) == (EP, HealthStatus.HEALTHY, PASSIVE)
    assert ended.reason == "passive checks removed from the cluster"
    assert p.ejections == {} and p.counts == {}


# --------------------------------------------------------------------------- quorum


def prober(status: HealthStatus, t: float = 1.0, source: str = "prober:a") -> Verdict:
    return Verdict("web", EP, status, "http 200" if status is HealthStatus.HEALTHY else "http 506", t, source)


def passive(status: HealthStatus, t: float = 2.0) -> Verdict:
    return Verdict(
        "web", EP, status, "passive: 3 consecutive" if status is HealthStatus.UNHEALTHY else "over", t, PASSIVE
    )


@pytest.mark.parametrize("probers", [1, 2])
def test_a_failing_passive_vote_wins_over_passing_probers_while_it_holds(probers: int) -> None:
    q = Quorum()
    for i in range(probers):
        q.vote(prober(HealthStatus.HEALTHY, source=f"prober:{i}"))
    assert q.vote(passive(HealthStatus.UNHEALTHY)) == passive(HealthStatus.UNHEALTHY)
    combined = q.vote(prober(HealthStatus.HEALTHY, 3.0, "prober:0"))
    assert combined is not None and combined.source == PASSIVE and combined.status is HealthStatus.UNHEALTHY
    ended = q.vote(passive(HealthStatus.HEALTHY, 4.0))
    assert ended is not None and ended.status is HealthStatus.HEALTHY and ended.time == 4.0
    assert ended.reason.startswith("over; ")
    assert [v.source for v in q.votes("web", EP)] == [f"prober:{i}" for i in range(probers)]


def test_after_the_hold_a_failing_prober_keeps_it_down() -> None:
    q = Quorum()
    q.vote(passive(HealthStatus.UNHEALTHY))
    q.vote(prober(HealthStatus.UNHEALTHY, 3.0))
    ended = q.vote(passive(HealthStatus.HEALTHY, 4.0))
    assert ended is not None and ended.status is HealthStatus.UNHEALTHY and ended.source == "prober:a"


def test_without_probers_the_end_of_the_hold_is_healthy() -> None:
    q = Quorum()
    q.vote(passive(HealthStatus.UNHEALTHY))
    assert q.votes_from(PASSIVE) == [passive(HealthStatus.UNHEALTHY)]
    assert q.vote(passive(HealthStatus.HEALTHY, 4.0)) == passive(HealthStatus.HEALTHY, 4.0)
    assert q.votes("web", EP) == [] and q.votes_from(PASSIVE) == []


# --------------------------------------------------------------------------- through the control plane


def passive_plane(tmp_path: Any) -> Any:
    from controlplane.app import ControlPlane
    from controlplane.topology.parse import parse_topology

    document = {
        "controlplane": {"data_dir": str(tmp_path)},
        "clusters": [
            {
                "name": "web",
                "endpoints": [{"address": "10.0.0.1", "port": p} for p in (80, 81, 82, 83)],
                "passive": {"eject_for": "10s"},
            }
        ],
    }
    return ControlPlane(parse_topology(document))


def test_overrides_win_and_passive_holds_survive_a_restart(tmp_path: Any) -> None:
    cp = passive_plane(tmp_path)
    try:
        cp.set_override("web", "10.0.0.1:81", HealthStatus.HEALTHY, who="alice")
        down = [
            Verdict("web", f"10.0.0.1:{p}", HealthStatus.UNHEALTHY, "passive: 5 consecutive", 1000.0, PASSIVE)
            for p in (80, 81)
        ]
        assert cp.submit_verdicts(down) is not None
        assert cp.health.status("web", "10.0.0.1:80") is HealthStatus.UNHEALTHY
        assert cp.health.status("web", "10.0.0.1:81") is HealthStatus.HEALTHY  # the override wins
    finally:
        cp.close()
    again = passive_plane(tmp_path)
    try:
        assert again.health.status("web", "10.0.0.1:80") is HealthStatus.UNHEALTHY
        assert again.access_log.passive.next_expiry() == 1010.0  # timed from the vote, not the restart
        again.expire_passive(now=1010.0)
        health = again.health.effective("web", "10.0.0.1:80")
        assert (health.status, health.source) == (HealthStatus.HEALTHY, PASSIVE)
    finally:
        again.close()


def test_removing_passive_from_a_cluster_ends_its_holds(tmp_path: Any) -> None:
    from dataclasses import replace as dc_replace

    cp = passive_plane(tmp_path)
    try:
        now = time.time()
        verdict = Verdict("web", "10.0.0.1:80", HealthStatus.UNHEALTHY, "passive: 5 consecutive", now, PASSIVE)
        cp.submit_verdicts([verdict])
        cp.access_log.restore([verdict])  # the hold the access-log service would have started
        assert cp.health.status("web", "10.0.0.1:80") is HealthStatus.UNHEALTHY
        cp.expire_passive(now=now + 1)
        assert cp.health.status("web", "10.0.0.1:80") is HealthStatus.UNHEALTHY  # still held
        web = dc_replace(cp.topology.clusters[0], passive=None)
        cp.update_topology(dc_replace(cp.topology, clusters=(web,)))
        cp.expire_passive(now=now + 2)
        health = cp.health.effective("web", "10.0.0.1:80")
        assert (health.status, health.reason) == (HealthStatus.HEALTHY, "passive checks removed from the cluster")
    finally:
        cp.close()


def test_state_is_a_copy_of_the_counts_and_the_latest_ejection() -> None:
    p = machine()
    assert p.state("other", EP) is None  # no `passive` on that cluster
    assert p.state("web", EP) == PassiveState(0, 0, 0, 0, {}, 0, None, None, False)
    hit(p, 500, node="e1")
    hit(p, failure=Failure.TCP, node="e2")
    state = p.state("web", EP)
    assert state == PassiveState(0, 1, 1, 0, {"e1": 1, "e2": 1}, 0, None, None, False)
    assert hit(p, failure=Failure.TCP, node="e2", now=4.0) is not None
    assert state is not None and state.seen_by == {"e1": 1, "e2": 1}  # a copy: the ejection cleared the live one
    assert p.state("web", EP) == PassiveState(0, 0, 0, 0, {}, 1, 4.0, 14.0, True)
    p.expire(14.0)
    assert p.state("web", EP) == PassiveState(0, 0, 0, 0, {}, 1, 4.0, 14.0, False)
