"""Several probers checking the same endpoints: one verdict per endpoint by majority.

Each prober (a verdict's `source`) has one vote per endpoint: its latest verdict. An endpoint
is failing (UNHEALTHY or TIMEOUT) when a strict majority of the probers that see it say so; a
tie is not a majority, so one prober that lost its network cannot take an endpoint out while
another still reaches it. An UNKNOWN verdict is "no opinion yet": it is not a vote and does not
replace a source's earlier vote (a prober that restarts re-learns before it speaks).
A vote is held when its prober disconnects: the disconnect alone changes nothing.

With a single source, the combined verdict is that source's verdict unchanged.

With probers sharing the endpoints (issue 17), `eligible` says whose vote counts now (an
endpoint's owners, and sources that take no share): other votes are not recorded, `prune` drops
the votes of probers that no longer own an endpoint (a departed prober's old vote neither wins
nor blocks), and an UNKNOWN vote is never applied: an endpoint whose owners have not checked it
yet keeps its last verdict (no UNKNOWN, no flip) until they report.

Passive verdicts (source `passive`, health/passive.py) are not one prober's view but the count of
every Envoy's real requests, already combined fleet-wide: a failing passive vote wins over the
probers' votes while it holds (a backend can pass its health path and fail real requests), and a
passing passive verdict is not a vote but the end of the hold: the passive vote is dropped and
the probers' votes decide again (HEALTHY when no prober checks the endpoint).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from controlplane.health.store import EndpointId, HealthStatus, Verdict

FAILING = frozenset({HealthStatus.UNHEALTHY, HealthStatus.TIMEOUT})
PASSIVE = "passive"  # the source of verdicts from the Envoys' access logs


class Quorum:
    """Votes per endpoint and source; `vote` returns the endpoint's combined verdict."""

    def __init__(self) -> None:
        self._votes: dict[EndpointId, dict[str, Verdict]] = {}
        # Whose vote counts (probers sharing the endpoints); None: everyone's.
        self.eligible: Callable[[Verdict], bool] | None = None

    def vote(self, verdict: Verdict) -> Verdict | None:
        """Record one source's verdict; the combined verdict, or None if it recorded nothing."""
        if verdict.source == PASSIVE:
            return self._passive(verdict)
        if self.eligible is not None and (verdict.status is HealthStatus.UNKNOWN or not self.eligible(verdict)):
            return None
        votes = self._votes.get(verdict.id)
        if votes is None:  # the common case, one prober: its verdict is the verdict
            self._votes[verdict.id] = {verdict.source: verdict}
            return verdict
        if len(votes) == 1 and verdict.source in votes and verdict.status is not HealthStatus.UNKNOWN:
            votes[verdict.source] = verdict
            return verdict
        if verdict.status is HealthStatus.UNKNOWN and any(v.status is not HealthStatus.UNKNOWN for v in votes.values()):
            return None
        votes[verdict.source] = verdict
        return combine(votes.values())

    def _passive(self, verdict: Verdict) -> Verdict | None:
        votes = self._votes.setdefault(verdict.id, {})
        if verdict.status in FAILING:
            votes[PASSIVE] = verdict
            return verdict
        if verdict.status is HealthStatus.UNKNOWN:
            return None
        votes.pop(PASSIVE, None)
        if not votes:
            del self._votes[verdict.id]
            return verdict
        decided = combine(votes.values())
        reason = f"{verdict.reason}; {decided.reason}" if decided.reason else verdict.reason
        return Verdict(decided.cluster, decided.endpoint, decided.status, reason, verdict.time, decided.source)

    def votes_from(self, source: str) -> list[Verdict]:
        """Every current vote of one source (e.g. the passive holds to restore after a restart)."""
        return [v for votes in self._votes.values() if (v := votes.get(source)) is not None]

    def load(self, votes: Iterable[Verdict]) -> None:
        for v in votes:
            self._votes.setdefault(v.id, {})[v.source] = v

    def votes(self, cluster: str, endpoint: str) -> list[Verdict]:
        return list(self._votes.get((cluster, endpoint), {}).values())

    def drop_source(self, source: str) -> list[Verdict]:
        """Remove every vote of `source`; the combined verdicts of the endpoints others still vote on.

        An endpoint only `source` voted on keeps its current verdict: nobody else has a say.
        """
        out: list[Verdict] = []
        for key, votes in list(self._votes.items()):
            if votes.pop(source, None) is None:
                continue
            if votes:
                out.append(combine(votes.values()))
            else:
                del self._votes[key]
        return out

    def prune(self, eligible: Callable[[Verdict], bool]) -> int:
        """Drop the votes that do not count any more (their prober no longer owns the endpoint);
        nothing is recombined: each endpoint keeps its verdict until a vote that counts arrives."""
        dropped = 0
        for key, votes in list(self._votes.items()):
            for source, v in list(votes.items()):
                if source != PASSIVE and not eligible(v):
                    del votes[source]
                    dropped += 1
            if not votes:
                del self._votes[key]
        return dropped

    def forget(self, keep: set[EndpointId]) -> None:
        for key in [k for k in self._votes if k not in keep]:
            del self._votes[key]

    def to_json(self, cluster: str, endpoint: str) -> list[dict[str, Any]]:
        return [
            {"source": v.source, "status": v.status.name, "reason": v.reason, "time": v.time}
            for v in self.votes(cluster, endpoint)
        ]


def combine(votes: Iterable[Verdict]) -> Verdict:
    """The majority verdict of `votes` (at least one) for one endpoint."""
    all_votes = list(votes)
    for v in all_votes:
        if v.source == PASSIVE and v.status in FAILING:
            return v
    known = [v for v in all_votes if v.status is not HealthStatus.UNKNOWN]
    if len(known) <= 1:
        return known[0] if known else max(all_votes, key=lambda v: v.time)
    failing = [v for v in known if v.status in FAILING]
    if 2 * len(failing) > len(known):
        side = failing
    else:
        side = [v for v in known if v.status not in FAILING]
    newest = max(side, key=lambda v: v.time)
    return Verdict(
        newest.cluster,
        newest.endpoint,
        newest.status,
        f"{len(side)} of {len(known)} probers: {newest.reason}"
        if newest.reason
        else f"{len(side)} of {len(known)} probers",
        newest.time,
        "quorum",
    )
