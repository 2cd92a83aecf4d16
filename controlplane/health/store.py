"""Endpoint health as the control plane knows it: verdicts, operator overrides, and the result.

`HealthStore` is plain synchronous bookkeeping. Verdicts come from probers (or any other
`HealthInput` caller); overrides come from operators and win over verdicts until cleared with
`auto`. Every accepted change reports whether the effective status moved, so the caller knows
when a new EDS version is due.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from controlplane.topology.model import Topology


class HealthStatus(enum.Enum):
    """Envoy's `config.core.v3.HealthStatus`; the values are the proto enum numbers."""

    UNKNOWN = 0
    HEALTHY = 1
    UNHEALTHY = 2
    DRAINING = 3
    TIMEOUT = 4
    DEGRADED = 5

    @classmethod
    def parse(cls, text: str) -> HealthStatus:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            names = ", ".join(s.name for s in cls)
            raise ValueError(f"unknown health status {text!r} (expected one of {names})") from None


EndpointId = tuple[str, str]  # (cluster name, "address:port")


@dataclass(frozen=True, slots=True)
class Verdict:
    """One statement about one endpoint: its status, why, when, and who said it."""

    cluster: str
    endpoint: str  # "address:port"
    status: HealthStatus
    reason: str = ""
    time: float = field(default_factory=time.time)
    source: str = ""  # e.g. "prober:host-1", "override:alice"

    @property
    def id(self) -> EndpointId:
        return (self.cluster, self.endpoint)


@dataclass(frozen=True, slots=True)
class EndpointHealth:
    """The effective health of one endpoint and what it came from."""

    status: HealthStatus
    reason: str
    source: str
    since: float
    verdict: Verdict | None
    override: Verdict | None


_NO_VERDICT = EndpointHealth(HealthStatus.UNKNOWN, "no verdict yet", "", 0.0, None, None)


class HealthStore:
    """Latest verdict and override per endpoint; the effective status is override, else verdict."""

    def __init__(self) -> None:
        self._verdicts: dict[EndpointId, Verdict] = {}
        self._overrides: dict[EndpointId, Verdict] = {}
        self._since: dict[EndpointId, float] = {}

    def effective(self, cluster: str, endpoint: str) -> EndpointHealth:
        key = (cluster, endpoint)
        override = self._overrides.get(key)
        verdict = self._verdicts.get(key)
        chosen = override or verdict
        if chosen is None:
            return _NO_VERDICT
        return EndpointHealth(
            status=chosen.status,
            reason=chosen.reason,
            source=chosen.source,
            since=self._since.get(key, chosen.time),
            verdict=verdict,
            override=override,
        )

    def status(self, cluster: str, endpoint: str) -> HealthStatus:
        return self.effective(cluster, endpoint).status

    def apply(self, verdict: Verdict) -> bool:
        """Record a verdict; True when the endpoint's effective status changed."""
        before = self.status(verdict.cluster, verdict.endpoint)
        self._verdicts[verdict.id] = verdict
        return self._settle(verdict.id, before, verdict.time)

    def set_override(self, override: Verdict | None, *, cluster: str, endpoint: str) -> bool:
        """Set (or with None, clear) the operator override; True when the status changed."""
        key = (cluster, endpoint)
        before = self.status(cluster, endpoint)
        if override is None:
            self._overrides.pop(key, None)
        else:
            self._overrides[key] = override
        return self._settle(key, before, time.time() if override is None else override.time)

    def _settle(self, key: EndpointId, before: HealthStatus, when: float) -> bool:
        after = self.status(*key)
        if after is not before:
            self._since[key] = when
            return True
        self._since.setdefault(key, when)
        return False

    def verdicts(self) -> Iterable[Verdict]:
        return self._verdicts.values()

    def overrides(self) -> Iterable[Verdict]:
        return self._overrides.values()

    def prune(self, topology: Topology) -> None:
        """Forget endpoints that the topology no longer has."""
        live = {(c.name, e.key) for c in topology.clusters for e in c.endpoints}
        for table in (self._verdicts, self._overrides, self._since):
            for key in [k for k in table if k not in live]:
                del table[key]
