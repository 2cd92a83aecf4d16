"""The control plane process: topology and verdicts in, snapshots out, over ADS and the admin API.

`ControlPlane` wires the stages together (topology -> health -> snapshot -> ADS streams ->
node records) and owns their lifecycle. Its synchronous methods (`submit_verdicts`,
`set_override`, `update_topology`) are the health and topology inputs; each accepted change that
moves what Envoy should see publishes exactly one new snapshot.
"""

from __future__ import annotations

import asyncio
import enum
import gc
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import grpc

from controlplane.errors import ConfigError
from controlplane.events import EventLog
from controlplane.health.admission import Faults
from controlplane.health.store import HealthStatus, HealthStore, Verdict
from controlplane.observe.metrics import CallbackChain, Metrics, control_plane_state
from controlplane.observe.nodes import NodeRegistry
from controlplane.observe.propagation import PropagationTracker, track_propagation
from controlplane.snapshots.cache import SnapshotCache
from controlplane.snapshots.snapshot import Cause, Snapshot, VersionClock, build_snapshot, changed_resources
from controlplane.topology.model import Topology, keep_running_settings, restart_only_changes
from controlplane.topology.parse import load_topology
from controlplane.topology.propagation import PropagationConfig
from controlplane.xds.delay import ModelledDelay
from controlplane.xds.server import SERVER_OPTIONS, AdsServer, create_server

if TYPE_CHECKING:
    from controlplane.probers.link import ProberLinkService

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


class State(enum.Enum):
    UNOPENED = "unopened"
    RUNNING = "running"
    CLOSED = "closed"


