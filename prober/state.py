"""The threshold state machine of one endpoint: counters in, health_status transitions out.

Pure and synchronous: no clock, no sockets. Check results carry their own time.

Counters follow lua-resty-healthcheck (APISIX, Kong): one success counter and three failure
counters, each with its own threshold.

- A success adds to `successes` and resets every failure counter.
- A failure adds to its own counter (`http_failures`, `tcp_failures` or `timeouts`) and resets
  `successes`; the other failure counters keep their values.
- The endpoint becomes HEALTHY when `successes` reaches `healthy_threshold`, and UNHEALTHY when
  any failure counter reaches its threshold (`http_failures`, `tcp_failures` and `timeouts`
  default to `unhealthy_threshold`). Counters saturate at their threshold.

Initial status (`HealthCheck.initial_status`):

- `healthy` / `unhealthy` start there (nginx `default_down=false|true`).
- `unknown` (the default) uses the same thresholds in both directions: `healthy_threshold`
  consecutive successes make it HEALTHY and a failure threshold makes it UNHEALTHY. Envoy's
  own checker differs: a new host is "failed active HC" until its first success, and during
  startup one success is enough. We do not copy that rule. Envoy load balances to UNKNOWN
  EDS endpoints as if they were healthy, so there is no reason to promote a new endpoint early.
  The rise threshold also stops a flapping new endpoint from being announced healthy.

A transition is *pending* while the endpoint is heading somewhere: some counter that would
move it is above zero but below its threshold. `EndpointState.pending` gives the status it is
heading for; the scheduler uses it for the edge intervals.

An INCONCLUSIVE result (the prober's own event loop was too late to judge a timeout, or its own
TLS files for a gRPC check could not be read) leaves every counter as it was.

gRPC results map onto the same counters: a NOT_SERVING or unknown-service answer comes from the
application (like an HTTP status), so it counts as an `http_failure`. A transport error counts as
a `tcp_failure`, and DEADLINE_EXCEEDED as a `timeout`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal, NamedTuple

from controlplane.health.store import EndpointId, HealthStatus
from controlplane.topology.model import HealthCheck

__all__ = [
    "CheckResult",
    "Counters",
    "EndpointState",
    "PendingEdge",
    "ResultKind",
    "Target",
    "Thresholds",
    "Transition",
    "initial_health_status",
]

PendingEdge = Literal["healthy", "unhealthy"]


class ResultKind(enum.Enum):
    """What one check concluded; each failure kind has its own counter."""

    SUCCESS = "success"
    HTTP_FAILURE = "http_failure"  # unexpected status or body, or a gRPC health answer other than SERVING
    TCP_FAILURE = "tcp_failure"  # connect refused, reset, TLS error, TCP payload mismatch
    TIMEOUT = "timeout"
    # The prober cannot tell: its own event loop ran the deadline so late that the answer may have
    # been waiting unread. Counts nothing (see NetworkChecker), so an overloaded prober does not
    # turn its own lateness into UNHEALTHY verdicts (envoyproxy/envoy#28699, bench/prober_load.py).
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True, slots=True)
class Target:
    """One endpoint to check: the identity the prober keeps state under.

    Two targets are equal when cluster, address, port and policy are equal. An unchanged target
    keeps its counters across topology updates.
    """

    cluster: str
    address: str
    port: int  # the serving port; the check goes to `check_port`
    health_check: HealthCheck

    @property
    def endpoint(self) -> str:
        """ "address:port" as in `Endpoint.key` and `Verdict.endpoint`."""
        return f"{self.address}:{self.port}"

    @property
    def id(self) -> EndpointId:
        return (self.cluster, self.endpoint)

    @property
    def check_port(self) -> int:
        return self.health_check.port or self.port


class CheckResult(NamedTuple):
    """The outcome of one check. `time` is wall-clock seconds at completion; `latency` is seconds.

    A NamedTuple, not a frozen dataclass: one is built per check, and at 10,000 checks a second
    the dataclass's field-by-field `object.__setattr__` was a measurable share of a check.
    """

    kind: ResultKind
    reason: str
    time: float = 0.0
    latency: float = 0.0
    http_status: int | None = None

    @property
    def ok(self) -> bool:
        return self.kind is ResultKind.SUCCESS

    @classmethod
    def success(
        cls, reason: str = "ok", *, time: float = 0.0, latency: float = 0.0, http_status: int | None = None
    ) -> CheckResult:
        return cls(ResultKind.SUCCESS, reason, time, latency, http_status)

    @classmethod
    def http_failure(
        cls, reason: str, *, time: float = 0.0, latency: float = 0.0, http_status: int | None = None
    ) -> CheckResult:
        return cls(ResultKind.HTTP_FAILURE, reason, time, latency, http_status)

    @classmethod
    def tcp_failure(cls, reason: str, *, time: float = 0.0, latency: float = 0.0) -> CheckResult:
        return cls(ResultKind.TCP_FAILURE, reason, time, latency)

    @classmethod
    def timeout(cls, reason: str, *, time: float = 0.0, latency: float = 0.0) -> CheckResult:
        return cls(ResultKind.TIMEOUT, reason, time, latency)


@dataclass(frozen=True, slots=True)
class Counters:
    """Consecutive results per kind, as lua-resty-healthcheck counts them."""

    successes: int = 0
    http_failures: int = 0
    tcp_failures: int = 0
    timeouts: int = 0

    def failures(self) -> tuple[int, int, int]:
        return (self.http_failures, self.tcp_failures, self.timeouts)

    def to_json(self) -> dict[str, int]:
        return {
            "successes": self.successes,
            "http_failures": self.http_failures,
            "tcp_failures": self.tcp_failures,
            "timeouts": self.timeouts,
        }


@dataclass(frozen=True, slots=True)
class Thresholds:
    """How many consecutive results of each kind move the status; every value is >= 1."""

    successes: int = 2
    http_failures: int = 3
    tcp_failures: int = 3
    timeouts: int = 3

    def __post_init__(self) -> None:
        for name in ("successes", "http_failures", "tcp_failures", "timeouts"):
            if getattr(self, name) < 1:
                raise ValueError(f"threshold {name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_health_check(cls, hc: HealthCheck) -> Thresholds:
        """The thresholds of a policy; per-kind failure thresholds default to unhealthy_threshold."""
        fall = hc.unhealthy_threshold
        return cls(
            successes=hc.healthy_threshold,
            http_failures=hc.http_failures if hc.http_failures is not None else fall,
            tcp_failures=hc.tcp_failures if hc.tcp_failures is not None else fall,
            timeouts=hc.timeouts if hc.timeouts is not None else fall,
        )


@dataclass(frozen=True, slots=True)
class Transition:
    """A status change of one endpoint, with the result that caused it and the counters after it."""

    cluster: str
    endpoint: str  # "address:port"
    old: HealthStatus
    new: HealthStatus
    reason: str
    counters: Counters
    time: float

    @property
    def id(self) -> EndpointId:
        return (self.cluster, self.endpoint)


_INITIAL = {
    "unknown": HealthStatus.UNKNOWN,
    "healthy": HealthStatus.HEALTHY,
    "unhealthy": HealthStatus.UNHEALTHY,
}


def initial_health_status(hc: HealthCheck) -> HealthStatus:
    """The status an endpoint has before its first check."""
    return _INITIAL[hc.initial_status]


class EndpointState:
    """Status and counters of one endpoint; `observe` feeds it one check result at a time."""

    __slots__ = ("_counters", "_steady", "checks", "cluster", "endpoint", "reason", "since", "status", "thresholds")

    def __init__(
        self,
        cluster: str,
        endpoint: str,
        thresholds: Thresholds,
        *,
        initial_status: HealthStatus = HealthStatus.UNKNOWN,
        since: float = 0.0,
    ) -> None:
        if initial_status not in (HealthStatus.UNKNOWN, HealthStatus.HEALTHY, HealthStatus.UNHEALTHY):
            raise ValueError(f"initial status must be UNKNOWN, HEALTHY or UNHEALTHY, not {initial_status.name}")
        self.cluster = cluster
        self.endpoint = endpoint
        self.thresholds = thresholds
        self.status: HealthStatus = initial_status
        self.reason = f"initial status {initial_status.name}"
        self.since = since  # time of the last status change (or of creation)
        self.checks = 0  # results observed so far
        self._counters = Counters()
        # The counters of a HEALTHY endpoint whose successes are at the threshold: the state of
        # almost every check, which `observe` then answers without building anything.
        self._steady = Counters(successes=thresholds.successes)

    @classmethod
    def for_target(cls, target: Target, *, since: float = 0.0) -> EndpointState:
        hc = target.health_check
        return cls(
            target.cluster,
            target.endpoint,
            Thresholds.from_health_check(hc),
            initial_status=initial_health_status(hc),
            since=since,
        )

    def restart(self, target: Target) -> EndpointState:
        """A state for `target`'s new policy that keeps this status, reason and since; counters restart.

        A policy edit is no news about the endpoint. Going back to the initial status would
        briefly route to an endpoint we know is down, because Envoy treats UNKNOWN as healthy.
        """
        state = EndpointState(
            target.cluster,
            target.endpoint,
            Thresholds.from_health_check(target.health_check),
            initial_status=self.status,
            since=self.since,
        )
        state.reason = self.reason
        return state

    @property
    def counters(self) -> Counters:
        return self._counters

    @property
    def pending(self) -> PendingEdge | None:
        """The status a transition is heading for, or None when no transition is under way."""
        c = self._counters
        if self.status is not HealthStatus.HEALTHY and c.successes > 0:
            return "healthy"
        if self.status is not HealthStatus.UNHEALTHY and any(c.failures()):
            return "unhealthy"
        return None

    def observe(self, result: CheckResult) -> Transition | None:
        """Count one result; the Transition when it moved the status, else None."""
        self.checks += 1
        kind = result.kind
        c = self._counters
        if kind is ResultKind.SUCCESS and c is self._steady and self.status is HealthStatus.HEALTHY:
            return None  # healthy, and stays so: nothing changes
        if kind is ResultKind.INCONCLUSIVE:
            return None  # neither a success nor a failure: every counter keeps its value
        t = self.thresholds
        target: HealthStatus | None = None
        if kind is ResultKind.SUCCESS:
            successes = min(c.successes + 1, t.successes)
            if successes >= t.successes and not (c.http_failures or c.tcp_failures or c.timeouts):
                self._counters = self._steady  # the one object the fast path above recognises
            elif successes != c.successes or c.http_failures or c.tcp_failures or c.timeouts:
                self._counters = Counters(successes=successes)  # else unchanged: no new object per check
            if successes >= t.successes:
                target = HealthStatus.HEALTHY
        else:
            if kind is ResultKind.HTTP_FAILURE:
                n, limit = min(c.http_failures + 1, t.http_failures), t.http_failures
                self._counters = Counters(0, n, c.tcp_failures, c.timeouts)
            elif kind is ResultKind.TCP_FAILURE:
                n, limit = min(c.tcp_failures + 1, t.tcp_failures), t.tcp_failures
                self._counters = Counters(0, c.http_failures, n, c.timeouts)
            else:
                n, limit = min(c.timeouts + 1, t.timeouts), t.timeouts
                self._counters = Counters(0, c.http_failures, c.tcp_failures, n)
            if n >= limit:
                target = HealthStatus.UNHEALTHY
        if target is None or target is self.status:
            return None
        old, self.status = self.status, target
        self.reason = result.reason
        self.since = result.time
        return Transition(
            cluster=self.cluster,
            endpoint=self.endpoint,
            old=old,
            new=target,
            reason=result.reason,
            counters=self._counters,
            time=result.time,
        )

    def __repr__(self) -> str:
        return f"EndpointState({self.cluster}/{self.endpoint} {self.status.name} {self._counters})"
