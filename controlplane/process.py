"""Everything asynchronous of one control plane, in one place: ports, timers, the file watcher.

`Process` binds the gRPC server (ADS, the prober link, CSDS) and the admin API, starts the local
prober if one is attached, runs the fault timers (prober staleness, stuck streams) and the
topology file watcher, and stops all of it in reverse order. It sees the control plane through
`Served`: the admin API's view plus the services and checks it runs.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import tempfile
from collections.abc import Callable
from typing import Protocol

import grpc

from controlplane.admin.app import start_admin
from controlplane.admin.http import ControlPlaneView
from controlplane.errors import ConfigError
from controlplane.probers.accesslog import AccessLogService
from controlplane.snapshots.snapshot import Snapshot
from controlplane.topology.model import Topology
from controlplane.topology.parse import load_topology
from controlplane.topology.watch import watch_file
from controlplane.xds.csds import CsdsService
from controlplane.xds.limits import configure_ads, xds_limit_metrics
from controlplane.xds.server import SERVER_OPTIONS, AdsServer, create_server
from controlplane.xds.tls import bind_xds, grpc_server_options
from controlplane.xds.workers.pool import WorkerPool

log = logging.getLogger("healthplane")

SHUTDOWN_REASON = "the control plane is shutting down"
STREAM_CLOSE_TIMEOUT = 5.0  # seconds for the streams to end before grpc cancels what is left


class State(enum.Enum):
    UNOPENED = "unopened"
    RUNNING = "running"
    CLOSED = "closed"


class Served(ControlPlaneView, Protocol):
    """What the process serves and runs: the admin view, the gRPC services and the fault checks."""

    @property
    def ads(self) -> AdsServer: ...

    @property
    def csds(self) -> CsdsService: ...

    @property
    def access_log(self) -> AccessLogService: ...

    @property
    def workers(self) -> WorkerPool | None: ...

    def flush_verdicts(self) -> Snapshot | None: ...

    def check_probers(self, now: float | None = None) -> None: ...

    def close_stuck_streams(self, now: float | None = None) -> list[int]: ...

    def expire_passive(self, now: float | None = None) -> None: ...

    def reload(self, *, who: str = ..., loaded: Topology | ConfigError | None = None) -> Snapshot | None: ...

    def close(self) -> None: ...


class Process:
    """The running edge of one control plane (unopened, running, closed); `aclose` is safe twice."""

    def __init__(self, cp: Served) -> None:
        self.cp = cp
        self.state = State.UNOPENED
        self.xds_port = 0
        self.admin_port = 0
        self._grpc: grpc.aio.Server | None = None
        self._admin: object | None = None  # aiohttp AppRunner, typed loosely to keep aiohttp in admin/
        self._tasks: list[asyncio.Task[None]] = []
        self._services_dir: tempfile.TemporaryDirectory[str] | None = None

    async def start(self) -> None:
        """Bind the xDS and admin ports and start the local prober, the timers and the watcher."""
        if self.state is not State.UNOPENED:
            raise RuntimeError(f"control plane is {self.state.value}")
        cp = self.cp
        # The shared operator state first (issue 17): Envoys connect to the fleet's topology.
        await cp.store.start()
        try:
            await self._bind()
        except BaseException:
            await cp.store.aclose()
            raise

    async def _bind(self) -> None:
        cp = self.cp
        settings = cp.topology.controlplane
        sec = settings.security
        if cp.workers is not None:
            await self._start_workers(cp.workers)
        else:
            configure_ads(cp.ads, sec, cp.prober_link, cp.csds, cp.access_log)
            cp.metrics.add_state(lambda: xds_limit_metrics(cp.ads))
            handlers = (cp.ads.handler(), cp.prober_link.handler(), cp.csds.handler(), cp.access_log.handler())
            self._grpc = create_server(*handlers, options=grpc_server_options(SERVER_OPTIONS, sec))
            self.xds_port = bind_xds(self._grpc, _host(settings.xds.address), settings.xds.port, sec)
            if self.xds_port == 0:
                raise ConfigError(
                    f"cannot listen on {settings.xds.address}:{settings.xds.port}", path="controlplane.xds"
                )
            await self._grpc.start()
        try:
            self._admin, self.admin_port = await start_admin(cp, settings.admin.address, settings.admin.port)
        except ConfigError:  # the admin certificate
            await self._stop_serving()
            raise
        except OSError as exc:
            await self._stop_serving()
            raise ConfigError(
                f"cannot listen on {settings.admin.address}:{settings.admin.port}: {exc.strerror}",
                path="controlplane.admin",
            ) from exc
        if cp.local_prober is not None:
            await cp.local_prober.start()
        if cp.config_path is not None and settings.watch_interval > 0:
            self._tasks.append(
                asyncio.create_task(
                    watch_file(cp.config_path, settings.watch_interval, self._on_file_change), name="topology-watch"
                )
            )
        if settings.prober_staleness > 0:
            self._tasks.append(
                asyncio.create_task(_every(settings.prober_staleness, cp.check_probers), name="staleness")
            )
        if settings.stuck_stream_timeout > 0:
            self._tasks.append(
                asyncio.create_task(_every(settings.stuck_stream_timeout, cp.close_stuck_streams), name="stuck")
            )
        # Passive ejections end within 100 ms of their hold (issue 15).
        self._tasks.append(asyncio.create_task(_every(0.4, cp.expire_passive), name="passive-expiry"))
        self.state = State.RUNNING
        log.info(
            "xDS on %s:%d, admin on %s:%d, version %s",
            settings.xds.address,
            self.xds_port,
            settings.admin.address,
            self.admin_port,
            cp.snapshot.version,
        )

    async def _stop_serving(self) -> None:
        if self.cp.workers is not None:
            await self.cp.workers.aclose(SHUTDOWN_REASON)
        if self._grpc is not None:
            await self._grpc.stop(None)

    async def _start_workers(self, pool: WorkerPool) -> None:
        """The xDS port served by worker processes; the prober link, CSDS and access logs served here
        on a private Unix-domain socket, which the workers relay those calls to (workers/relay.py)."""
        cp = self.cp
        settings = cp.topology.controlplane
        # The per-peer limit of these services is applied in the workers, which see the peers.
        configure_ads(cp.ads, settings.security)
        cp.metrics.add_state(lambda: xds_limit_metrics(pool))
        cp.metrics.add_state(pool.metrics)
        self._services_dir = tempfile.TemporaryDirectory(prefix="healthplane-")
        path = os.path.join(self._services_dir.name, "services.sock")
        handlers = (cp.prober_link.handler(), cp.csds.handler(), cp.access_log.handler())
        self._grpc = create_server(*handlers)
        self._grpc.add_insecure_port(f"unix:{path}")
        await self._grpc.start()
        try:
            self.xds_port = await pool.start(_host(settings.xds.address), settings.xds.port, f"unix:{path}")
        except OSError as exc:
            await pool.aclose(SHUTDOWN_REASON)
            await self._grpc.stop(None)
            raise ConfigError(
                f"cannot listen on {settings.xds.address}:{settings.xds.port}: {exc}", path="controlplane.xds"
            ) from exc

    async def _on_file_change(self) -> None:
        path = self.cp.config_path
        if path is None:
            return
        # Read and validated on a thread: a big file takes a while, and the loop serves meanwhile.
        try:
            loaded: Topology | ConfigError = await asyncio.to_thread(load_topology, path)
        except ConfigError as exc:
            loaded = exc
        try:
            self.cp.reload(loaded=loaded)
        except ConfigError as exc:
            log.error("topology file rejected, still serving the last good one: %s", exc)

    async def aclose(self, grace: float | None = 0.5) -> None:
        """Stop serving; safe to call twice."""
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        cp = self.cp
        if cp.local_prober is not None:
            await cp.local_prober.aclose()
        await cp.store.aclose()
        cp.flush_verdicts()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._admin is not None:
            await self._admin.cleanup()  # type: ignore[attr-defined]
        if self._grpc is not None:
            # A deliberate end for every stream (UNAVAILABLE: Envoys and probers reconnect); left to
            # grpc's stop, each would be cancelled and logged as an error with two tracebacks.
            with cp.events.unlogged():
                streams = cp.ads.close_all(SHUTDOWN_REASON)
                links = cp.prober_link.close_all(SHUTDOWN_REASON)
                if streams or links:
                    await asyncio.wait([*streams, *links], timeout=STREAM_CLOSE_TIMEOUT)
                closed = len(streams)
                if cp.workers is not None:
                    closed += await cp.workers.aclose(SHUTDOWN_REASON, grace)
            await self._grpc.stop(grace)
            if self._services_dir is not None:
                self._services_dir.cleanup()
            log.info("shut down, streams closed: %d xDS, %d prober", closed, len(links))
        cp.close()

    async def serve_forever(self) -> None:
        if self._grpc is None:
            raise RuntimeError("start() first")
        await self._grpc.wait_for_termination()


async def _every(limit: float, check: Callable[[], object]) -> None:
    # A quarter of the limit (at most 1 s): an alarm or a close comes at most 25% late.
    period = min(1.0, limit / 4)
    while True:
        await asyncio.sleep(period)
        try:
            check()
        except Exception:
            log.exception("fault check %s failed", check)


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address else address
