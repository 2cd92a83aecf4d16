"""The mass-failure guard: a prober that loses its own network must not mark the world down.

When more than `share` of a cluster's endpoints (and at least `min_failures` of them) turn
failing within one `window` (about one check round), every failure of that window is held: the
endpoints keep (or, for those applied earlier in the window, get back) their previous verdict,
the cluster is reported as held, and an operator decides (accept applies the held verdicts; a
later passing verdict for an endpoint drops its held failure). Checks of one round arrive
spread over the check interval, so failures applied before the share was crossed are reverted
rather than left in place. Recoveries are never held.

Plain synchronous bookkeeping: `admit` splits a batch of verdicts into those to apply now and
those held; it never touches the health store.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from controlplane.health.quorum import FAILING
from controlplane.health.store import HealthStatus, Verdict


@dataclass(slots=True)
class Admitted:
    """The outcome of one batch: what to apply, and which clusters started holding."""

    apply: list[Verdict] = field(default_factory=list)
    held: list[Verdict] = field(default_factory=list)
    newly_held: list[str] = field(default_factory=list)  # clusters whose hold began in this batch
    released: list[str] = field(default_factory=list)  # clusters that hold nothing any more


class MassFailureGuard:
    """Per cluster: recent failures (endpoint -> when, the verdict before, the failing verdict)
    and held verdicts (endpoint -> failing verdict)."""

    def __init__(self, *, share: float = 0.5, window: float = 10.0, min_failures: int = 3) -> None:
        self.share = share
        self.window = window
        self.min_failures = min_failures
        self.recent: dict[str, dict[str, tuple[float, Verdict | None, Verdict]]] = {}
        self.held: dict[str, dict[str, Verdict]] = {}

    def admit(
        self,
        verdicts: Sequence[Verdict],
        *,
        status_of: Callable[[str, str], HealthStatus],
        verdict_of: Callable[[str, str], Verdict | None],
        size_of: Callable[[str], int],
        now: float,
    ) -> Admitted:
        """Split `verdicts` (one per endpoint) into those to apply and those to hold.

        `apply` may also carry earlier verdicts of endpoints whose failure this batch reverts.
        """
        out = Admitted()
        candidates: dict[str, list[Verdict]] = {}
        for v in verdicts:
            held = self.held.get(v.cluster)
            if v.status not in FAILING:
                self.recent.get(v.cluster, {}).pop(v.endpoint, None)
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
            for endpoint in [e for e, r in recent.items() if r[0] < now - self.window]:
                del recent[endpoint]
            holding = cluster in self.held
            for v in failing:
                recent[v.endpoint] = (now, verdict_of(v.cluster, v.endpoint), v)
            if not holding and len(recent) >= self.min_failures and len(recent) > self.share * size_of(cluster):
                holding = True
                out.newly_held.append(cluster)
                # Failures of this window applied by earlier batches: back to their verdict before.
                batch = {v.endpoint for v in failing}
                held = self.held.setdefault(cluster, {})
                for endpoint, (_, before, failed) in recent.items():
                    if endpoint not in batch and endpoint not in held:
                        held[endpoint] = failed
                        out.held.append(failed)
                        out.apply.append(before or _no_verdict(failed, now))
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


def _no_verdict(failed: Verdict, now: float) -> Verdict:
    """Where an endpoint had no verdict before its held failure: UNKNOWN again, as it was."""
    return Verdict(
        failed.cluster, failed.endpoint, HealthStatus.UNKNOWN, "failure held by the mass-failure guard", now, "guard"
    )
