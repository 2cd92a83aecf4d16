"""The composition root: one control plane's stages wired together, inputs in, one snapshot out.

    topology ─┐
    verdicts ─┼─> health (admission, store) ─> snapshots (build, cache) ─> xds (ADS, CSDS) ─> observe
    overrides ┘

`ControlPlane` is the only object that knows every stage; each stage sees its neighbours through
a narrow protocol (a snapshot source, a verdict sink, an event sink), and nothing imports this
module back. Its synchronous methods (`submit_verdicts`, `set_override`, `update_topology`) are the
health and topology inputs; each accepted change that moves what Envoy should see publishes
exactly one new snapshot. The sockets, timers and file watcher live in `controlplane.process`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from controlplane.errors import ConfigError
from controlplane.events import EventLog
from controlplane.health.admission import MASS_FAILURE, Admission
from controlplane.health.alarms import Alarm
from controlplane.health.passive import PassiveState
from controlplane.health.quorum import PASSIVE
from controlplane.health.store import HealthStatus, HealthStore, Verdict
from controlplane.observe.metrics import CallbackChain, Metrics, served_state
from controlplane.observe.nacks import NackGroups
from controlplane.observe.nodes import NodeRegistry
from controlplane.observe.propagation import PropagationTracker
from controlplane.probers.accesslog import AccessLogService
from controlplane.probers.link import ProberLinkService
from controlplane.probers.ownership import Members, Ownership, choose_members
from controlplane.probers.sources import LocalProber
from controlplane.probers.staleness import check_probers, silence_metrics
from controlplane.process import Process, State
from controlplane.snapshots.cache import SnapshotCache
from controlplane.snapshots.snapshot import Cause, Snapshot, VersionClock, build_snapshot, changed_resources
from controlplane.store.changes import (
    AcceptChange,
    Change,
    ForgetChange,
    LocalStore,
    OperatorStore,
    OverrideChange,
    TopologyChange,
)
from controlplane.store.etcd import EtcdStore
from controlplane.store.fleet import fleet_document, with_local_settings
from controlplane.store.replicas import ReplicaRecord
from controlplane.topology.model import Topology, keep_running_settings, restart_only_changes
from controlplane.topology.parse import load_topology
from controlplane.topology.propagation import PropagationConfig
from controlplane.xds.csds import CsdsService
from controlplane.xds.delay import ModelledDelay
from controlplane.xds.server import AdsServer
from controlplane.xds.watchdog import Watchdog
from controlplane.xds.workers.pool import WorkerPool

log = logging.getLogger("healthplane")


def tune_gc_for_streams() -> None:
    """Make garbage collection cheap for a process holding thousands of long-lived streams.

    Measured in bench/fanout.py at 5,000 streams: CPython's default thresholds ran a full
    collection in 2 of 3 pushes, 200-500 ms of CPU spent before the first byte was written.
    Freezing what exists at start-up and collecting the young generations less often keeps the
    collector off the push path; cycles left by closed streams are still collected, later.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 1_000)


class HealthInput(Protocol):
    """Where verdicts enter the control plane (the prober, overrides, tests)."""

    def submit_verdicts(self, verdicts: Sequence[Verdict]) -> Snapshot | None: ...


