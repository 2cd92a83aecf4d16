"""Which verdicts are applied, and when: the prober quorum, the mass-failure guard, persistence.

`Admission` sits between the health inputs (probers, overrides) and the health store:

- verdicts pass the prober quorum (health/quorum.py) and the mass-failure guard (health/guard.py)
  before they are applied, and every batch is saved to SQLite (health/persist.py) when
  `controlplane.data_dir` is set; `restore` reloads it at start, before the first snapshot, so a
  restart serves what was served before. Saving never fails a change: the writes happen on a
  thread, and while they fail the rows wait in memory (alarm `persistence`, a metric, `/readyz`
  degraded) and are written when the disk lets them;
- an operator accepting a mass-failure alarm, or forgetting a prober, gets back the verdicts to
  apply now: Admission never publishes anything itself (the control plane applies them).

It sees the topology and the health store through narrow callables, and records to an event sink.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from controlplane.errors import ConfigError
from controlplane.events import EventSink
from controlplane.health.alarms import Alarm, Alarms
from controlplane.health.guard import MassFailureGuard
from controlplane.health.persist import BackgroundStore, VerdictStore
from controlplane.health.quorum import Quorum
from controlplane.health.store import EndpointHealth, HealthStatus, Verdict
from controlplane.topology.model import Topology

log = logging.getLogger("healthplane.admission")

MASS_FAILURE = "mass_failure"
PROBER_STALE = "prober_stale"
PERSISTENCE = "persistence"


class HealthView(Protocol):
    """The applied health the guard compares against, and where restored verdicts go."""

    def status(self, cluster: str, endpoint: str) -> HealthStatus: ...

    def effective(self, cluster: str, endpoint: str) -> EndpointHealth: ...

    def apply(self, verdict: Verdict) -> bool: ...

    def set_override(self, override: Verdict | None, *, cluster: str, endpoint: str) -> bool: ...


class Admission:
    """The admission of verdicts for one control plane: quorum, guard, alarms and the verdict store."""

    def __init__(self, topology: Callable[[], Topology], health: HealthView, events: EventSink) -> None:
        cfg = topology().controlplane
        self._topology = topology
        self.health = health
        self.events = events
        self.alarms = Alarms(events)
        self.quorum = Quorum()
        self.guard = MassFailureGuard(
            share=cfg.mass_failure_share, window=cfg.mass_failure_window, min_failures=cfg.mass_failure_min
        )
        self.store = (
            BackgroundStore(VerdictStore(cfg.data_dir), on_failure=self._persist_failed, on_recovery=self._persisted)
            if cfg.data_dir
            else None
        )
        self._live: tuple[Topology | None, set[tuple[str, str]]] = (None, set())
        self._saved_held: dict[str, dict[str, Verdict]] = {}  # what the store has of guard.held

    def _persist_failed(self, error: str) -> None:
        assert self.store is not None
        self.alarms.raise_(
            PERSISTENCE,
            str(self.store.path),
            f"{error}: {self.store.backlog} changes applied and served but not saved yet (retried until saved)",
        )

    def _persisted(self) -> None:
        assert self.store is not None
        self.alarms.resolve(PERSISTENCE, str(self.store.path), "cleared: every change is saved again")

    # ------------------------------------------------------------------ start-up

    def restore(self, epoch: int) -> int:
        """Reload the last verdicts, votes and overrides; the version epoch to use (above the last run's)."""
        if self.store is None:
            return epoch
        saved = self.store.load()
        live = _endpoint_ids(self._topology())
        forgotten = self.store.forget(live)
        verdicts = [v for v in saved.verdicts if v.id in live]
        for v in verdicts:
            self.health.apply(v)
        overrides = [o for o in saved.overrides if o.id in live]
        for o in overrides:
            self.health.set_override(o, cluster=o.cluster, endpoint=o.endpoint)
        self.quorum.load(v for v in saved.votes if v.id in live)
        for v in saved.held:
            if v.id in live:
                self.guard.held.setdefault(v.cluster, {})[v.endpoint] = v
        for cluster in sorted(self.guard.held):
            self._raise_mass_failure(cluster)  # the hold outlived the restart, and so does its alarm
        self._saved_held = {c: dict(h) for c, h in self.guard.held.items()}
        if saved.epoch is not None and epoch <= saved.epoch:
            # The wall clock stepped back (or two starts in one millisecond): still sort later.
            epoch = saved.epoch + 1
        self.store.save_epoch(epoch)
        self.events.record(
            "restore",
            f"restored {len(verdicts)} verdicts and {len(overrides)} overrides from {self.store.path}"
            + (f" ({forgotten} endpoints no longer in the topology dropped)" if forgotten else ""),
            verdicts=len(verdicts),
            overrides=len(overrides),
            path=str(self.store.path),
        )
        return epoch

    # ------------------------------------------------------------------ verdicts

    def admit(self, verdicts: Sequence[Verdict]) -> list[Verdict]:
        """Votes in, the verdicts to apply now out (quorum, then the guard); the batch is saved."""
        live = self.live_endpoints()
        cfg, g = self._topology().controlplane, self.guard  # an edited topology's settings apply at once
        g.share, g.window, g.min_failures = cfg.mass_failure_share, cfg.mass_failure_window, cfg.mass_failure_min
        votes: list[Verdict] = []
        combined: list[Verdict] = []
        for v in verdicts:
            if (v.cluster, v.endpoint) not in live:
                continue
            c = self.quorum.vote(v)
            if c is not None:
                votes.append(v)
                combined.append(c)
        # One verdict per endpoint, its last: verdicts queued together may name an endpoint more
        # than once (several probers' votes, or one prober's consecutive batches), and the guard
        # applies passing verdicts before failing ones, which would let an older one win.
        apply = self._guarded(list({c.id: c for c in combined}.values()))
        if self.store is not None and (votes or apply):
            self.store.save_batch(verdicts=apply, votes=votes)
        return apply

    def _guarded(self, combined: list[Verdict]) -> list[Verdict]:
        """The mass-failure guard over combined verdicts: those to apply now; alarms raised or cleared."""
        out = self.guard.admit(
            combined,
            status_of=self.health.status,
            verdict_of=lambda c, e: self.health.effective(c, e).verdict,
            size_of=self._cluster_size,
            now=time.time(),
        )
        for name in out.newly_held:
            self._raise_mass_failure(name)
        for name in {v.cluster for v in out.held} - set(out.newly_held):
            self._raise_mass_failure(name)  # updates the count in the message
        for name in out.released:
            self.alarms.resolve(MASS_FAILURE, name, "cleared: the held endpoints passed their checks again")
        self._save_held()
        return out.apply

    def _save_held(self) -> None:
        """Save the clusters whose held failures changed since the last save."""
        if self.store is None:
            return
        held = self.guard.held
        for cluster in set(held) | set(self._saved_held):
            now = held.get(cluster, {})
            if now != self._saved_held.get(cluster, {}):
                self.store.save_held(cluster, now.values())
        self._saved_held = {c: dict(h) for c, h in held.items()}

    def live_endpoints(self) -> set[tuple[str, str]]:
        """The (cluster, endpoint) pairs of the current topology."""
        # Cached per topology object: a scan of the cluster's endpoints per verdict cost more
        # than the quorum and the guard together at 10,000 endpoints (bench/verdicts.py).
        topology = self._topology()
        if self._live[0] is not topology:
            self._live = (topology, _endpoint_ids(topology))
        return self._live[1]

    def _cluster_size(self, name: str) -> int:
        cluster = self._topology().cluster(name)
        return len(cluster.endpoints) if cluster is not None else 0

    def _raise_mass_failure(self, cluster: str) -> Alarm:
        held = self.guard.held.get(cluster, {})
        size = self._cluster_size(cluster)
        g = self.guard
        return self.alarms.raise_(
            MASS_FAILURE,
            cluster,
            f"cluster {cluster}: more than {g.share:.0%} of {size} endpoints failed within {g.window:g}s; "
            f"{len(held)} failures held (previous status kept) until an operator accepts or they pass again",
            cluster=cluster,
            held=sorted(held),
        )

    def accept(self, alarm_id: int, *, who: str) -> tuple[Alarm, list[Verdict]]:
        """The failures a mass-failure alarm held, released to be applied; ConfigError if there is no such alarm."""
        alarm = self.acceptable(alarm_id)
        held = self.guard.accept(alarm.subject)
        self.alarms.resolve(MASS_FAILURE, alarm.subject, f"accepted by {who}")
        self._save_held()
        if self.store is not None and held:
            self.store.save_batch(verdicts=held)
        return alarm, held

    def acceptable(self, alarm_id: int) -> Alarm:
        """The active mass-failure alarm `alarm_id`; ConfigError (path `id`) if it is not one."""
        alarm = self.alarms.get(alarm_id)
        if alarm is None:
            raise ConfigError(f"no alarm {alarm_id}", path="id")
        if alarm.kind != MASS_FAILURE or not alarm.active:
            raise ConfigError(
                f"alarm {alarm_id} is {'an active' if alarm.active else 'a resolved'} {alarm.kind} alarm: "
                "only an active mass_failure alarm can be accepted",
                path="id",
            )
        return alarm

    def forget_prober(self, prober_id: str, *, who: str) -> list[Verdict]:
        """Drop a prober's votes and staleness alarm; the verdicts the remaining probers decide instead."""
        source = f"prober:{prober_id}"
        self.alarms.resolve(PROBER_STALE, prober_id, f"cleared: the prober was forgotten by {who}")
        apply = self._guarded(self.quorum.drop_source(source))
        if self.store is not None:
            self.store.forget_source(source)
            if apply:
                self.store.save_batch(verdicts=apply)
        return apply

    def on_ownership(self, eligible: Callable[[Verdict], bool] | None) -> None:
        """Probers share the endpoints (issue 17): count only the votes `eligible` keeps (None: all)."""
        self.quorum.eligible = eligible
        if eligible is not None:
            self.quorum.prune(eligible)

    def on_override(self, cluster: str, endpoint: str, override: Verdict | None) -> None:
        if self.store is not None:
            self.store.save_override(cluster, endpoint, override)

    def on_topology(self, topology: Topology) -> None:
        self.quorum.forget(_endpoint_ids(topology))
        for cluster in self.guard.forget({c.name for c in topology.clusters}):
            self.alarms.resolve(MASS_FAILURE, cluster, "cleared: the cluster left the topology")
        self._save_held()

    # ------------------------------------------------------------------ views

    def metrics(self) -> Iterator[Metric]:
        """Active alarms by kind and the failures held by cluster, for /metrics."""
        alarms = GaugeMetricFamily("healthplane_alarms_active", "Active alarms, by kind.", labels=["kind"])
        for kind in (MASS_FAILURE, PROBER_STALE, PERSISTENCE):
            alarms.add_metric([kind], len(self.alarms.active(kind)))
        yield alarms
        if self.store is not None:
            failures = CounterMetricFamily(
                "healthplane_persist_failures", "Writes to the SQLite verdict store that failed (retried)."
            )
            failures.add_metric([], self.store.failures)
            yield failures
            backlog = GaugeMetricFamily(
                "healthplane_persist_backlog", "Changes applied and served but not saved to SQLite yet."
            )
            backlog.add_metric([], self.store.backlog)
            yield backlog
        held = GaugeMetricFamily(
            "healthplane_verdicts_held",
            "Failing verdicts held by the mass-failure guard, by cluster.",
            labels=["cluster"],
        )
        for cluster, verdicts in sorted(self.guard.held.items()):
            held.add_metric([cluster], len(verdicts))
        yield held

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def _endpoint_ids(topology: Topology) -> set[tuple[str, str]]:
    return {(c.name, e.key) for c in topology.clusters for e in c.endpoints}
