"""The mass-failure guard: a prober that loses its own network must not mark the world down.

When more than `share` of a cluster's endpoints (and at least `min_failures` of them) turn
failing within one `window` (about one check round), the failures beyond that point are held:
the endpoints keep their previous status, the cluster is reported as held, and an operator
decides (accept applies the held verdicts; a later passing verdict for an endpoint drops its
held failure). Failures that arrived before the share was crossed were applied: at most
`share` of a cluster goes down through the guard per window. Recoveries are never held.

Plain synchronous bookkeeping: `admit` splits a batch of verdicts into those to apply now and
those held; it never touches the health store.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from controlplane.health import HealthStatus, Verdict
from controlplane.quorum import FAILING


@dataclass(slots=True)
class Admitted:
    """The outcome of one batch: what to apply, and which clusters started holding."""

    apply: list[Verdict] = field(default_factory=list)
    held: list[Verdict] = field(default_factory=list)
    newly_held: list[str] = field(default_factory=list)  # clusters whose hold began in this batch
    released: list[str] = field(default_factory=list)  # clusters that hold nothing any more


class MassFailureGuard:
    """Per cluster: recent failures (endpoint -> time) and held verdicts (endpoint -> verdict)."""

    def __init__(self, *, share: float = 0.5, window: float = 10.0, min_failures: int = 3) -> None:
        self.share = share
        self.window = window
        self.min_failures = min_failures
        self.recent: dict[str, dict[str, float]] = {}
        self.held: dict[str, dict[str, Verdict]] = {}

    def admit(
        self,
        verdicts: Sequence[Verdict],
        *,
        status_of: Callable[[str, str], HealthStatus],
        size_of: Callable[[str], int],
        now: float,
    ) -> Admitted:
        """Split `verdicts` (one per endpoint) into those to apply and those to hold."""
        out = Admitted()
        candidates: dict[str, list[Verdict]] = {}
        for v in verdicts:
            held = self.held.get(v.cluster)
            if v.status not in FAILING:
                if held is not None and held.pop(v.endpoint, None) is not None and not held:
                    del self.held[v.cluster]
                    out.released.append(v.cluster)
                out.apply.append(v)
            elif status_of(v.cluster, v.endpoint) in FAILING:
                out.apply.append(v)  # already failing: a new reason, not a new failure
            else:
                candidates.setdefault(v.cluster, []).append(v)
        for cluster, failing in candidates.items():
            recent = self.recent.setdefault(cluster, {})
            for endpoint in [e for e, t in recent.items() if t < now - self.window]:
                del recent[endpoint]
            holding = cluster in self.held
            # The whole batch is one round: if it crosses the share, all of its failures are held.
            recent.update((v.endpoint, now) for v in failing)
            if not holding and len(recent) >= self.min_failures and len(recent) > self.share * size_of(cluster):
                holding = True
                out.newly_held.append(cluster)
            for v in failing:
                if holding:
                    self.held.setdefault(cluster, {})[v.endpoint] = v
                    out.held.append(v)
                else:
                    out.apply.append(v)
        return out

    def accept(self, cluster: str) -> list[Verdict]:
        """The operator accepts the failures: the held verdicts, to apply now."""
        self.recent.pop(cluster, None)
        return list(self.held.pop(cluster, {}).values())

    def forget(self, clusters: set[str]) -> list[str]:
        """Drop clusters the topology no longer has; the held clusters dropped."""
        self.recent = {c: r for c, r in self.recent.items() if c in clusters}
        gone = [c for c in self.held if c not in clusters]
        for c in gone:
            del self.held[c]
        return gone
