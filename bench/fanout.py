"""ADS fan-out benchmark: how fast one health change reaches N ADS clients.

One control plane runs in its own process (`ControlPlane` on ephemeral ports, one cluster `web`
with three endpoints, one listener). W worker processes hold N simulated Envoys between them:
grpc.aio ADS streams (lab/adsclient.py), one TCP connection each by default, that subscribe to
EDS for `web` and ACK every response at once, as Envoy does (node on the first request only).
The parent then flips one endpoint's override UNHEALTHY/HEALTHY, one push at a time, and
measures per push:

- per client, the time from the verdict (taken in the server process right before
  `ControlPlane.set_override`) to its ACK: as the server processed it (`TypeState.acked_at`, the
  ground truth) and as the client wrote it;
- the server's CPU time (getrusage, all threads, from the verdict until the last ACK is
  processed and the loop is idle again), and the client processes' CPU time, since both share
  the same cores;
- the server's RSS before any client connected and after all N ACKed the first version.

    python bench/fanout.py --nodes 100 1000 5000 [--xds-workers 1 2 auto] [--pushes 10] [--workers 2]
        [--repeat 3] [--json out.json]

Every child process ignores SIGINT, dies with its parent (PR_SET_PDEATHSIG) and exits when its
command pipe closes; the parent stops them all on exit, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

# Runs from a checkout without `pip install -e .`: the project's packages (controlplane and the
# generated healthplane protos) sit next to bench/. Appended: PYTHONPATH and site-packages come first.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

from bench.procs import (  # noqa: E402
    Child,
    child_setup,
    dispatch,
    raise_fd_limit,
    rss_kb,
    serve_commands,
    start_py_spy,
    stop_py_spy,
)

EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
CLUSTER = "web"
ENDPOINTS = [("127.0.0.1", 18081 + i) for i in range(3)]
FLIPPED = f"{ENDPOINTS[0][0]}:{ENDPOINTS[0][1]}"

TOPOLOGY: dict[str, Any] = {
    "controlplane": {
        "xds": {"address": "127.0.0.1", "port": 0},
        "admin": {"address": "127.0.0.1", "port": 0},
        "watch_interval": 0,
    },
    "clusters": [{"name": CLUSTER, "endpoints": [{"address": a, "port": p} for a, p in ENDPOINTS]}],
    "listeners": [{"name": "ingress", "port": 10000, "routes": [{"cluster": CLUSTER}]}],
}

# --------------------------------------------------------------------------- process plumbing


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)  # every thread, gRPC core's included
    return ru.ru_utime + ru.ru_stime


def _proc_cpu_seconds(pid: int) -> tuple[float, float]:
    """(user + system, system) seconds of another process, from /proc (xDS worker processes)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    tick = os.sysconf("SC_CLK_TCK")
    utime, stime = int(fields[11]) / tick, int(fields[12]) / tick
    return utime + stime, stime


def _proc_rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _sys_seconds() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def _gc_collections() -> list[int]:
    return [g["collections"] for g in gc.get_stats()]


def _machine_busy_seconds() -> float:
    """CPU time every process on the machine has used since boot (from /proc/stat)."""
    with open("/proc/stat", encoding="ascii") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal, *_ = map(int, f.readline().split()[1:])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class LastAck:
    """When a push's last expected ACK is in: `arm` before the push, `ack` at each ACK processed."""

    def __init__(self, cpu: Callable[[], float] = _cpu_seconds) -> None:
        self.version: str | None = None
        self.remaining = 0
        self.done = asyncio.Event()
        self.cpu_at_done = 0.0
        self.cpu = cpu  # the server's CPU seconds, read when the last ACK is in

    def arm(self, version: str, expected: int) -> None:
        self.version, self.remaining = version, expected
        self.done.clear()

    def ack(self, version: str) -> None:
        if version == self.version:
            self.remaining -= 1
            if self.remaining == 0:
                self.cpu_at_done = self.cpu()
                self.done.set()


def server_main(conn: Connection, xds_workers: int = 1, worker_loop: str = "asyncio") -> None:
    child_setup()
    os.environ["HEALTHPLANE_XDS_WORKER_LOOP"] = worker_loop  # what the xDS workers run on (they inherit it)
    asyncio.run(_server(conn, xds_workers))


