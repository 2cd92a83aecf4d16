"""The prober quorum and the mass-failure guard: plain bookkeeping, plain tests."""

from __future__ import annotations

from controlplane.health.guard import Admitted, MassFailureGuard
from controlplane.health.quorum import Quorum, combine
from controlplane.health.store import HealthStatus, Verdict

H, U, T, K = HealthStatus.HEALTHY, HealthStatus.UNHEALTHY, HealthStatus.TIMEOUT, HealthStatus.UNKNOWN


def v(status: HealthStatus, source: str = "prober:a", endpoint: str = "10.0.0.1:80", t: float = 1.0) -> Verdict:
    return Verdict("web", endpoint, status, f"{source} says {status.name}", t, source)


def test_a_single_source_passes_through_unchanged() -> None:
    q = Quorum()
    verdict = v(U)
    assert q.vote(verdict) is verdict


def test_unhealthy_needs_a_strict_majority_of_the_probers_that_see_it() -> None:
    q = Quorum()
    q.vote(v(H, "prober:a"))
    q.vote(v(H, "prober:b"))
    one = q.vote(v(U, "prober:c", t=2.0))
    assert one is not None and one.status is H and one.reason.startswith("2 of 3 probers")
    two = q.vote(v(T, "prober:b", t=3.0))
    assert two is not None and two.status is T and two.source == "quorum"
    assert two.reason.startswith("2 of 3 probers: prober:b says TIMEOUT")


def test_a_tie_is_not_a_majority() -> None:
    assert combine([v(H, "prober:a"), v(U, "prober:b", t=5.0)]).status is H


def test_unknown_is_no_vote_and_does_not_replace_a_known_one() -> None:
    q = Quorum()
    q.vote(v(U, "prober:a"))
    # The same prober restarted: it says UNKNOWN until its thresholds decide.
    assert q.vote(v(K, "prober:a", t=9.0)) is None
    assert [x.status for x in q.votes("web", "10.0.0.1:80")] == [U]
    # Another prober that has not decided yet does not dilute the majority either.
    assert q.vote(v(K, "prober:b", t=9.0)) is None
    assert combine([v(U, "prober:a"), v(K, "prober:b", t=9.0)]).status is U


def test_only_unknown_votes_give_unknown() -> None:
    q = Quorum()
    combined = q.vote(v(K))
    assert combined is not None and combined.status is K


def test_dropping_a_source_lets_the_others_decide() -> None:
    q = Quorum()
    q.vote(v(H, "prober:a", endpoint="10.0.0.1:80"))
    q.vote(v(U, "prober:b", endpoint="10.0.0.1:80", t=2.0))
    q.vote(v(U, "prober:c", endpoint="10.0.0.1:80", t=3.0))
    q.vote(v(H, "prober:a", endpoint="10.0.0.2:80"))  # only a sees this one
    q.vote(v(U, "prober:b", endpoint="10.0.0.3:80"))  # a never saw this one
    [decided] = q.drop_source("prober:a")
    assert (decided.endpoint, decided.status, decided.reason) == (
        "10.0.0.1:80",
        U,
        "2 of 2 probers: prober:c says UNHEALTHY",
    )
    # Nobody else has a say on 10.0.0.2: no verdict from the drop, no votes left.
    assert q.votes("web", "10.0.0.2:80") == []
    assert [x.source for x in q.votes("web", "10.0.0.3:80")] == ["prober:b"]
    assert q.drop_source("prober:a") == []


def test_forget_drops_endpoints_gone_from_the_topology() -> None:
    q = Quorum()
    q.vote(v(U, endpoint="10.0.0.1:80"))
    q.vote(v(U, endpoint="10.0.0.2:80"))
    q.forget({("web", "10.0.0.2:80")})
    assert q.votes("web", "10.0.0.1:80") == [] and len(q.votes("web", "10.0.0.2:80")) == 1


# --------------------------------------------------------------------------- guard


def eps(n: int) -> list[str]:
    return [f"10.0.0.{i}:80" for i in range(1, n + 1)]


def admit(
    guard: MassFailureGuard, verdicts: list[Verdict], now: float, status: dict[str, HealthStatus] | None = None
) -> Admitted:
    known = status or {}
    return guard.admit(
        verdicts,
        status_of=lambda c, e: known.get(e, H),
        verdict_of=lambda c, e: v(known.get(e, H), endpoint=e, t=0.0),
        size_of=lambda c: 10,
        now=now,
    )