class ControlPlane:
    """One control plane: snapshot building, the ADS server, the admin API and the file watcher."""

    def __init__(
        self,
        topology: Topology,
        *,
        config_path: str | Path | None = None,
        epoch: int | None = None,
        verdict_batch_window: float = 0.005,
        embedded_prober: bool = False,
    ) -> None:
        self.topology = topology
        self.config_path = Path(config_path) if config_path is not None else None
        self.events = EventLog()
        self.health = HealthStore()
        self.clock = VersionClock(epoch)
        self.cache = SnapshotCache()
        self.nodes = NodeRegistry(self.events)
        self.metrics = Metrics()
        self.metrics.add_state(lambda: control_plane_state(self))
        # Everything that watches the ADS streams; later stages (propagation) add themselves here.
        self.stream_callbacks = CallbackChain([self.nodes, self.metrics])
        # issue 5: propagation measured at every ACK, and the modelled delay per node.
        self.propagation: PropagationTracker | None = track_propagation(self)
        self.ads = AdsServer(self.cache, self.stream_callbacks, delay=ModelledDelay(self._propagation_config))
        self.history: list[Snapshot] = []
        self.history_limit = 100
        self.state = State.UNOPENED
        self.embedded_prober = embedded_prober
        self.xds_port = 0
        self.admin_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._admin: object | None = None  # aiohttp AppRunner, typed loosely to keep aiohttp at the edge
        self._tasks: list[asyncio.Task[None]] = []
        # Verdicts that arrive close together (a prober's first round, a flapping rack) become one
        # version instead of one each: they are applied together after this window.
        self.verdict_batch_window = verdict_batch_window
        self._pending_verdicts: list[Verdict] = []
        self._flush_handle: asyncio.TimerHandle | None = None
        self.prober: Any = None  # the embedded prober.scheduler.Prober, when one runs here
        # Probers run elsewhere (`serve --no-prober`): /readyz waits for one's full state.
        self.expect_remote_prober = False
        # Remote probers' link, served on the xDS port once started (None before).
        self.prober_link: ProberLinkService | None = None
        self.faults = Faults(self)
        self.faults.restore()
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
        return self.apply_verdicts(self.faults.admit(verdicts))

    def apply_verdicts(
        self, verdicts: Sequence[Verdict], cause: Callable[[list[Verdict]], Cause] | None = None
    ) -> Snapshot | None:
        """Apply verdicts already admitted, recording each move; publish one snapshot, its cause
        made from the verdicts that moved (default: a `verdict` cause listing them)."""
        live = self.faults.live_endpoints()
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
        c = self.topology.cluster(cluster)
        if c is None:
            raise ConfigError(f"no cluster named {cluster!r}", path="cluster")
        if c.endpoint(endpoint) is None:
            raise ConfigError(f"cluster {cluster!r} has no endpoint {endpoint}", path="endpoint")
        now = time.time()
        override = (
            None
            if status is None
            else Verdict(cluster, endpoint, status, reason=f"override by {who}", time=now, source=f"override:{who}")
        )
        before = self.health.status(cluster, endpoint)
        changed = self.health.set_override(override, cluster=cluster, endpoint=endpoint)
        self.faults.on_override(cluster, endpoint, override)
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

    def update_topology(
        self, topology: Topology, *, detail: str = "topology updated", who: str = "file watcher"
    ) -> Snapshot | None:
        """Serve a new (already validated) topology; None when it changes nothing Envoy sees."""
        self.topology = topology
        self.health.prune(topology)
        self.faults.on_topology(topology)
        if self.prober is not None:
            self.prober.update_topology(topology)
        before = self.snapshot
        snapshot = self._publish(Cause("topology", detail, time.time()), None)
        changed = changed_resources(before, snapshot)
        self.events.record(
            "topology",
            f"{detail}: version {snapshot.version}",
            changed={k.rsplit(".", 1)[-1]: v for k, v in changed.items()},
            who=who,
            what=detail,
        )
        return snapshot

    def reload(self, *, who: str = "file watcher") -> Snapshot | None:
        """Re-read the topology file; a bad file is reported and the last good topology kept."""
        if self.config_path is None:
            raise ConfigError("the control plane was not started from a file", path="config")
        try:
            topology = load_topology(self.config_path)
        except ConfigError as exc:
            self.events.record(
                "topology_rejected", f"kept the last good topology: {exc}", error=str(exc), who=who, what="reload"
            )
            raise
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
        self.history.append(snapshot)
        del self.history[: -self.history_limit]
        if self.propagation is not None:
            self.propagation.limit = self.topology.controlplane.propagation.history  # edits apply at once
            self.propagation.on_snapshot(snapshot, previous)
        self.metrics.on_snapshot(snapshot)
        self.cache.publish(snapshot)
        return snapshot

    def _propagation_config(self) -> PropagationConfig:
        return self.topology.controlplane.propagation

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Bind the xDS and admin ports and start watching the topology file."""
        if self.state is not State.UNOPENED:
            raise RuntimeError(f"control plane is {self.state.value}")
        from controlplane.admin.app import start_admin  # aiohttp stays at the edge

        cp = self.topology.controlplane
        from controlplane.probers.link import ProberLinkService  # generated code stays at the edge

        self.prober_link = ProberLinkService(self)
        from controlplane.xds.csds import CsdsService
        from controlplane.xds.limits import configure_ads, xds_limit_metrics
        from controlplane.xds.tls import bind_xds, grpc_server_options

        sec = cp.security
        configure_ads(self.ads, sec)
        self.metrics.add_state(lambda: xds_limit_metrics(self.ads))
        handlers = (self.ads.handler(), self.prober_link.handler(), CsdsService(self).handler())
        self._grpc = create_server(*handlers, options=grpc_server_options(SERVER_OPTIONS, sec))
        self.xds_port = bind_xds(self._grpc, _host(cp.xds.address), cp.xds.port, sec)
        if self.xds_port == 0:
            raise ConfigError(f"cannot listen on {cp.xds.address}:{cp.xds.port}", path="controlplane.xds")
        await self._grpc.start()
        try:
            self._admin, self.admin_port = await start_admin(self, cp.admin.address, cp.admin.port)
        except ConfigError:  # the admin certificate
            await self._grpc.stop(None)
            raise
        except OSError as exc:
            await self._grpc.stop(None)
            raise ConfigError(
                f"cannot listen on {cp.admin.address}:{cp.admin.port}: {exc.strerror}",
                path="controlplane.admin",
            ) from exc
        if self.embedded_prober:
            await self._start_prober()
        if self.config_path is not None and cp.watch_interval > 0:
            from controlplane.topology.watch import watch_file

            self._tasks.append(
                asyncio.create_task(
                    watch_file(self.config_path, cp.watch_interval, self._on_file_change),
                    name="topology-watch",
                )
            )
        self._tasks.extend(self.faults.start())
        self.state = State.RUNNING
        log.info(
            "xDS on %s:%d, admin on %s:%d, version %s",
            cp.xds.address,
            self.xds_port,
            cp.admin.address,
            self.admin_port,
            self.snapshot.version,
        )

    async def _start_prober(self) -> None:
        from prober.scheduler import Prober

        self.prober = Prober(self.topology, sink=_EmbeddedSink(self), source="prober:embedded")
        self.prober.check_listeners.append(self.metrics.on_check)
        await self.prober.start()

    def _on_file_change(self) -> None:
        try:
            self.reload()
        except ConfigError as exc:
            log.error("topology file rejected, still serving the last good one: %s", exc)

    async def aclose(self, grace: float | None = 0.5) -> None:
        """Stop serving; safe to call twice."""
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        if self.prober is not None:
            await self.prober.aclose()
        self.flush_verdicts()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._admin is not None:
            await self._admin.cleanup()  # type: ignore[attr-defined]
        if self._grpc is not None:
            await self._grpc.stop(grace)
        self.faults.close()

    async def __aenter__(self) -> ControlPlane:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def serve_forever(self) -> None:
        if self._grpc is None:
            raise RuntimeError("start() first")
        await self._grpc.wait_for_termination()


def _verdict_cause(moved: list[Verdict]) -> Cause:
    detail = ", ".join(f"{v.cluster} {v.endpoint} {v.status.name}" for v in moved[:5])
    if len(moved) > 5:
        detail += f" and {len(moved) - 5} more"
    return Cause("verdict", detail, min(v.time for v in moved))


class _EmbeddedSink:
    """The embedded prober's verdicts and events, straight into this process's control plane."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp

    async def on_verdict(self, verdict: Verdict) -> None:
        self.cp.submit_verdicts_soon([verdict])

    async def on_event(self, event: Any) -> None:
        self.cp.events.record(
            "probe",
            f"{event.cluster} {event.endpoint}: {event.old.name} -> {event.new.name} ({event.reason})",
            cluster=event.cluster,
            endpoint=event.endpoint,
            reason=event.reason,
            source=event.source,
            counters=event.counters.to_json(),
            latency=event.latency,
        )


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address