async def _server(conn: Connection, xds_workers: int = 1) -> None:
    from controlplane.app import ControlPlane, tune_gc_for_streams
    from controlplane.health.store import HealthStatus
    from controlplane.snapshots.snapshot import Snapshot
    from controlplane.topology.parse import parse_topology
    from controlplane.xds.server import StreamCallbacks
    from controlplane.xds.stream import PendingResponse, RequestKind, RequestOutcome, StreamState, TypeState

    class AckWatch(StreamCallbacks, LastAck):
        """Passes every callback on to the node registry; notes when a push's last ACK is processed."""

        def __init__(self, inner: StreamCallbacks) -> None:
            LastAck.__init__(self)
            self.inner = inner

        def on_stream_open(self, stream: StreamState) -> None:
            self.inner.on_stream_open(stream)

        def on_stream_closed(self, stream: StreamState) -> None:
            self.inner.on_stream_closed(stream)

        def on_response(self, stream: StreamState, response: PendingResponse, snapshot: Snapshot) -> None:
            self.inner.on_response(stream, response, snapshot)

        def on_request(self, stream: StreamState, outcome: RequestOutcome) -> None:
            self.inner.on_request(stream, outcome)
            if outcome.kind is RequestKind.ACK:
                self.ack(outcome.version)

    cp = ControlPlane(parse_topology(TOPOLOGY, source="bench"), workers=xds_workers)
    tune_gc_for_streams()  # as `healthplane serve` does
    if cp.workers is None:
        watch = AckWatch(cp.ads.callbacks)
        cp.ads.callbacks = watch
    else:  # the worker processes' streams, as their records reach this process
        watch = AckWatch(cp.workers.mirror.callbacks)
        cp.workers.mirror.callbacks = watch
    await cp.start()
    worker_pids = [] if cp.workers is None else sorted(cp.workers.pids().values())

    def cpu_all() -> float:
        """This process's CPU time and every xDS worker's."""
        return _cpu_seconds() + sum(_proc_cpu_seconds(pid)[0] for pid in worker_pids)

    def sys_all() -> float:
        return _sys_seconds() + sum(_proc_cpu_seconds(pid)[1] for pid in worker_pids)

    def rss_all() -> int:
        return rss_kb() + sum(_proc_rss_kb(pid) for pid in worker_pids)

    watch.cpu = cpu_all
    await asyncio.sleep(0.2 if worker_pids else 0)  # the workers' imports and first snapshot settle
    conn.send({"xds_port": cp.xds_port, "pid": os.getpid(), "worker_pids": worker_pids, "rss_kb": rss_all()})
    flips = 0

    def eds_states() -> list[TypeState]:
        return [ts for s in cp.nodes.streams() if (ts := s.types.get(EDS)) is not None]

    async def settle(expected: int, limit: float) -> dict[str, Any]:
        """Wait until `expected` streams ACKed the current EDS version; then read RSS."""
        deadline = time.monotonic() + limit
        while True:
            current = cp.snapshot.type_versions[EDS]
            acked = sum(1 for ts in eds_states() if ts.acked_version == current)
            if acked >= expected or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # the last streams' buffers and tasks settle
        return {"streams": len(cp.nodes.streams()), "acked": acked, "rss_kb": rss_all()}

    async def push(expected: int, limit: float) -> dict[str, Any]:
        """One verdict; returns when `expected` clients ACKed it (or `limit` passed)."""
        nonlocal flips
        status = HealthStatus.UNHEALTHY if flips % 2 == 0 else HealthStatus.HEALTHY
        flips += 1
        gc0, sys0, cpu0, main0 = _gc_collections(), sys_all(), cpu_all(), _cpu_seconds()
        verdict = time.time()  # the clock of StreamState.sent_at and acked_at
        snapshot = cp.set_override(CLUSTER, FLIPPED, status, who="bench")
        published = time.time()
        if snapshot is None:
            raise RuntimeError(f"setting {FLIPPED} {status.name} published nothing")
        version = snapshot.type_versions[EDS]
        watch.arm(version, expected)  # no await since set_override, so no ACK of it came yet
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watch.done.wait(), limit)
        complete = watch.done.is_set()
        await asyncio.sleep(0.05)  # the writers' wake-ups after the last ACKs
        cpu = cpu_all() - cpu0
        states = eds_states()
        return {
            "version": version,
            "status": status.name,
            "verdict": verdict,
            "publish_s": published - verdict,
            "acked_s": [
                ts.acked_at - verdict for ts in states if ts.acked_version == version and ts.acked_at is not None
            ],
            "sent_s": [ts.sent_at - verdict for ts in states if ts.sent_version == version and ts.sent_at is not None],
            "cpu_s": cpu,
            "main_cpu_s": _cpu_seconds() - main0,
            "cpu_to_last_ack_s": watch.cpu_at_done - cpu0 if complete else None,
            "sys_s": sys_all() - sys0,
            "gc_collections": [b - a for a, b in zip(gc0, _gc_collections(), strict=True)],
        }

    try:
        await serve_commands(conn, dispatch({"settle": settle, "push": push}))
    finally:
        await cp.aclose(grace=0)


