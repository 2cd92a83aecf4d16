"""One xDS worker process: ADS streams (state of the world and delta) on the shared xDS port.

Started by the main process (`pool.py`) as `python -m controlplane.xds.workers.worker FD`, FD
being its end of a private socketpair. It receives its settings and the current snapshot, binds
the xDS port with SO_REUSEPORT (the kernel spreads new connections over every worker), serves
ADS from each snapshot it is handed (`wire.py`: the main process's bytes, framed, not
re-encoded), relays every other service of the port to the main process (`relay.py`), and sends
back its stream records in batches (`records.py`) with a heartbeat. It exits when the main
process closes the channel or dies (PR_SET_PDEATHSIG), and on a `stop` after closing its
streams with the given reason (UNAVAILABLE: Envoys reconnect at once, to the other workers).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import logging
import os
import signal
import socket
import sys
import time
from typing import Any

import grpc

from controlplane.events import JsonFormatter
from controlplane.snapshots.cache import SnapshotCache
from controlplane.topology.model import Topology
from controlplane.xds.delay import ModelledDelay
from controlplane.xds.limits import configure_ads
from controlplane.xds.server import SERVER_OPTIONS, AdsServer, create_server
from controlplane.xds.tls import bind_xds, grpc_server_options
from controlplane.xds.workers.channel import Channel
from controlplane.xds.workers.records import Record, Recorder
from controlplane.xds.workers.relay import Relay
from controlplane.xds.workers.wire import SnapshotDecoder

log = logging.getLogger("healthplane.xds.workers")

# Records wait at most this long (or for this many) before they go up in one message.
FLUSH_SECONDS = 0.002
FLUSH_RECORDS = 2_000
STREAM_CLOSE_TIMEOUT = 5.0
LOOP_ENV = "HEALTHPLANE_XDS_WORKER_LOOP"

# Every worker binds the port with SO_REUSEPORT: the kernel hands each new connection to one of them.
WORKER_SERVER_OPTIONS = [(k, v) for k, v in SERVER_OPTIONS if k != "grpc.so_reuseport"] + [("grpc.so_reuseport", 1)]


class Worker:
    """The running worker: its snapshot cache, ADS server, relay and channel to the main process."""

    def __init__(self, channel: Channel, settings: dict[str, Any], first: Any) -> None:
        self.channel = channel
        self.settings = settings
        self.slot: int = settings["slot"]
        self.cache = SnapshotCache(history_limit=4)
        self.decoder = SnapshotDecoder()
        self.topology: Topology = self.decoder.decode(first).topology
        self._batch: list[Record] = []
        self._flush: asyncio.TimerHandle | None = None
        self.recorder = Recorder(self._emit)
        self.ads = AdsServer(
            self.cache,
            self.recorder,
            delay=ModelledDelay(self._propagation),
            first_stream_id=settings["first_stream_id"],
        )
        self.relay = Relay(settings["services"])
        self.server: Any = None
        self._configure()
        self.cache.publish(self.decoder.last)  # type: ignore[arg-type]

    def _propagation(self) -> Any:
        return self.topology.controlplane.propagation

    def _configure(self) -> None:
        security = self.topology.controlplane.security
        configure_ads(self.ads, security)
        self.relay.max_streams_per_peer = security.xds_max_streams_per_peer

    def _emit(self, record: Record) -> None:
        self._batch.append(record)
        if len(self._batch) >= FLUSH_RECORDS:
            self.flush()
        elif self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(FLUSH_SECONDS, self.flush)

    def flush(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        if self._batch:
            batch, self._batch = self._batch, []
            self.channel.send(("records", batch))

    def on_snapshot(self, frame: Any) -> None:
        snapshot = self.decoder.decode(frame)
        if snapshot.topology is not self.topology:
            self.topology = snapshot.topology
            self._configure()
        self.cache.publish(snapshot)

    async def start(self) -> int:
        security = self.topology.controlplane.security
        self.server = create_server(
            self.ads.handler(), self.relay, options=grpc_server_options(WORKER_SERVER_OPTIONS, security)
        )
        port = bind_xds(self.server, self.settings["host"], self.settings["port"], security)
        if port == 0:
            raise OSError(f"cannot listen on {self.settings['host']}:{self.settings['port']}")
        await self.server.start()
        return int(port)

    def stats(self) -> dict[str, Any]:
        return {
            "streams": len(self.ads.streams),
            "ended_with": dict(self.ads.ended_with),
            "refused": self.ads.peers.refused + sum(p.refused for p in self.relay.peers.values()),
            "relayed": self.relay.calls,
            "pid": os.getpid(),
        }

    async def heartbeat(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)
            self.flush()
            self.channel.send(("heartbeat", time.time(), self.stats()))

    async def stop(self, reason: str, grace: float) -> int:
        tasks = self.ads.close_all(reason)
        if tasks:
            await asyncio.wait(tasks, timeout=STREAM_CLOSE_TIMEOUT)
        if self.server is not None:
            await self.server.stop(grace)
        await self.relay.aclose()
        return len(tasks)


async def serve(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_connection(sock=sock)
    channel = Channel(reader, writer)
    kind, settings = await channel.receive()
    if kind != "init":
        raise RuntimeError(f"expected init, got {kind}")
    _configure_logging(settings)
    kind, frame = await channel.receive()
    worker = Worker(channel, settings, frame)
    # As the main process does (controlplane.app.tune_gc_for_streams): keep full collections off the push path.
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 1_000)
    try:
        port = await worker.start()
    except Exception as exc:
        channel.send(("failed", f"{type(exc).__name__}: {exc}"))
        await channel.drain()
        raise
    channel.send(("ready", port, os.getpid()))
    beat = asyncio.create_task(worker.heartbeat(settings.get("heartbeat", 0.5)))
    try:
        while True:
            try:
                message = await channel.receive()
            except EOFError:
                log.info("the main process closed the channel: exiting")
                await worker.stop("the control plane is shutting down", 0)
                return
            kind = message[0]
            if kind == "snapshot":
                worker.on_snapshot(message[1])
            elif kind == "close":
                _, stream_id, reason, code = message
                worker.ads.close_stream(stream_id, reason, grpc.StatusCode[code])
            elif kind == "stop":
                _, reason, grace = message
                closed = await worker.stop(reason, grace)
                worker.flush()
                channel.send(("stopped", closed))
                await channel.drain()
                return
    finally:
        beat.cancel()
        channel.close()


class _WorkerJson(JsonFormatter):
    def __init__(self, slot: int) -> None:
        super().__init__()
        self.slot = slot

    def format(self, record: logging.LogRecord) -> str:
        line = json.loads(super().format(record))
        line["xds_worker"] = self.slot  # which worker (a log line is rare: parsed again, no matter)
        return json.dumps(line, default=str)


def _configure_logging(settings: dict[str, Any]) -> None:
    """Log as the main process does (level, text or JSON lines on stderr), naming this worker."""
    slot = settings["slot"]
    handler = logging.StreamHandler()
    if settings.get("log_format") == "json":
        handler.setFormatter(_WorkerJson(slot))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s %(name)s [xds worker {slot}]: %(message)s"))
    logging.basicConfig(level=settings.get("log_level", "INFO"), handlers=[handler])


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: the main process gone, this one goes too
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the main process, which stops the workers
    if os.environ.get(LOOP_ENV) == "uvloop":  # an experiment (bench/fanout.py --xds-worker-loop), not a dependency
        import uvloop  # type: ignore[import-not-found, unused-ignore]

        uvloop.install()
    asyncio.run(serve(int(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