def test_a_whole_round_failing_is_held() -> None:
    guard = MassFailureGuard(share=0.5, window=10, min_failures=3)
    out = admit(guard, [v(U, endpoint=e) for e in eps(10)], now=100)
    assert out.apply == [] and len(out.held) == 10 and out.newly_held == ["web"]
    assert set(guard.held["web"]) == set(eps(10))


def test_up_to_the_share_fails_normally() -> None:
    guard = MassFailureGuard(share=0.5, window=10, min_failures=3)
    out = admit(guard, [v(U, endpoint=e) for e in eps(5)], now=100)
    assert len(out.apply) == 5 and out.held == [] and out.newly_held == []


def test_failures_spread_over_one_window_add_up_and_all_are_held() -> None:
    guard = MassFailureGuard(share=0.5, window=10, min_failures=3)
    first = admit(guard, [v(U, endpoint=e) for e in eps(4)], now=100)
    later = admit(guard, [v(U, endpoint=e) for e in eps(10)[4:]], now=105)
    assert len(first.apply) == 4 and first.held == []
    # The share is crossed: the earlier four are reverted to their verdict before, all ten held.
    assert later.newly_held == ["web"] and len(later.held) == 10 and len(guard.held["web"]) == 10
    assert sorted((x.endpoint, x.status, x.time) for x in later.apply) == [(e, H, 0.0) for e in eps(4)]


def test_a_reverted_endpoint_without_an_earlier_verdict_goes_back_to_unknown() -> None:
    guard = MassFailureGuard(share=0.5, window=10, min_failures=3)
    first = [v(U, endpoint=e) for e in eps(2)]
    guard.admit(first, status_of=lambda c, e: K, verdict_of=lambda c, e: None, size_of=lambda c: 4, now=1)
    out = guard.admit(
        [v(U, endpoint=eps(3)[2])], status_of=lambda c, e: K, verdict_of=lambda c, e: None, size_of=lambda c: 4, now=2
    )
    assert sorted((x.endpoint, x.status, x.source) for x in out.apply) == [(e, K, "guard") for e in eps(2)]


def test_an_endpoint_that_recovered_in_the_window_is_not_counted() -> None:
    guard = MassFailureGuard(share=0.5, window=10, min_failures=3)
    admit(guard, [v(U, endpoint=e) for e in eps(5)], now=100)
    admit(guard, [v(H, endpoint=e) for e in eps(5)], now=101, status={e: U for e in eps(5)})
    out = admit(guard, [v(U, endpoint=e) for e in eps(10)[5:]], now=102)
    assert len(out.apply) == 5 and out.held == []


def test_failures_in_different_windows_do_not_add_up() -> None:
    guard = MassFailureGuard(share=0.5, window=10, min_failures=3)
    admit(guard, [v(U, endpoint=e) for e in eps(4)], now=100)
    later = admit(guard, [v(U, endpoint=e) for e in eps(8)[4:]], now=200)
    assert len(later.apply) == 4 and later.held == []


def test_small_clusters_below_min_failures_are_never_held() -> None:
    guard = MassFailureGuard(share=0.5, window=10, min_failures=3)
    out = guard.admit(
        [v(U, endpoint=e) for e in eps(2)],
        status_of=lambda c, e: H,
        verdict_of=lambda c, e: None,
        size_of=lambda c: 2,
        now=1,
    )
    assert len(out.apply) == 2 and out.held == []


def test_already_failing_endpoints_and_recoveries_pass() -> None:
    guard = MassFailureGuard(share=0.5, window=10, min_failures=3)
    admit(guard, [v(U, endpoint=e) for e in eps(10)], now=100)
    # An endpoint that was already UNHEALTHY gets a new reason: not a new failure.
    out = admit(guard, [v(U, endpoint="10.0.0.99:80")], now=101, status={"10.0.0.99:80": U})
    assert len(out.apply) == 1
    # A held endpoint that passes again: its held failure is dropped; the last one releases.
    out = admit(guard, [v(H, endpoint=e) for e in eps(9)], now=102)
    assert len(out.apply) == 9 and out.released == [] and list(guard.held["web"]) == ["10.0.0.10:80"]
    out = admit(guard, [v(H, endpoint="10.0.0.10:80")], now=103)
    assert out.released == ["web"] and "web" not in guard.held


def test_accept_hands_back_the_held_verdicts_and_starts_over() -> None:
    guard = MassFailureGuard(share=0.5, window=10, min_failures=3)
    admit(guard, [v(U, endpoint=e) for e in eps(10)], now=100)
    accepted = guard.accept("web")
    assert sorted(x.endpoint for x in accepted) == sorted(eps(10))
    assert guard.held == {} and guard.accept("web") == []