# --------------------------------------------------------------------------- grpc.aio's floor


def floor_main(conn: Connection, tasks_per_stream: int, options: list[tuple[str, Any]]) -> None:
    child_setup()
    asyncio.run(_floor_server(conn, tasks_per_stream, options))


async def _floor_server(conn: Connection, tasks_per_stream: int, options: list[tuple[str, Any]]) -> None:
    """grpc.aio's own floor for this exchange, as a server to measure beside the control plane.

    The same server options, garbage-collector tuning and response bytes as the control plane's
    (its snapshots, built by a `ControlPlane` that is never started, each response its body and a
    nonce as `AdsServer` writes them), and nothing else: no `StreamState`, no callbacks, no
    parsing of the ACK beyond its arrival. With one task per stream the handler writes a response
    and then reads its ACK (the clients answer each response before the next); with two, a reader
    task reads while the handler waits for the next version and writes, as `AdsServer` does.
    """
    import grpc

    from controlplane.app import ControlPlane, tune_gc_for_streams
    from controlplane.health.store import HealthStatus
    from controlplane.snapshots.snapshot import encode_response
    from controlplane.topology.parse import parse_topology
    from controlplane.xds.server import ADS_SERVICE, SERVER_OPTIONS

    cp = ControlPlane(parse_topology(TOPOLOGY, source="bench"))  # snapshots only: never started

    @dataclass(eq=False)
    class FloorStream:
        wake: asyncio.Event = field(default_factory=asyncio.Event)
        sent_version: str | None = None
        sent_at: float | None = None
        acked_version: str | None = None
        acked_at: float | None = None
        subscribed: bool = False

    current = (cp.snapshot.type_versions[EDS], cp.snapshot.response_body(EDS, (CLUSTER,)))
    streams: set[FloorStream] = set()
    watch = LastAck()

    def acked(stream: FloorStream, version: str) -> None:
        stream.acked_version, stream.acked_at = version, time.time()
        watch.ack(version)

    async def write_due(stream: FloorStream, context: Any, nonce: int) -> bool:
        """Write the current version if this stream has not had it; whether it wrote."""
        version, body = current
        if version == stream.sent_version:
            return False
        stream.sent_version, stream.sent_at = version, time.time()
        await context.write(encode_response(body, str(nonce)))
        return True

    async def one_task(_requests: Any, context: Any) -> None:
        stream = FloorStream()
        streams.add(stream)
        try:
            if await context.read() is grpc.aio.EOF:  # the subscription
                return
            nonce = 0
            while True:
                if await write_due(stream, context, nonce + 1):
                    nonce += 1
                    if await context.read() is grpc.aio.EOF:  # its ACK
                        return
                    acked(stream, stream.sent_version or "")
                    continue
                await stream.wake.wait()
                stream.wake.clear()
        finally:
            streams.discard(stream)

    async def two_tasks(_requests: Any, context: Any) -> None:
        stream = FloorStream()

        async def read() -> None:
            try:
                if await context.read() is grpc.aio.EOF:
                    return
                stream.subscribed = True
                stream.wake.set()
                while (await context.read()) is not grpc.aio.EOF:
                    acked(stream, stream.sent_version or "")
            finally:
                stream.wake.set()

        reader = asyncio.create_task(read())
        streams.add(stream)
        try:
            nonce = 0
            while True:
                await stream.wake.wait()
                stream.wake.clear()
                if reader.done():
                    return
                if not stream.subscribed:
                    continue
                if await write_due(stream, context, nonce + 1):
                    nonce += 1
        finally:
            reader.cancel()
            streams.discard(stream)

    handler = grpc.method_handlers_generic_handler(
        ADS_SERVICE,
        {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                one_task if tasks_per_stream == 1 else two_tasks,
                request_deserializer=lambda b: b,
                response_serializer=lambda b: b,
            )
        },
    )
    server = grpc.aio.server(options=[*SERVER_OPTIONS, *options])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    tune_gc_for_streams()
    conn.send({"xds_port": port, "pid": os.getpid(), "worker_pids": [], "rss_kb": rss_kb()})
    flips = 0

    async def settle(expected: int, limit: float) -> dict[str, Any]:
        deadline = time.monotonic() + limit
        while True:
            count = sum(1 for s in streams if s.acked_version == current[0])
            if count >= expected or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
        return {"streams": len(streams), "acked": count, "rss_kb": rss_kb()}

    async def push(expected: int, limit: float) -> dict[str, Any]:
        nonlocal current, flips
        status = HealthStatus.UNHEALTHY if flips % 2 == 0 else HealthStatus.HEALTHY
        flips += 1
        gc0, sys0, cpu0 = _gc_collections(), _sys_seconds(), _cpu_seconds()
        verdict = time.time()
        snapshot = cp.set_override(CLUSTER, FLIPPED, status, who="bench")
        if snapshot is None:
            raise RuntimeError(f"setting {FLIPPED} {status.name} published nothing")
        version = snapshot.type_versions[EDS]
        current = (version, snapshot.response_body(EDS, (CLUSTER,)))
        watch.arm(version, expected)
        for stream in streams:
            stream.wake.set()
        published = time.time()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watch.done.wait(), limit)
        complete = watch.done.is_set()
        await asyncio.sleep(0.05)
        cpu = _cpu_seconds() - cpu0
        return {
            "version": version,
            "status": status.name,
            "verdict": verdict,
            "publish_s": published - verdict,
            "acked_s": [s.acked_at - verdict for s in streams if s.acked_version == version and s.acked_at],
            "sent_s": [s.sent_at - verdict for s in streams if s.sent_version == version and s.sent_at],
            "cpu_s": cpu,
            "main_cpu_s": cpu,
            "cpu_to_last_ack_s": watch.cpu_at_done - cpu0 if complete else None,
            "sys_s": _sys_seconds() - sys0,
            "gc_collections": [b - a for a, b in zip(gc0, _gc_collections(), strict=True)],
        }

    try:
        await serve_commands(conn, dispatch({"settle": settle, "push": push}))
    finally:
        await server.stop(0)


