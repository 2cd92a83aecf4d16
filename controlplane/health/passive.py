"""Passive health from real traffic (issue 15): per-endpoint counters fed by every Envoy's access log.

The counters follow APISIX's passive checks (lua-resty-healthcheck): a response whose status is
in `healthy.http_statuses` adds a success and clears the failure counters; a status in
`unhealthy.http_statuses` adds an HTTP failure, a connection failure or reset a TCP failure, an
upstream timeout a timeout, and each clears the success counter. Any other status counts as
neither. Counts are per endpoint across all Envoys, so one Envoy's errors take the endpoint out
of every Envoy.

A failure counter reaching its threshold ejects the endpoint: one UNHEALTHY verdict with source
`passive`, whose reason names the counts and the Envoys that saw them. The ejection holds for
`eject_for` times the endpoint's recent ejections, up to `max_eject_for` (Envoy's outlier
detection grows `base_ejection_time` the same way); each `eject_for` spent in service takes one
off that multiplier, and `healthy.successes` consecutive successes clear it. When the hold ends,
`expire` returns a HEALTHY `passive` verdict: the quorum treats it as the end of the passive
vote, so the probers' verdict (or, without active checks, HEALTHY) applies again.

Plain synchronous bookkeeping: it never touches the health store.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from controlplane.health.quorum import FAILING, PASSIVE
from controlplane.health.store import EndpointId, HealthStatus, Verdict
from controlplane.topology.model import PassiveCheck


class Failure(enum.Enum):
    """What Envoy's response flags say went wrong with the upstream, beside the status code."""

    TCP = "tcp_failures"  # UF connection failure, UC connection termination, UR remote reset
    TIMEOUT = "timeouts"  # UT upstream request timeout


@dataclass(slots=True)
class Counts:
    """One endpoint's consecutive counters, and who saw the failures of the current run."""

    successes: int = 0
    http_failures: int = 0
    tcp_failures: int = 0
    timeouts: int = 0
    seen_by: dict[str, int] = field(default_factory=dict)  # node id -> failures in this run
    statuses: dict[int, int] = field(default_factory=dict)  # status -> HTTP failures in this run

    def clear_failures(self) -> None:
        self.http_failures = self.tcp_failures = self.timeouts = 0
        self.seen_by.clear()
        self.statuses.clear()

    def to_json(self) -> dict[str, Any]:
        return {
            "successes": self.successes,
            "http_failures": self.http_failures,
            "tcp_failures": self.tcp_failures,
            "timeouts": self.timeouts,
            "seen_by": dict(self.seen_by),
        }


@dataclass(slots=True)
class Ejection:
    """An endpoint's latest passive ejection: until when it holds and how many in a row."""

    start: float
    until: float
    multiplier: int
    verdict: Verdict
    active: bool = True


@dataclass(frozen=True, slots=True)
class PassiveState:
    """One endpoint's passive state as plain data (a copy: the admin API reads it, never the live counts)."""

    successes: int
    http_failures: int
    tcp_failures: int
    timeouts: int
    seen_by: dict[str, int]  # node id -> failures in the current run
    ejections_in_a_row: int  # the latest hold's multiplier (0: never ejected, or cleared by successes)
    ejected_at: float | None  # the latest hold's start and end (None: no hold to show)
    ejected_until: float | None
    ejected: bool  # whether that hold is still on


def _in(ranges: tuple[tuple[int, int], ...], status: int) -> bool:
    for lo, hi in ranges:
        if lo <= status <= hi:
            return True
    return False