class ControlPlane:
    """One control plane: health admission, snapshot building, the ADS and CSDS services, node records."""

    def __init__(
        self,
        topology: Topology,
        *,
        config_path: str | Path | None = None,
        epoch: int | None = None,
        verdict_batch_window: float = 0.005,
        workers: int = 1,
    ) -> None:
        self.topology = topology
        self.config_path = Path(config_path) if config_path is not None else None
        self.events = EventLog()
        self.health = HealthStore()
        self.clock = VersionClock(epoch)
        self.cache = SnapshotCache()
        self.metrics = Metrics()
        self.metrics.add_state(lambda: served_state(lambda: len(self.nodes.streams()), self.cache))
        # What watches the ADS streams, in order: node records, counters, propagation (issue 5),
        # NACK groups with the change behind each rejected version (issue 7).
        self.nodes = NodeRegistry(self.events)
        self.propagation: PropagationTracker | None = PropagationTracker(
            streams=self.nodes,
            limit=topology.controlplane.propagation.history,
            observe_delay=self.metrics.propagation_delay.observe,
            observe_convergence=self.metrics.convergence.observe,
        )
        self.nacks = NackGroups(self.events, self.cache.cause_of)
        self.stream_callbacks = CallbackChain([self.nodes, self.metrics, self.propagation, self.nacks])
        self.ads = AdsServer(self.cache, self.stream_callbacks, delay=ModelledDelay(self._propagation_config))
        # `serve --workers N` (N > 1): N processes serve the ADS streams (controlplane.xds.workers); this
        # one keeps the rest and sees their streams through the same callbacks. 1: ADS is served here.
        self.workers: WorkerPool | None = None
        if workers > 1:
            self.workers = WorkerPool(workers, self.cache, self.stream_callbacks, self.events, lambda: self.topology)
            self.propagation.clock = self.workers.mirror.clock  # an ACK's time in its worker
        self.watchdog = Watchdog(self.workers or self.ads, self.events, self.metrics.registry)
        self.csds = CsdsService(self.nodes.streams, self.cache)
        self.admission = Admission(lambda: self.topology, self.health, self.events)
        self.metrics.add_state(self.admission.metrics)
        # Remote probers connect over the prober link, served on the xDS port.
        self.prober_link = ProberLinkService(
            self,
            self.cache,
            self.events,
            tls=lambda: self.topology.controlplane.security.xds_tls,
            served=self.health.status,
        )
        self.metrics.add_state(lambda: silence_metrics(self.prober_link.probers.values()))
        # issue 17: probers sharing the endpoints; the quorum counts only each endpoint's owners.
        self.prober_link.on_ownership = self._on_ownership
        # issue 15: passive checks from the Envoys' access logs, served on the xDS port too.
        self.access_log = AccessLogService(self, self.events, lambda: self.topology)
        self.metrics.add_state(self.access_log.metrics)
        # A prober in this process (`prober.embedded` attaches one; `serve` does unless --no-prober).
        self.local_prober: LocalProber | None = None
        # Probers run elsewhere (`serve --no-prober`): /readyz waits for one's full state.
        self.expect_remote_prober = False
        # Verdicts that arrive close together (a prober's first round, a flapping rack) become one
        # version instead of one each: they are applied together after this window.
        self.verdict_batch_window = verdict_batch_window
        self._pending_verdicts: list[Verdict] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        self._process: Process | None = None
        # Where operator changes go (issue 17): applied here at once, or through etcd to every replica.
        store = topology.controlplane.store
        self.store: OperatorStore = (
            LocalStore(self)
            if store is None
            else EtcdStore(store.etcd, self, self.events, describe=self.replica_record)
        )
        if isinstance(self.store, EtcdStore):
            self.metrics.add_state(self.store.metrics)
            self.store.on_probers = self._probers_changed
        # With a store, the probers sharing the endpoints are those registered in etcd (issue 17).
        self.prober_link.member_source = self._prober_members
        self.clock.epoch = self.admission.restore(self.clock.epoch)
        self.access_log.restore(self.admission.quorum.votes_from(PASSIVE))
        self._publish(Cause("start", f"control plane started (epoch {self.clock.epoch})", time.time()), None)

    # ------------------------------------------------------------------ inputs

    @property
    def snapshot(self) -> Snapshot:
        current = self.cache.current()
        assert current is not None
        return current

    def submit_verdicts(self, verdicts: Sequence[Verdict]) -> Snapshot | None:
        """Apply verdicts (through the quorum and the mass-failure guard); publish one snapshot if
        any endpoint's effective status moved."""
        return self.apply_verdicts(self.admission.admit(verdicts))

    def apply_verdicts(
        self, verdicts: Sequence[Verdict], cause: Callable[[list[Verdict]], Cause] | None = None
    ) -> Snapshot | None:
        """Apply verdicts already admitted, recording each move; publish one snapshot, its cause
        made from the verdicts that moved (default: a `verdict` cause listing them)."""
        live = self.admission.live_endpoints()
        dirty: set[str] = set()
        moved: list[Verdict] = []
        for verdict in verdicts:
            if verdict.id not in live:
                log.debug("verdict for unknown endpoint %s/%s ignored", verdict.cluster, verdict.endpoint)
                continue
            before = self.health.status(verdict.cluster, verdict.endpoint)
            if self.health.apply(verdict):
                dirty.add(verdict.cluster)
                moved.append(verdict)
                self.events.record(
                    "health",
                    f"{verdict.cluster} {verdict.endpoint}: {before.name} -> {verdict.status.name}"
                    + (f" ({verdict.reason})" if verdict.reason else ""),
                    cluster=verdict.cluster,
                    endpoint=verdict.endpoint,
                    old=before.name,
                    new=verdict.status.name,
                    reason=verdict.reason,
                    source=verdict.source,
                )
        if not dirty:
            return None
        return self._publish((cause or _verdict_cause)(moved), dirty)

    def submit_verdicts_soon(self, verdicts: Sequence[Verdict]) -> None:
        """Queue verdicts to be applied together with any others within `verdict_batch_window`."""
        self._pending_verdicts.extend(verdicts)
        if self._flush_handle is None:
            loop = asyncio.get_running_loop()
            self._flush_handle = loop.call_later(self.verdict_batch_window, self.flush_verdicts)

    def flush_verdicts(self) -> Snapshot | None:
        """Apply the queued verdicts now (one snapshot for all of them)."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        pending, self._pending_verdicts = self._pending_verdicts, []
        return self.submit_verdicts(pending) if pending else None

    def set_override(
        self, cluster: str, endpoint: str, status: HealthStatus | None, *, who: str = "operator"
    ) -> Snapshot | None:
        """Pin an endpoint's status (None clears the pin); ConfigError if the endpoint is unknown."""
        self._check_endpoint(cluster, endpoint)
        now = time.time()
        override = (
            None
            if status is None
            else Verdict(cluster, endpoint, status, reason=f"override by {who}", time=now, source=f"override:{who}")
        )
        before = self.health.status(cluster, endpoint)
        changed = self.health.set_override(override, cluster=cluster, endpoint=endpoint)
        self.admission.on_override(cluster, endpoint, override)
        after = self.health.status(cluster, endpoint)
        self.events.record(
            "override",
            f"{who} set {cluster} {endpoint} to {status.name if status else 'auto'} ({before.name} -> {after.name})",
            cluster=cluster,
            endpoint=endpoint,
            status=status.name if status else "auto",
            who=who,
            what=f"override {status.name if status else 'auto'}",
            old=before.name,
            new=after.name,
        )
        if not changed:
            return None
        return self._publish(Cause("override", f"{cluster} {endpoint} {after.name} by {who}", now), {cluster})

    def accept_alarm(self, alarm_id: int, *, who: str) -> tuple[Alarm, Snapshot | None]:
        """Apply the failures a mass-failure alarm held; ConfigError if there is no such alarm."""
        alarm, held = self.admission.accept(alarm_id, who=who)

        def cause(moved: list[Verdict]) -> Cause:
            detail = f"alarm {alarm.id} accepted by {who}: {len(moved)} endpoints of {alarm.subject}"
            return Cause("accept", detail, time.time())

        return alarm, self.apply_verdicts(held, cause)

    def forget_prober(self, prober_id: str, *, who: str) -> Snapshot | None:
        """Drop a disconnected remote prober for good: its record, votes and staleness alarm.

        The endpoints it voted on are decided again by the probers that remain (through the
        mass-failure guard, as any verdict). ConfigError (path `id`) if it is unknown or connected.
        """
        self._check_forget(prober_id)
        self.prober_link.forget(prober_id)
        apply = self.admission.forget_prober(prober_id, who=who)
        moved: list[Verdict] = []

        def cause(changed: list[Verdict]) -> Cause:
            moved.extend(changed)
            return Cause("prober", f"prober {prober_id} forgotten by {who}: {len(changed)} endpoints", time.time())

        snapshot = self.apply_verdicts(apply, cause)
        self.events.record(
            "prober",
            f"prober {prober_id} forgotten by {who}: {len(moved)} endpoints decided again by the other probers",
            prober=prober_id,
            who=who,
        )
        return snapshot

    def _probers_changed(self) -> None:
        self.prober_link.refresh_members()  # the registrations in etcd, or whether etcd is up, changed

    def _prober_members(self, local: Sequence[str]) -> Members:
        self.store.link_probers(local)  # registered in etcd on this replica's behalf
        registered = self.store.prober_members()
        return choose_members(
            local,
            store=self.store.shared,
            registered=registered,
            down=self.store.down_reason,
            replica=self.replica_id,
        )

    def _on_ownership(self, ownership: Ownership) -> None:
        self.admission.on_ownership(self._vote_counts if ownership.members else None)

    def _vote_counts(self, verdict: Verdict) -> bool:
        local = self.local_prober
        return (local is not None and verdict.source == local.source) or self.prober_link.counts(verdict)

    def _check_endpoint(self, cluster: str, endpoint: str) -> None:
        c = self.topology.cluster(cluster)
        if c is None:
            raise ConfigError(f"no cluster named {cluster!r}", path="cluster")
        if c.endpoint(endpoint) is None:
            raise ConfigError(f"cluster {cluster!r} has no endpoint {endpoint}", path="endpoint")

    def _check_forget(self, prober_id: str) -> None:
        record = self.prober_link.probers.get(prober_id)
        if record is None:
            raise ConfigError(f"no remote prober {prober_id!r} (GET /probers lists them)", path="id")
        if record.connected:
            raise ConfigError(f"prober {prober_id!r} is connected: stop it before forgetting it", path="id")

    # ------------------------------------------------------------------ operator changes (controlplane.store)

    def check_change(self, change: Change) -> None:
        """ConfigError if `change` cannot apply now (checked before it is written to a shared store)."""
        if isinstance(change, OverrideChange):
            self._check_endpoint(change.cluster, change.endpoint)
        elif isinstance(change, ForgetChange):
            self._check_forget(change.prober_id)
        elif isinstance(change, AcceptChange) and not any(
            a.subject == change.cluster for a in self.admission.alarms.active(MASS_FAILURE)
        ):
            raise ConfigError(f"no active mass_failure alarm for cluster {change.cluster!r}", path="id")

    def apply_change(self, change: Change) -> Snapshot | None:
        """Apply an operator change from the store (here at once, or from etcd's watch)."""
        if isinstance(change, OverrideChange):
            return self.set_override(change.cluster, change.endpoint, change.status, who=change.who)
        if isinstance(change, TopologyChange):
            return self.update_topology(change.topology, detail=change.detail, who=change.who)
        if isinstance(change, ForgetChange):
            return self.forget_prober(change.prober_id, who=change.who)
        alarm = next((a for a in self.admission.alarms.active(MASS_FAILURE) if a.subject == change.cluster), None)
        if alarm is None:
            raise ConfigError(f"no active mass_failure alarm for cluster {change.cluster!r}", path="id")
        return self.accept_alarm(alarm.id, who=change.who)[1]

    @property
    def replica_id(self) -> str:
        """This replica's name in the store: `controlplane.store.replica_id`, or HOSTNAME:XDS_PORT."""
        cfg = self.topology.controlplane
        xds_port = self.xds_port or cfg.xds.port
        return (cfg.store.replica_id if cfg.store is not None else None) or f"{socket.gethostname()}:{xds_port}"

    def replica_record(self) -> ReplicaRecord:
        """This replica as GET /replicas shows it: its id, where to reach it, what it serves now."""
        cfg = self.topology.controlplane
        host = socket.gethostname()
        xds_port, admin_port = self.xds_port or cfg.xds.port, self.admin_port or cfg.admin.port
        replica_id = self.replica_id
        scheme = "https" if cfg.security.admin_tls is not None else "http"
        snapshot = self.snapshot
        return ReplicaRecord(
            id=replica_id,
            admin_url=f"{scheme}://{_host_port(_reachable(cfg.admin.address, host), admin_port)}",
            xds_address=_host_port(_reachable(cfg.xds.address, host), xds_port),
            version=snapshot.version,
            eds_digest=snapshot.eds_digest(),
            updated=time.time(),
        )

    def overrides(self) -> dict[tuple[str, str], HealthStatus]:
        """The pins applied now, by (cluster, endpoint)."""
        return {o.id: o.status for o in self.health.overrides()}

    def update_topology(
        self, topology: Topology, *, detail: str = "topology updated", who: str = "file watcher"
    ) -> Snapshot | None:
        """Serve a new (already validated) topology; None when it changes nothing Envoy sees."""
        self.topology = topology
        self.health.prune(topology)
        self.admission.on_topology(topology)
        if self.local_prober is not None:
            self.local_prober.update_topology(topology)
        before = self.snapshot
        snapshot = self._publish(Cause("topology", detail, time.time()), None)
        self.prober_link.refresh_members()  # probers.replicas or the staleness bound may have changed
        changed = changed_resources(before, snapshot)
        self.events.record(
            "topology",
            f"{detail}: version {snapshot.version}",
            changed={k.rsplit(".", 1)[-1]: v for k, v in changed.items()},
            who=who,
            what=detail,
        )
        return snapshot

    def reload(self, *, who: str = "file watcher", loaded: Topology | ConfigError | None = None) -> Snapshot | None:
        """Re-read the topology file (or take what was `loaded` from it elsewhere, on a thread);
        a bad file is reported and the last good topology kept."""
        if self.config_path is None:
            raise ConfigError("the control plane was not started from a file", path="config")
        try:
            if isinstance(loaded, ConfigError):
                raise loaded
            topology = loaded if loaded is not None else load_topology(self.config_path)
        except ConfigError as exc:
            self.events.record(
                "topology_rejected", f"kept the last good topology: {exc}", error=str(exc), who=who, what="reload"
            )
            raise
        if self.store.shared:
            # The fleet's part comes from etcd (`healthplane topology push`): the file gives this
            # replica's own settings only.
            if fleet_document(topology.document) != fleet_document(self.topology.document):
                message = (
                    f"{self.config_path}: the fleet's part (clusters, listeners, grpc_services, health settings) "
                    "is served from etcd; only this replica's own settings were read from the file "
                    "(healthplane topology push FILE changes the fleet's part)"
                )
                log.warning("%s", message)
                self.events.record("topology_local_only", message, who=who, what="reload")
            topology = with_local_settings(self.topology, topology)
        changed = restart_only_changes(self.topology.controlplane, topology.controlplane)
        if changed:
            # The ports, data directory, TLS and limits are bound at start: serve the rest of the
            # edit now and keep running with these as they are, saying so.
            message = (
                f"{self.config_path}: {', '.join(changed)} changed; kept as running until the next restart, "
                "the rest of the edit is served"
            )
            log.warning("%s", message)
            self.events.record("topology_restart_only", message, fields=changed, who=who, what="reload")
            topology = replace(
                topology, controlplane=keep_running_settings(self.topology.controlplane, topology.controlplane)
            )
        return self.update_topology(topology, detail=f"reloaded {self.config_path}", who=who)

    def _publish(self, cause: Cause, dirty: set[str] | None) -> Snapshot:
        previous = self.cache.current()
        snapshot = build_snapshot(
            self.topology,
            self.health.status,
            version=self.clock.next(),
            cause=cause,
            previous=previous,
            dirty_clusters=dirty,
        )
        if self.propagation is not None:  # bench/propagation.py measures without it
            self.propagation.limit = self.topology.controlplane.propagation.history  # edits apply at once
            self.propagation.on_snapshot(snapshot, previous)
        self.metrics.on_snapshot(snapshot)
        self.cache.publish(snapshot)
        return snapshot

    def _propagation_config(self) -> PropagationConfig:
        return self.topology.controlplane.propagation

    # ------------------------------------------------------------------ fault checks (run by the process's timers)

    def check_probers(self, now: float | None = None) -> None:
        """Raise or resolve the staleness alarm of each remote prober."""
        limit = self.topology.controlplane.prober_staleness
        self.prober_link.refresh_members(now)  # a sharing prober silent past the limit gives its share up
        members = self.prober_link.ownership.members
        check_probers(self.prober_link.probers.values(), self.admission.alarms, limit, now, members=members)

    def passive_state(self, cluster: str, endpoint: str) -> PassiveState | None:
        """A copy of one endpoint's passive counters and ejection (for the admin API); None without `passive`."""
        return self.access_log.passive.state(cluster, endpoint)

    def expire_passive(self, now: float | None = None) -> None:
        """End the passive ejections whose hold is over (the probers, or HEALTHY, decide again)."""
        self.access_log.expire(now)

    def close_stuck_streams(self, now: float | None = None) -> list[int]:
        """Close streams with a response unanswered past `stuck_stream_timeout`; their stream ids."""
        return self.watchdog.close_stuck_streams(self.topology.controlplane.stuck_stream_timeout, now)

    # ------------------------------------------------------------------ lifecycle (controlplane.process)

    @property
    def state(self) -> State:
        return State.UNOPENED if self._process is None else self._process.state

    @property
    def xds_port(self) -> int:
        return 0 if self._process is None else self._process.xds_port

    @property
    def admin_port(self) -> int:
        return 0 if self._process is None else self._process.admin_port

    async def start(self) -> None:
        """Bind the xDS and admin ports, start the local prober, the timers and the file watcher."""
        if self._process is not None:
            raise RuntimeError(f"control plane is {self._process.state.value}")
        self._process = Process(self)
        await self._process.start()

    async def aclose(self, grace: float | None = 0.5) -> None:
        """Stop serving; safe to call twice."""
        if self._process is None:
            self._process = Process(self)
        await self._process.aclose(grace)

    def close(self) -> None:
        """Release what the stages hold outside the process (the verdict store)."""
        self.admission.close()

    async def __aenter__(self) -> ControlPlane:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def serve_forever(self) -> None:
        if self._process is None:
            raise RuntimeError("start() first")
        await self._process.serve_forever()


def _reachable(address: str, host: str) -> str:
    """A listening address as others reach it: a wildcard one by this host's name."""
    return host if address in ("0.0.0.0", "::", "") else address


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _verdict_cause(moved: list[Verdict]) -> Cause:
    detail = ", ".join(f"{v.cluster} {v.endpoint} {v.status.name}" for v in moved[:5])
    if len(moved) > 5:
        detail += f" and {len(moved) - 5} more"
    return Cause("verdict", detail, min(v.time for v in moved))