# --------------------------------------------------------------------------- client process


def worker_main(conn: Connection, port: int, first: int, count: int, per_channel: int, bdp_probe: bool) -> None:
    child_setup()
    asyncio.run(_clients(conn, port, first, count, per_channel, bdp_probe))


async def _clients(conn: Connection, port: int, first: int, count: int, per_channel: int, bdp_probe: bool) -> None:
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import ads_pb2_grpc

    from lab.adsclient import AdsClient, AdsStream

    # One channel per `per_channel` streams; a private subchannel pool makes each channel its own
    # TCP connection (gRPC otherwise shares one connection among channels to the same target).
    # Envoy's HTTP/2 codec sends no BDP pings; a gRPC client does by default, and each of its
    # pings costs the server a read and a PING ACK write per response, so it is off by default.
    options: list[tuple[str, Any]] = [
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.max_receive_message_length", 16 << 20),
        ("grpc.http2.bdp_probe", int(bdp_probe)),
    ]
    channels: list[grpc.aio.Channel] = []
    records: list[dict[str, tuple[float, float]]] = [{} for _ in range(count)]  # version -> (read, ACKed)
    received: Counter[str] = Counter()
    everyone: dict[str, asyncio.Event] = {}  # version -> set when all `count` clients ACKed it
    started = 0  # clients that ACKed their first response
    progress = asyncio.Event()
    errors: list[str] = []
    tasks: list[asyncio.Task[None]] = []

    async def client(index: int, stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub) -> None:
        nonlocal started
        ads = AdsClient(base_pb2.Node(id=f"bench-{first + index}", cluster="bench"))
        stream = AdsStream(stub, ads)
        mine = records[index]
        try:
            await stream.send(ads.subscribe(EDS, [CLUSTER]))
            while (response := await stream.read()) is not None:
                read_at = time.time()
                await stream.send(ads.ack(response))
                version = response.version_info
                mine[version] = (read_at, time.time())
                if len(mine) == 1:
                    started += 1
                    progress.set()
                received[version] += 1
                if received[version] == count and version in everyone:
                    everyone[version].set()
            errors.append(f"bench-{first + index}: the server ended the stream")
        except grpc.aio.AioRpcError as exc:
            errors.append(f"bench-{first + index}: {exc.code().name} {exc.details()}")
        finally:
            progress.set()

    async def connect(batch: int, limit: float) -> dict[str, Any]:
        """Open the streams `batch` at a time, each batch after the last one got its first response."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                for start in range(0, count, batch):
                    end = min(count, start + batch)
                    for index in range(start, end):
                        if index % per_channel == 0:
                            channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options))
                            stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channels[-1])
                        tasks.append(asyncio.create_task(client(index, stub)))
                    while started < end and not errors:
                        progress.clear()
                        await progress.wait()
        return {"connected": started, "channels": len(channels), "errors": errors[:5]}

    async def collect(version: str, limit: float) -> dict[str, Any]:
        """Every client's (read, ACKed) times for `version`, once all have it (or `limit` passed)."""
        done = everyone.setdefault(version, asyncio.Event())
        if received[version] >= count:
            done.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), limit)
        return {"times": [r.get(version) for r in records], "cpu_s": _cpu_seconds(), "errors": errors[:5]}

    try:
        await serve_commands(conn, dispatch({"connect": connect, "cpu": _cpu_seconds, "collect": collect}))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(c.close(grace=None) for c in channels), return_exceptions=True)