class PassiveHealth:
    """Counters and ejections per endpoint; `observe` one request, `expire` ended holds."""

    def __init__(self, policy_of: Callable[[str], PassiveCheck | None]) -> None:
        self.policy_of = policy_of
        self.counts: dict[EndpointId, Counts] = {}
        self.ejections: dict[EndpointId, Ejection] = {}
        self.ejected_total = 0

    def observe(
        self, cluster: str, endpoint: str, *, status: int, failure: Failure | None, node: str, now: float
    ) -> Verdict | None:
        """Count one request's outcome; the UNHEALTHY verdict when it crosses a threshold."""
        policy = self.policy_of(cluster)
        if policy is None:
            return None
        key = (cluster, endpoint)
        counts = self.counts.get(key)
        if counts is None:
            counts = self.counts[key] = Counts()
        if failure is None:
            if _in(policy.healthy_statuses, status):
                counts.successes += 1
                if counts.http_failures or counts.tcp_failures or counts.timeouts:
                    counts.clear_failures()
                if counts.successes >= policy.successes:
                    self._recovered(key)
                return None
            if not _in(policy.unhealthy_statuses, status):
                return None
            counts.http_failures += 1
            counts.statuses[status] = counts.statuses.get(status, 0) + 1
        elif failure is Failure.TCP:
            counts.tcp_failures += 1
        else:
            counts.timeouts += 1
        counts.successes = 0
        counts.seen_by[node] = counts.seen_by.get(node, 0) + 1
        ejection = self.ejections.get(key)
        if ejection is not None and ejection.active:
            return None  # already out: requests in flight when it was ejected
        crossed = _crossed(policy, counts)
        if crossed is None:
            return None
        return self._eject(key, policy, counts, crossed, now)

    def _eject(self, key: EndpointId, policy: PassiveCheck, counts: Counts, crossed: str, now: float) -> Verdict:
        previous = self.ejections.get(key)
        multiplier = 1
        if previous is not None:
            # One step back per eject_for spent in service since the last hold ended.
            in_service = max(0.0, now - previous.until)
            multiplier = max(0, previous.multiplier - int(in_service // policy.eject_for)) + 1
        hold = min(policy.eject_for * multiplier, policy.max_eject_for)
        verdict = Verdict(key[0], key[1], HealthStatus.UNHEALTHY, _reason(counts, crossed, hold), now, PASSIVE)
        self.ejections[key] = Ejection(now, now + hold, multiplier, verdict)
        self.ejected_total += 1
        counts.clear_failures()
        counts.successes = 0
        return verdict

    def _recovered(self, key: EndpointId) -> None:
        ejection = self.ejections.get(key)
        if ejection is not None and not ejection.active:
            del self.ejections[key]  # proved itself: the next ejection starts from eject_for again

    def expire(self, now: float) -> list[Verdict]:
        """HEALTHY `passive` verdicts for the holds that have ended (the quorum ends the passive vote)."""
        out: list[Verdict] = []
        for key, ejection in self.ejections.items():
            if ejection.active and ejection.until <= now:
                ejection.active = False
                held = ejection.until - ejection.start
                reason = f"passive ejection over after {held:g}s"
                out.append(Verdict(key[0], key[1], HealthStatus.HEALTHY, reason, now, PASSIVE))
        return out

    def next_expiry(self) -> float | None:
        return min((e.until for e in self.ejections.values() if e.active), default=None)

    def restore(self, votes: Iterable[Verdict]) -> None:
        """Holds of the passive votes a restart reloaded, timed from when they were cast."""
        for v in votes:
            if v.source != PASSIVE or v.status not in FAILING:
                continue
            policy = self.policy_of(v.cluster)
            hold = policy.eject_for if policy is not None else 0.0
            self.ejections[v.id] = Ejection(v.time, v.time + hold, 1, v)

    def forget(self, keep: set[EndpointId], now: float) -> list[Verdict]:
        """Drop endpoints no longer under passive checks; the ends of the holds this cuts short."""
        ended: list[Verdict] = []
        for key in [k for k in self.ejections if k not in keep]:
            if self.ejections.pop(key).active:
                reason = "passive checks removed from the cluster"
                ended.append(Verdict(key[0], key[1], HealthStatus.HEALTHY, reason, now, PASSIVE))
        for key in [k for k in self.counts if k not in keep]:
            del self.counts[key]
        return ended

    def ejected(self) -> list[Ejection]:
        return [e for e in self.ejections.values() if e.active]

    def state(self, cluster: str, endpoint: str) -> PassiveState | None:
        """A copy of one endpoint's counters and latest ejection; None when its cluster has no `passive`."""
        if self.policy_of(cluster) is None:
            return None
        key = (cluster, endpoint)
        counts, ejection = self.counts.get(key) or Counts(), self.ejections.get(key)
        return PassiveState(
            successes=counts.successes,
            http_failures=counts.http_failures,
            tcp_failures=counts.tcp_failures,
            timeouts=counts.timeouts,
            seen_by=dict(counts.seen_by),
            ejections_in_a_row=ejection.multiplier if ejection is not None else 0,
            ejected_at=ejection.start if ejection is not None else None,
            ejected_until=ejection.until if ejection is not None else None,
            ejected=ejection is not None and ejection.active,
        )


def _crossed(policy: PassiveCheck, counts: Counts) -> str | None:
    if policy.http_failures and counts.http_failures >= policy.http_failures:
        return "http_failures"
    if policy.tcp_failures and counts.tcp_failures >= policy.tcp_failures:
        return "tcp_failures"
    if policy.timeouts and counts.timeouts >= policy.timeouts:
        return "timeouts"
    return None


def _reason(counts: Counts, crossed: str, hold: float) -> str:
    n = getattr(counts, crossed)
    what = {"http_failures": "HTTP failures", "tcp_failures": "TCP failures", "timeouts": "timeouts"}[crossed]
    detail = ""
    if crossed == "http_failures" and counts.statuses:
        detail = " (" + ", ".join(f"{s} x{c}" for s, c in sorted(counts.statuses.items())) + ")"
    seen = ", ".join(f"{node} ({c})" for node, c in sorted(counts.seen_by.items()))
    return f"passive: {n} consecutive {what}{detail} seen by {seen}; ejected for {hold:g}s"
