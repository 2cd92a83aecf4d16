"""The threshold state machine: lua-resty-healthcheck counters, thresholds and initial status."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controlplane.health.store import HealthStatus
from controlplane.topology.model import HealthCheck
from prober.state import (
    CheckResult,
    Counters,
    EndpointState,
    ResultKind,
    Target,
    Thresholds,
    initial_health_status,
)

OK = CheckResult.success("http 200")
HTTP = CheckResult.http_failure("http 506", http_status=506)
TCP = CheckResult.tcp_failure("connect refused")
TIMEOUT = CheckResult.timeout("timeout after 500ms")
INCONCLUSIVE = CheckResult(ResultKind.INCONCLUSIVE, "prober overloaded: timeout ran 300ms late")
BY_KIND = {
    ResultKind.SUCCESS: OK,
    ResultKind.HTTP_FAILURE: HTTP,
    ResultKind.TCP_FAILURE: TCP,
    ResultKind.TIMEOUT: TIMEOUT,
    ResultKind.INCONCLUSIVE: INCONCLUSIVE,
}
COUNTER = {
    ResultKind.HTTP_FAILURE: "http_failures",
    ResultKind.TCP_FAILURE: "tcp_failures",
    ResultKind.TIMEOUT: "timeouts",
}


def machine(
    successes: int = 2,
    failures: int = 3,
    *,
    initial: HealthStatus = HealthStatus.UNKNOWN,
    http: int | None = None,
    tcp: int | None = None,
    timeouts: int | None = None,
) -> EndpointState:
    t = Thresholds(successes, http or failures, tcp or failures, timeouts or failures)
    return EndpointState("web", "10.0.0.1:8080", t, initial_status=initial)


def feed(state: EndpointState, *results: CheckResult) -> list[HealthStatus]:
    """The status after each result."""
    out = []
    for r in results:
        state.observe(r)
        out.append(state.status)
    return out


# --------------------------------------------------------------------------- thresholds and policy


def test_thresholds_default_to_unhealthy_threshold() -> None:
    hc = HealthCheck(kind="http", healthy_threshold=4, unhealthy_threshold=5, tcp_failures=2)
    assert Thresholds.from_health_check(hc) == Thresholds(successes=4, http_failures=5, tcp_failures=2, timeouts=5)


def test_thresholds_must_be_positive() -> None:
    with pytest.raises(ValueError, match="timeouts"):
        Thresholds(1, 1, 1, 0)


@pytest.mark.parametrize(
    ("initial", "status"),
    [("unknown", HealthStatus.UNKNOWN), ("healthy", HealthStatus.HEALTHY), ("unhealthy", HealthStatus.UNHEALTHY)],
)
def test_initial_status_from_policy(initial: str, status: HealthStatus) -> None:
    hc = HealthCheck(kind="tcp", initial_status=initial)  # type: ignore[arg-type]
    assert initial_health_status(hc) is status
    state = EndpointState.for_target(Target("db", "10.0.0.2", 5432, hc), since=12.0)
    assert (state.status, state.since, state.checks, state.counters) == (status, 12.0, 0, Counters())
    assert (state.cluster, state.endpoint) == ("db", "10.0.0.2:5432")


def test_initial_status_must_be_one_of_three() -> None:
    with pytest.raises(ValueError):
        machine(initial=HealthStatus.DRAINING)


# --------------------------------------------------------------------------- transitions


def test_unknown_needs_healthy_threshold_successes() -> None:
    state = machine(successes=3)
    assert feed(state, OK, OK, OK) == [HealthStatus.UNKNOWN, HealthStatus.UNKNOWN, HealthStatus.HEALTHY]


def test_unknown_needs_a_full_failure_threshold() -> None:
    state = machine(failures=2)
    assert feed(state, HTTP, HTTP) == [HealthStatus.UNKNOWN, HealthStatus.UNHEALTHY]


def test_healthy_to_unhealthy_and_back_with_transitions() -> None:
    state = machine(successes=2, failures=3, initial=HealthStatus.HEALTHY)
    assert state.observe(HTTP) is None
    assert state.observe(HTTP._replace(time=5.0)) is None
    t = state.observe(HTTP._replace(time=7.5))
    assert t is not None
    assert (t.old, t.new, t.reason, t.time) == (HealthStatus.HEALTHY, HealthStatus.UNHEALTHY, "http 506", 7.5)
    assert t.counters == Counters(http_failures=3)
    assert (t.cluster, t.endpoint, t.id) == ("web", "10.0.0.1:8080", ("web", "10.0.0.1:8080"))
    assert (state.reason, state.since) == ("http 506", 7.5)
    assert state.observe(OK) is None
    back = state.observe(OK)
    assert back is not None and (back.old, back.new) == (HealthStatus.UNHEALTHY, HealthStatus.HEALTHY)
    assert back.counters == Counters(successes=2)


def test_each_failure_kind_has_its_own_counter_and_threshold() -> None:
    state = machine(initial=HealthStatus.HEALTHY, http=3, tcp=2, timeouts=4)
    feed(state, HTTP, HTTP, TCP, TIMEOUT)
    # Different failure kinds do not reset each other; none reached its threshold.
    assert state.counters == Counters(http_failures=2, tcp_failures=1, timeouts=1)
    assert state.status is HealthStatus.HEALTHY
    t = state.observe(TCP)
    assert t is not None and t.new is HealthStatus.UNHEALTHY and t.reason == "connect refused"
    assert t.counters == Counters(http_failures=2, tcp_failures=2, timeouts=1)


def test_success_resets_every_failure_counter() -> None:
    state = machine(initial=HealthStatus.HEALTHY)
    feed(state, HTTP, TCP, TIMEOUT, HTTP)
    state.observe(OK)
    assert state.counters == Counters(successes=1)


def test_failure_resets_the_success_counter_only() -> None:
    state = machine(successes=3, initial=HealthStatus.UNHEALTHY)
    feed(state, TCP, TCP, TCP, OK, OK)
    assert state.counters == Counters(successes=2)
    state.observe(TIMEOUT)
    assert state.counters == Counters(timeouts=1)
    assert state.status is HealthStatus.UNHEALTHY


def test_counters_saturate_at_their_threshold() -> None:
    state = machine(successes=2, failures=3)
    feed(state, *[OK] * 10)
    assert state.counters.successes == 2
    feed(state, *[HTTP] * 10)
    assert state.counters.http_failures == 3


def test_no_transition_when_already_there() -> None:
    state = machine(initial=HealthStatus.UNHEALTHY, failures=1)
    assert state.observe(HTTP) is None
    state = machine(initial=HealthStatus.HEALTHY, successes=1)
    assert state.observe(OK) is None


def test_pending_edge() -> None:
    state = machine(successes=2, failures=2)
    assert state.pending is None
    state.observe(OK)
    assert state.pending == "healthy"  # unknown, heading up
    state.observe(OK)
    assert (state.status, state.pending) == (HealthStatus.HEALTHY, None)
    state.observe(TIMEOUT)
    assert state.pending == "unhealthy"  # healthy, heading down
    state.observe(TIMEOUT)
    assert (state.status, state.pending) == (HealthStatus.UNHEALTHY, None)
    state.observe(HTTP)  # more failures while unhealthy move nothing
    assert state.pending is None
    state.observe(OK)
    assert state.pending == "healthy"


def test_restart_keeps_status_and_resets_counters() -> None:
    state = machine(initial=HealthStatus.HEALTHY)
    feed(state, HTTP, HTTP._replace(time=3.0), HTTP._replace(time=4.0), OK)
    hc = HealthCheck(kind="http", healthy_threshold=5, unhealthy_threshold=1)
    fresh = state.restart(Target("web", "10.0.0.1", 8080, hc))
    assert (fresh.status, fresh.reason, fresh.since) == (HealthStatus.UNHEALTHY, "http 506", 4.0)
    assert (fresh.counters, fresh.checks, fresh.thresholds.successes) == (Counters(), 0, 5)


def test_checks_count_every_result() -> None:
    state = machine()
    feed(state, OK, HTTP, TIMEOUT)
    assert state.checks == 3


# --------------------------------------------------------------------------- properties

kinds = st.sampled_from(list(ResultKind))
initials = st.sampled_from([HealthStatus.UNKNOWN, HealthStatus.HEALTHY, HealthStatus.UNHEALTHY])
thresholds = st.builds(
    Thresholds,
    successes=st.integers(1, 5),
    http_failures=st.integers(1, 5),
    tcp_failures=st.integers(1, 5),
    timeouts=st.integers(1, 5),
)


def limit_of(t: Thresholds, kind: ResultKind) -> int:
    return t.successes if kind is ResultKind.SUCCESS else int(getattr(t, COUNTER[kind]))


@settings(deadline=None)  # timing on a loaded CI box is not what these test
@given(thresholds, initials, st.lists(kinds, max_size=60))
def test_status_changes_only_when_a_threshold_is_met(
    t: Thresholds, initial: HealthStatus, sequence: list[ResultKind]
) -> None:
    state = EndpointState("c", "e:1", t, initial_status=initial)
    for kind in sequence:
        before = state.status
        transition = state.observe(BY_KIND[kind])
        assert (transition is not None) == (state.status is not before)
        if transition is None:
            continue
        assert transition.old is before and transition.new is state.status
        if kind is ResultKind.SUCCESS:
            assert transition.new is HealthStatus.HEALTHY
            assert transition.counters.successes == t.successes
        else:
            assert transition.new is HealthStatus.UNHEALTHY
            assert getattr(transition.counters, COUNTER[kind]) == limit_of(t, kind)


@settings(deadline=None)  # timing on a loaded CI box is not what these test
@given(thresholds, initials, st.lists(kinds, max_size=60))
def test_counter_reset_rules(t: Thresholds, initial: HealthStatus, sequence: list[ResultKind]) -> None:
    state = EndpointState("c", "e:1", t, initial_status=initial)
    for kind in sequence:
        before = state.counters
        state.observe(BY_KIND[kind])
        c = state.counters
        assert 0 <= c.successes <= t.successes
        assert all(0 <= n <= limit_of(t, k) for n, k in zip(c.failures(), COUNTER, strict=True))
        if kind is ResultKind.INCONCLUSIVE:
            assert c == before
        elif kind is ResultKind.SUCCESS:
            assert c.failures() == (0, 0, 0)
            assert c.successes == min(before.successes + 1, t.successes)
        else:
            assert c.successes == 0
            name = COUNTER[kind]
            assert getattr(c, name) == min(getattr(before, name) + 1, limit_of(t, kind))
            for other in set(COUNTER.values()) - {name}:
                assert getattr(c, other) == getattr(before, other)


@settings(deadline=None)  # timing on a loaded CI box is not what these test
@given(thresholds, initials, st.lists(kinds, max_size=40), st.integers(0, 8))
def test_enough_consecutive_results_settle_the_status(
    t: Thresholds, initial: HealthStatus, prefix: list[ResultKind], extra: int
) -> None:
    state = EndpointState("c", "e:1", t, initial_status=initial)
    feed(state, *(BY_KIND[k] for k in prefix))
    assert feed(state, *[OK] * (t.successes + extra))[-1] is HealthStatus.HEALTHY
    assert state.pending is None
    assert feed(state, *[TCP] * (t.tcp_failures + extra))[-1] is HealthStatus.UNHEALTHY


@settings(deadline=None)  # timing on a loaded CI box is not what these test
@given(thresholds, initials, st.lists(kinds, max_size=60))
def test_matches_a_reference_model(t: Thresholds, initial: HealthStatus, sequence: list[ResultKind]) -> None:
    """Replays the rules with unbounded counters: the status only depends on the recent run."""
    state = EndpointState("c", "e:1", t, initial_status=initial)
    status, successes, failures = initial, 0, dict.fromkeys(COUNTER, 0)
    for kind in sequence:
        if kind is ResultKind.INCONCLUSIVE:
            pass
        elif kind is ResultKind.SUCCESS:
            successes += 1
            failures = dict.fromkeys(COUNTER, 0)
            if successes >= t.successes:
                status = HealthStatus.HEALTHY
        else:
            successes = 0
            failures[kind] += 1
            if failures[kind] >= limit_of(t, kind):
                status = HealthStatus.UNHEALTHY
        state.observe(BY_KIND[kind])
        assert state.status is status
        heading_up = status is not HealthStatus.HEALTHY and successes > 0
        heading_down = status is not HealthStatus.UNHEALTHY and any(failures.values())
        assert state.pending == ("healthy" if heading_up else "unhealthy" if heading_down else None)


def test_inconclusive_counts_nothing_either_way() -> None:
    overloaded = CheckResult(ResultKind.INCONCLUSIVE, "prober overloaded: timeout ran 300ms late")
    state = machine(successes=2, failures=2, initial=HealthStatus.HEALTHY)
    assert feed(state, TIMEOUT, overloaded, overloaded) == [HealthStatus.HEALTHY] * 3
    assert state.counters == Counters(timeouts=1)  # kept, not reset by the inconclusive results
    assert feed(state, TIMEOUT) == [HealthStatus.UNHEALTHY]
    assert feed(state, OK, overloaded) == [HealthStatus.UNHEALTHY] * 2
    assert state.counters == Counters(successes=1) and state.pending == "healthy"


def test_link_backoff_doubles_up_to_the_cap_and_never_overflows() -> None:
    import itertools
    import random

    from prober.link import backoff_delays

    class Top(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return b  # the ceiling of each draw

    ceilings = list(itertools.islice(backoff_delays(0.2, 10.0, Top()), 5000))
    assert ceilings[:4] == [0.2, 0.4, 0.8, 1.6]
    assert ceilings[-1] == 10.0 and max(ceilings) == 10.0