# --------------------------------------------------------------------------- parent


@dataclass
class Push:
    version: str
    status: str
    server_ack_ms: list[float]  # verdict -> ACK processed by the server, per client (the ground truth)
    client_ack_ms: list[float]  # verdict -> ACK written by the client, per client
    client_read_ms: list[float]  # verdict -> response read by the client, per client
    sent_ms: list[float]  # verdict -> the server's stream decided to send (StreamState.due), per client
    publish_ms: float  # set_override: building the snapshot and waking every stream
    server_cpu_ms: float
    main_cpu_ms: float  # of server_cpu_ms, the control plane's main process (all of it without xDS workers)
    server_cpu_to_last_ack_ms: float | None
    server_sys_ms: float  # of server_cpu_ms, in the kernel
    server_gc_collections: list[int]  # per generation
    client_cpu_ms: float  # all client processes together
    window_ms: float  # wall time from before the push to every client's report
    other_cpu_ms: float  # CPU time used meanwhile by processes other than this benchmark
    missing: int  # clients whose ACK the server had not processed when the push timed out


@dataclass
class Run:
    nodes: int
    xds_workers: int
    xds_workers_label: str  # as asked: "2", or "auto" (the cores: xds_workers)
    worker_loop: str
    workers: int
    streams_per_channel: int
    channels: int
    rss_before_kb: int
    rss_after_kb: int
    connect_s: float
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    pushes: list[Push] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        def pooled(attr: str, q: float) -> float:
            return _percentile(sorted(x for p in self.pushes for x in getattr(p, attr)), q)

        def last(attr: str) -> list[float]:
            return [max(getattr(p, attr), default=math.nan) for p in self.pushes]

        def median(values: Sequence[float | None]) -> float:
            known = [v for v in values if v is not None]
            return statistics.median(known) if known else math.nan

        cpu = median([p.server_cpu_ms for p in self.pushes])
        return {
            "nodes": self.nodes,
            "xds_workers": self.xds_workers_label,
            "worker_loop": self.worker_loop,
            "p50_ms": pooled("server_ack_ms", 50),
            "p99_ms": pooled("server_ack_ms", 99),
            "last_ack_ms": median(last("server_ack_ms")),
            "last_ack_worst_ms": max(last("server_ack_ms"), default=math.nan),
            "client_p50_ms": pooled("client_ack_ms", 50),
            "client_p99_ms": pooled("client_ack_ms", 99),
            "client_last_ack_ms": median(last("client_ack_ms")),
            "last_send_ms": median(last("sent_ms")),
            "publish_ms": median([p.publish_ms for p in self.pushes]),
            "server_cpu_ms": cpu,
            "server_sys_ms": median([p.server_sys_ms for p in self.pushes]),
            "main_cpu_ms": median([p.main_cpu_ms for p in self.pushes]),
            "cpu_us_per_stream": cpu * 1000 / self.nodes,
            "client_cpu_ms": median([p.client_cpu_ms for p in self.pushes]),
            "kb_per_stream": (self.rss_after_kb - self.rss_before_kb) / self.nodes,
            "missing": sum(p.missing for p in self.pushes),
            "load_1m": self.load_before[0],
            "other_cpu_pct": 100
            * sum(p.other_cpu_ms for p in self.pushes)
            / max(1e-9, sum(p.window_ms for p in self.pushes) * (os.cpu_count() or 1)),
        }


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    return values[max(0, math.ceil(q / 100 * len(values)) - 1)]  # nearest rank


@dataclass(frozen=True)
class Options:
    workers: int
    per_channel: int
    bdp_probe: bool
    pushes: int
    warmup: int
    pause: float
    batch: int
    profile: Path | None
    native: bool
    floor_options: list[tuple[str, Any]] = field(default_factory=list)


