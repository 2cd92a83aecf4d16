"""Keep serving the last good truth through faults (issue 7, part A), wired into one control plane.

`Faults` sits between the health inputs and the health store, and beside the ADS server:

- verdicts pass the prober quorum (controlplane/quorum.py) and the mass-failure guard
  (controlplane/guard.py) before they are applied, and every batch is saved to SQLite
  (controlplane/persist.py) when `controlplane.data_dir` is set; `restore` reloads it at start,
  before the first snapshot, so a restart serves what was served before;
- a timer raises an alarm for a remote prober silent longer than `controlplane.prober_staleness`
  (its verdicts stay as they were: nothing is guessed);
- a watchdog closes ADS streams whose node has left a response unanswered for longer than
  `controlplane.stuck_stream_timeout`, and counts them;
- NACKs are grouped by rejected version with the change behind it (controlplane/nacks.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily, Metric

from controlplane.errors import ConfigError
from controlplane.health.alarms import Alarm, Alarms
from controlplane.health.guard import MassFailureGuard
from controlplane.health.persist import VerdictStore
from controlplane.health.quorum import Quorum
from controlplane.health.store import Verdict
from controlplane.observe.nacks import NackGroups
from controlplane.snapshots import resources as rs
from controlplane.snapshots.snapshot import Cause, Snapshot, find_snapshot
from controlplane.topology.model import Topology

if TYPE_CHECKING:
    from controlplane.app import ControlPlane

log = logging.getLogger("healthplane.faults")

MASS_FAILURE = "mass_failure"
PROBER_STALE = "prober_stale"


class Faults:
    """The fault handling of one `ControlPlane`; created in its constructor."""

    def __init__(self, cp: ControlPlane) -> None:
        cfg = cp.topology.controlplane
        self.cp = cp
        self.alarms = Alarms(cp.events)
        self.quorum = Quorum()
        self.guard = MassFailureGuard(
            share=cfg.mass_failure_share, window=cfg.mass_failure_window, min_failures=cfg.mass_failure_min
        )
        self.store = VerdictStore(cfg.data_dir) if cfg.data_dir else None
        self.nacks = NackGroups(cp.events, self.cause_of)
        cp.stream_callbacks.add(self.nacks)
        self.stuck_closed = Counter(
            "healthplane_xds_stuck_streams_closed",
            "ADS streams closed because a response stayed unanswered past stuck_stream_timeout.",
            registry=cp.metrics.registry,
        )
        cp.metrics.add_state(self._metrics)
        self._live: tuple[Topology | None, set[tuple[str, str]]] = (None, set())

    # ------------------------------------------------------------------ start-up

    def restore(self) -> None:
        """Reload the last verdicts, votes and overrides; keep versions above the last run's."""
        if self.store is None:
            return
        saved = self.store.load()
        topology = self.cp.topology
        live = _endpoint_ids(topology)
        forgotten = self.store.forget(live)
        health = self.cp.health
        verdicts = [v for v in saved.verdicts if v.id in live]
        for v in verdicts:
            health.apply(v)
        overrides = [o for o in saved.overrides if o.id in live]
        for o in overrides:
            health.set_override(o, cluster=o.cluster, endpoint=o.endpoint)
        self.quorum.load(v for v in saved.votes if v.id in live)
        clock = self.cp.clock
        if saved.epoch is not None and clock.epoch <= saved.epoch:
            # The wall clock stepped back (or two starts in one millisecond): still sort later.
            clock.epoch = saved.epoch + 1
        self.store.save_epoch(clock.epoch)
        self.cp.events.record(
            "restore",
            f"restored {len(verdicts)} verdicts and {len(overrides)} overrides from {self.store.path}"
            + (f" ({forgotten} endpoints no longer in the topology dropped)" if forgotten else ""),
            verdicts=len(verdicts),
            overrides=len(overrides),
            path=str(self.store.path),
        )

    def start(self) -> list[asyncio.Task[None]]:
        """The timers (prober staleness, stuck streams) as tasks for the control plane to own."""
        cfg = self.cp.topology.controlplane
        tasks = []
        if cfg.prober_staleness > 0:
            tasks.append(asyncio.create_task(self._every(cfg.prober_staleness, self.check_probers), name="staleness"))
        if cfg.stuck_stream_timeout > 0:
            tasks.append(
                asyncio.create_task(self._every(cfg.stuck_stream_timeout, self.close_stuck_streams), name="stuck")
            )
        return tasks

    @staticmethod
    async def _every(limit: float, check: Callable[[], object]) -> None:
        # A quarter of the limit (at most 1 s): an alarm or a close comes at most 25% late.
        period = min(1.0, limit / 4)
        while True:
            await asyncio.sleep(period)
            try:
                check()
            except Exception:
                log.exception("fault check %s failed", check)

    # ------------------------------------------------------------------ verdicts

    def admit(self, verdicts: Sequence[Verdict]) -> list[Verdict]:
        """Votes in, the verdicts to apply now out (quorum, then the guard); the batch is saved."""
        live = self.live_endpoints()
        cfg, g = self.cp.topology.controlplane, self.guard  # an edited topology's settings apply at once
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
            status_of=self.cp.health.status,
            verdict_of=lambda c, e: self.cp.health.effective(c, e).verdict,
            size_of=self._cluster_size,
            now=time.time(),
        )
        for name in out.newly_held:
            self._raise_mass_failure(name)
        for name in {v.cluster for v in out.held} - set(out.newly_held):
            self._raise_mass_failure(name)  # updates the count in the message
        for name in out.released:
            self.alarms.resolve(MASS_FAILURE, name, "cleared: the held endpoints passed their checks again")
        return out.apply

    def live_endpoints(self) -> set[tuple[str, str]]:
        # Cached per topology object: a scan of the cluster's endpoints per verdict cost more
        # than the quorum and the guard together at 10,000 endpoints (bench/verdicts.py).
        topology = self.cp.topology
        if self._live[0] is not topology:
            self._live = (topology, _endpoint_ids(topology))
        return self._live[1]

    def _cluster_size(self, name: str) -> int:
        cluster = self.cp.topology.cluster(name)
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

    def accept(self, alarm_id: int, *, who: str) -> tuple[Alarm, Snapshot | None]:
        """Apply the failures a mass-failure alarm held; ConfigError if there is no such alarm."""
        alarm = self.alarms.get(alarm_id)
        if alarm is None:
            raise ConfigError(f"no alarm {alarm_id}", path="id")
        if alarm.kind != MASS_FAILURE or not alarm.active:
            raise ConfigError(
                f"alarm {alarm_id} is {'an active' if alarm.active else 'a resolved'} {alarm.kind} alarm: "
                "only an active mass_failure alarm can be accepted",
                path="id",
            )
        held = self.guard.accept(alarm.subject)
        self.alarms.resolve(MASS_FAILURE, alarm.subject, f"accepted by {who}")
        if self.store is not None and held:
            self.store.save_batch(verdicts=held)

        def cause(moved: list[Verdict]) -> Cause:
            detail = f"alarm {alarm.id} accepted by {who}: {len(moved)} endpoints of {alarm.subject}"
            return Cause("accept", detail, time.time())

        return alarm, self.cp.apply_verdicts(held, cause)

    def forget_prober(self, prober_id: str, *, who: str) -> Snapshot | None:
        """Drop a disconnected remote prober for good: its record, votes and staleness alarm.

        The endpoints it voted on are decided again by the probers that remain (through the
        mass-failure guard, as any verdict). ConfigError (path `id`) if it is unknown or connected.
        """
        link = self.cp.prober_link
        record = None if link is None else link.probers.get(prober_id)
        if link is None or record is None:
            raise ConfigError(f"no remote prober {prober_id!r} (GET /probers lists them)", path="id")
        if record.connected:
            raise ConfigError(f"prober {prober_id!r} is connected: stop it before forgetting it", path="id")
        source = f"prober:{prober_id}"
        link.forget(prober_id)
        self.alarms.resolve(PROBER_STALE, prober_id, f"cleared: the prober was forgotten by {who}")
        apply = self._guarded(self.quorum.drop_source(source))
        if self.store is not None:
            self.store.forget_source(source)
            if apply:
                self.store.save_batch(verdicts=apply)
        moved: list[Verdict] = []

        def cause(changed: list[Verdict]) -> Cause:
            moved.extend(changed)
            return Cause("prober", f"prober {prober_id} forgotten by {who}: {len(changed)} endpoints", time.time())

        snapshot = self.cp.apply_verdicts(apply, cause)
        self.cp.events.record(
            "prober",
            f"prober {prober_id} forgotten by {who}: {len(moved)} endpoints decided again by the other probers",
            prober=prober_id,
            who=who,
        )
        return snapshot

    def on_override(self, cluster: str, endpoint: str, override: Verdict | None) -> None:
        if self.store is not None:
            self.store.save_override(cluster, endpoint, override)

    def on_topology(self, topology: Topology) -> None:
        self.quorum.forget(_endpoint_ids(topology))
        for cluster in self.guard.forget({c.name for c in topology.clusters}):
            self.alarms.resolve(MASS_FAILURE, cluster, "cleared: the cluster left the topology")

    # ------------------------------------------------------------------ timers

    def check_probers(self, now: float | None = None) -> None:
        """Raise or resolve the staleness alarm of each remote prober."""
        link = self.cp.prober_link
        if link is None:
            return
        now = time.time() if now is None else now
        limit = self.cp.topology.controlplane.prober_staleness
        for record in list(link.probers.values()):
            heard = max(record.last_message_at or 0.0, record.connected_at)
            age = now - heard
            if age > limit:
                state = "connected but silent" if record.connected else "disconnected"
                self.alarms.raise_(
                    PROBER_STALE,
                    record.prober_id,
                    f"prober {record.prober_id} {state}: nothing heard for {age:.0f}s (limit {limit:g}s); "
                    "its last verdicts are kept as they were",
                    prober=record.prober_id,
                )
            else:
                self.alarms.resolve(PROBER_STALE, record.prober_id, "cleared: the prober reports again")

    def close_stuck_streams(self, now: float | None = None) -> list[int]:
        """Close streams with a response unanswered past the timeout; their stream ids."""
        now = time.time() if now is None else now
        limit = self.cp.topology.controlplane.stuck_stream_timeout
        closed = []
        for stream in list(self.cp.ads.streams.values()):
            waiting = [ts for ts in stream.types.values() if ts.awaiting_ack and ts.sent_at is not None]
            if not waiting:
                continue
            oldest = min(waiting, key=lambda ts: ts.sent_at or now)
            age = now - (oldest.sent_at or now)
            why = (
                f"{rs.SHORT_NAMES.get(oldest.type_url, oldest.type_url)} version {oldest.sent_version} "
                f"unanswered for {age:.0f}s (stuck_stream_timeout {limit:g}s)"
            )
            if age <= limit or not self.cp.ads.close_stream(stream.stream_id, f"stream closed: {why}"):
                continue
            closed.append(stream.stream_id)
            self.stuck_closed.inc()
            self.cp.events.record(
                "stuck_stream",
                f"closed stream {stream.stream_id} of node {stream.node_id} ({stream.peer}): {why}",
                node=stream.node_id,
                stream=stream.stream_id,
                peer=stream.peer,
                type_url=oldest.type_url,
            )
        return closed

    # ------------------------------------------------------------------ views

    def cause_of(self, version: str) -> Cause | None:
        snapshot = find_snapshot(reversed(self.cp.history), version)
        return None if snapshot is None else snapshot.cause

    def _metrics(self) -> Iterator[Metric]:
        alarms = GaugeMetricFamily("healthplane_alarms_active", "Active alarms, by kind.", labels=["kind"])
        for kind in (MASS_FAILURE, PROBER_STALE):
            alarms.add_metric([kind], len(self.alarms.active(kind)))
        yield alarms
        held = GaugeMetricFamily(
            "healthplane_verdicts_held",
            "Failing verdicts held by the mass-failure guard, by cluster.",
            labels=["cluster"],
        )
        for cluster, verdicts in sorted(self.guard.held.items()):
            held.add_metric([cluster], len(verdicts))
        yield held
        link = self.cp.prober_link
        if link is not None:
            age = GaugeMetricFamily(
                "healthplane_prober_silence_seconds",
                "Seconds since each remote prober was last heard.",
                labels=["prober"],
            )
            now = time.time()
            for record in link.probers.values():
                age.add_metric([record.prober_id], now - max(record.last_message_at or 0.0, record.connected_at))
            yield age

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


def _endpoint_ids(topology: Topology) -> set[tuple[str, str]]:
    return {(c.name, e.key) for c in topology.clusters for e in c.endpoints}