def run_once(
    ctx: Any,
    children: list[Child],
    nodes: int,
    xds_workers: int,
    opt: Options,
    log: Callable[[str], None],
    worker_loop: str = "asyncio",
    label: str = "",
) -> Run:
    """A fresh server (with `xds_workers` xDS worker processes) and `nodes` clients; warm-up and
    measured pushes; everything stopped after."""
    load_before = os.getloadavg()
    if label in FLOORS:
        server = Child(ctx, "fanout-floor", floor_main, FLOORS[label], opt.floor_options)
    else:
        server = Child(ctx, "fanout-server", server_main, xds_workers, worker_loop)
    children.append(server)
    ready = server.recv(60)
    port, server_pid, worker_pids = ready["xds_port"], ready["pid"], ready["worker_pids"]
    log(
        f"  server pid {server_pid}, xDS workers {worker_pids or 'none (in-process)'}, xDS port {port}, "
        f"RSS {ready['rss_kb']} kB before clients (all processes)"
    )

    workers = max(1, min(opt.workers, nodes))
    shares = [nodes // workers + (1 if w < nodes % workers else 0) for w in range(workers)]
    clients: list[Child] = []
    first = 0
    for w, share in enumerate(shares):
        clients.append(
            Child(ctx, f"fanout-worker-{w}", worker_main, port, first, share, opt.per_channel, opt.bdp_probe)
        )
        first += share
    children.extend(clients)
    spy: subprocess.Popen[bytes] | None = None
    try:
        limit = 60 + nodes * 0.05
        t0 = time.monotonic()
        for c in clients:
            c.send("connect", opt.batch, limit)
        answers = [c.recv(limit + 30) for c in clients]
        connected = sum(a["connected"] for a in answers)
        if connected < nodes:
            errors = [e for a in answers for e in a["errors"]]
            raise RuntimeError(f"only {connected} of {nodes} clients got a first response: {errors[:3]}")
        settled = server.ask("settle", nodes, limit, limit=limit + 30)
        if settled["acked"] < nodes:
            raise RuntimeError(f"the server saw {settled['acked']} of {nodes} streams ACK")
        run = Run(
            nodes=nodes,
            xds_workers=xds_workers,
            xds_workers_label=label or str(xds_workers),
            worker_loop=worker_loop if xds_workers > 1 else "-",
            workers=workers,
            streams_per_channel=opt.per_channel,
            channels=sum(a["channels"] for a in answers),
            rss_before_kb=ready["rss_kb"],
            rss_after_kb=settled["rss_kb"],
            connect_s=time.monotonic() - t0,
            load_before=load_before,
        )
        log(f"  {nodes} streams on {run.channels} connections in {run.connect_s:.1f} s, RSS {settled['rss_kb']} kB")

        if opt.profile is not None:
            # With xDS workers, the first worker: it is where the streams' microseconds go.
            target, name = (worker_pids[0], "worker") if worker_pids else (server_pid, "server")
            spy = start_py_spy(
                target,
                opt.profile / f"{name}-{nodes}-x{xds_workers}.txt",
                rate=250,
                native=opt.native,
                options=["--threads", "--idle"],
                attach_wait=1.0,
            )
        limit = 30 + nodes * 0.01
        for i in range(opt.warmup + opt.pushes):
            time.sleep(opt.pause)
            window0, machine0, parent0 = time.monotonic(), _machine_busy_seconds(), _cpu_seconds()
            cpu_before = [c.ask("cpu", limit=30) for c in clients]
            result = server.ask("push", nodes, limit, limit=limit + 30)
            for c in clients:
                c.send("collect", result["version"], 10)
            collected = [c.recv(60) for c in clients]
            window = time.monotonic() - window0
            machine = _machine_busy_seconds() - machine0
            parent = _cpu_seconds() - parent0
            clients_cpu = sum(a["cpu_s"] - b for a, b in zip(collected, cpu_before, strict=True))
            verdict = result["verdict"]
            times = [t for a in collected for t in a["times"] if t is not None]
            p = Push(
                version=result["version"],
                status=result["status"],
                server_ack_ms=sorted(x * 1000 for x in result["acked_s"]),
                client_ack_ms=sorted((t[1] - verdict) * 1000 for t in times),
                client_read_ms=sorted((t[0] - verdict) * 1000 for t in times),
                sent_ms=sorted(x * 1000 for x in result["sent_s"]),
                publish_ms=result["publish_s"] * 1000,
                server_cpu_ms=result["cpu_s"] * 1000,
                main_cpu_ms=result["main_cpu_s"] * 1000,
                server_cpu_to_last_ack_ms=None
                if result["cpu_to_last_ack_s"] is None
                else result["cpu_to_last_ack_s"] * 1000,
                server_sys_ms=result["sys_s"] * 1000,
                server_gc_collections=result["gc_collections"],
                client_cpu_ms=clients_cpu * 1000,
                window_ms=window * 1000,
                # What the rest of the machine (other people's tests) used meanwhile; /proc/stat
                # counts in 10 ms ticks, so single pushes are rough and the sum over a run is not.
                other_cpu_ms=max(0.0, machine - result["cpu_s"] - clients_cpu - parent) * 1000,
                missing=nodes - len(result["acked_s"]),
            )
            what = "warm-up" if i < opt.warmup else f"push {i - opt.warmup + 1}/{opt.pushes}"
            log(
                f"  {what:11} {p.status:9} last ACK {max(p.server_ack_ms, default=math.nan):7.1f} ms "
                f"(client {max(p.client_ack_ms, default=math.nan):7.1f}), server CPU {p.server_cpu_ms:6.1f} ms "
                f"(sys {p.server_sys_ms:5.1f}, gc {p.server_gc_collections}), clients CPU {p.client_cpu_ms:6.1f} ms"
                + (f", {p.missing} MISSING" if p.missing else "")
            )
            if i >= opt.warmup:
                run.pushes.append(p)
        run.load_after = os.getloadavg()
        return run
    finally:
        if spy is not None:
            stop_py_spy(spy, log)
        for c in [*clients, server]:
            c.close()
            children.remove(c)


COLUMNS = [
    ("nodes", "nodes", "{:.0f}"),
    ("xDS workers", "xds_workers", "{}"),
    ("worker loop", "worker_loop", "{}"),
    ("p50 ms", "p50_ms", "{:.1f}"),
    ("p99 ms", "p99_ms", "{:.1f}"),
    ("last ACK ms", "last_ack_ms", "{:.1f}"),
    ("worst last ACK ms", "last_ack_worst_ms", "{:.1f}"),
    ("client last ACK ms", "client_last_ack_ms", "{:.1f}"),
    ("last send ms", "last_send_ms", "{:.1f}"),
    ("server CPU ms/push", "server_cpu_ms", "{:.1f}"),
    ("CPU µs/stream/push", "cpu_us_per_stream", "{:.1f}"),
    ("of it main process ms/push", "main_cpu_ms", "{:.1f}"),
    ("clients CPU ms/push", "client_cpu_ms", "{:.1f}"),
    ("KB/stream", "kb_per_stream", "{:.1f}"),
    ("others' CPU %", "other_cpu_pct", "{:.0f}"),
]


def table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(c[0] for c in COLUMNS) + " |", "|" + "|".join("---:" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(fmt.format(r[key]) for _, key, fmt in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="How fast one health change reaches N ADS clients (see the module docstring)."
    )
    parser.add_argument("--nodes", type=int, nargs="+", default=[100, 1000], help="client counts to run")
    parser.add_argument("--pushes", type=int, default=10, help="measured pushes per run")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured pushes before them")
    parser.add_argument("--repeat", type=int, default=1, help="runs per client count; the median run is reported")
    parser.add_argument("--workers", type=int, default=2, help="client processes")
    parser.add_argument(
        "--xds-workers",
        nargs="+",
        default=["1"],
        help="server xDS worker processes to compare side by side (1: ADS in the control plane's process, "
        "as by default; auto: the cores this process may use, as `serve --workers auto`; floor, floor:2: "
        "not the control plane but grpc.aio's own floor, a bare server writing the same responses with one "
        "or two tasks per stream)",
    )
    parser.add_argument(
        "--streams-per-channel",
        type=int,
        default=1,
        help="ADS streams per gRPC channel (default 1: a TCP connection per node, as Envoy)",
    )
    parser.add_argument(
        "--client-bdp-probe",
        action="store_true",
        help="let the clients send BDP pings, as gRPC clients do (Envoy does not)",
    )
    parser.add_argument(
        "--xds-worker-loop",
        nargs="+",
        choices=["asyncio", "uvloop"],
        default=["asyncio"],
        help="the event loops of the xDS worker processes to compare (an experiment: uvloop under grpc.aio)",
    )
    parser.add_argument(
        "--floor-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a gRPC server option (channel argument) added to the floor servers' own, e.g. "
        "grpc.experimental.tcp_read_chunk_size=1024 (integers as integers); repeatable",
    )
    parser.add_argument("--pause", type=float, default=0.3, help="seconds between pushes")
    parser.add_argument("--batch", type=int, default=250, help="streams each client process opens at a time")
    parser.add_argument("--json", type=Path, help="write the summary and every push's samples here")
    parser.add_argument(
        "--profile", type=Path, help="record the server's stacks with py-spy during the pushes into this folder"
    )
    parser.add_argument(
        "--profile-native",
        action="store_true",
        help="with native frames (py-spy pauses the server at each sample: slower pushes)",
    )
    args = parser.parse_args(argv)
    xds_workers = [(_xds_workers(w), _xds_workers_label(w)) for w in args.xds_workers]
    opt = Options(
        workers=args.workers,
        per_channel=args.streams_per_channel,
        bdp_probe=args.client_bdp_probe,
        pushes=args.pushes,
        warmup=args.warmup,
        pause=args.pause,
        batch=args.batch,
        profile=args.profile,
        native=args.profile_native,
        floor_options=[_channel_arg(text) for text in args.floor_option],
    )

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    raise_fd_limit()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    signal.signal(signal.SIGTERM, on_sigterm)
    ctx = mp.get_context("spawn")  # children start clean: no gRPC state forked from the parent
    children: list[Child] = []
    runs: dict[tuple[int, str, str], list[Run]] = {}
    started = datetime.datetime.now(datetime.UTC)
    try:
        for n in args.nodes:
            for r in range(args.repeat):
                # Side by side: each worker count in turn within one repeat, so load drifts hit all alike.
                configs = [(w, lb, lp) for w, lb in xds_workers for lp in (args.xds_worker_loop if w > 1 else ["-"])]
                for x, label, loop in configs:
                    server = label if label in FLOORS else f"{x} xDS worker(s) ({loop})"
                    log(
                        f"{n} nodes, {server}, run {r + 1}/{args.repeat}: {min(args.workers, n)} "
                        f"client processes, {args.streams_per_channel} stream(s) per connection, "
                        f"load {os.getloadavg()}"
                    )
                    runs.setdefault((n, label, loop), []).append(run_once(ctx, children, n, x, opt, log, loop, label))
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        for c in list(children):
            c.close()

    chosen = {n: _median_run(rs) for n, rs in runs.items()}
    if args.repeat > 1:
        print("every run:")
        print(table([r.summary() for rs in runs.values() for r in rs]))
        print(f"\nthe median run of {args.repeat} (by last ACK):")
    print(table([r.summary() for r in chosen.values()]))
    if args.json is not None:
        env: dict[str, Any] = {
            "started": started.isoformat(timespec="seconds"),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "argv": sys.argv,
        }
        with contextlib.suppress(ImportError):
            import grpc

            env["grpcio"] = grpc.__version__
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            git = ["git", "-C", str(Path(__file__).resolve().parent)]
            env["commit"] = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
            env["controlplane_modified"] = bool(
                subprocess.run(
                    [*git, "status", "--porcelain", "--", "../controlplane"], capture_output=True, text=True
                ).stdout.strip()
            )
        args.json.write_text(
            json.dumps(
                {
                    "env": env,
                    "summary": [r.summary() for r in chosen.values()],
                    "runs": {
                        f"{n}x{x}{'' if loop == '-' else '-' + loop}": [
                            {"summary": r.summary(), **asdict(r)} for r in rs
                        ]
                        for (n, x, loop), rs in runs.items()
                    },
                },
                indent=1,
            )
        )
    return 0


def _channel_arg(text: str) -> tuple[str, Any]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise SystemExit(f"--floor-option {text!r}: expected NAME=VALUE")
    return (name, int(value)) if value.lstrip("-").isdigit() else (name, value)


FLOORS = {"floor": 1, "floor:2": 2}  # grpc.aio's floor: tasks per stream


def _xds_workers_label(text: str) -> str:
    if text == "auto":
        return f"auto={_xds_workers(text)}"
    return text if text in FLOORS else str(_xds_workers(text))


def _xds_workers(text: str) -> int:
    if text in FLOORS:
        return 1
    if text == "auto":
        from controlplane.cli.serve import auto_workers

        return auto_workers()
    return max(1, int(text))


def _median_run(runs: list[Run]) -> Run:
    ordered = sorted(runs, key=lambda r: r.summary()["last_ack_ms"])
    return ordered[(len(ordered) - 1) // 2]


if __name__ == "__main__":
    sys.exit(main())
