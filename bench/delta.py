"""State of the world against delta xDS, side by side: N nodes, a topology of C clusters.

For each protocol in turn (same run, same machine, a fresh server process each), one control
plane serves C clusters of two endpoints each and one listener; W worker processes hold N
simulated nodes between them (lab/adsclient.py), one TCP connection each, that behave as Envoy
does on ADS: wildcard CDS, then EDS for every cluster they got (state of the world: the full
name list; delta: the names added or removed), ACKing every response at once. Then:

- health change: one endpoint's override flips UNHEALTHY/HEALTHY; done when every node has ACKed
  the new EDS version;
- cluster added: one more cluster (two endpoints) joins the topology; done when every node has
  ACKed the new CDS version and the EDS version that carries the new cluster's endpoints.

Measured in the server process per change: the DiscoveryResponse / DeltaDiscoveryResponse bytes
it wrote (protobuf payload, without gRPC and HTTP/2 framing; counted in `on_response`), the
resources they carried, its CPU time (getrusage, all threads) from just before the change until
the last ACK was processed, and the wall time until that last ACK. Memory: the server's RSS
before the nodes connected and after every node holds all C clusters and their endpoints.

Then the floor: a bare grpc.aio server (the ADS server's options and reader/writer shape) and
the same N clients exchanging, per node, the five messages of a delta cluster addition (two
responses of delta's size, an EDS subscription and two ACKs) with no xDS work at all. Its server
CPU per node is what gRPC alone costs, so SotW's CPU divided by it bounds what delta could reach.

    python bench/delta.py --nodes 1000 --clusters 1000 [--pushes 3] [--adds 3] [--workers 2] [--json out.json]
        [--protocols sotw delta floor] [--profile DIR]

Every child process ignores SIGINT, dies with its parent and exits when its command pipe closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import os
import resource
import signal
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

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

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
PROTOCOLS = ("sotw", "delta")
# "floor": the gRPC messages of a delta cluster addition alone, with no xDS work (see _floor_server).
RUNS = (*PROTOCOLS, "floor")


def topology(clusters: int) -> dict[str, Any]:
    return {
        "controlplane": {
            "xds": {"address": "127.0.0.1", "port": 0},
            "admin": {"address": "127.0.0.1", "port": 0},
            "watch_interval": 0,
        },
        "clusters": [cluster_document(i) for i in range(clusters)],
        "listeners": [{"name": "ingress", "port": 10000, "routes": [{"cluster": "c0"}]}],
    }


def cluster_document(i: int) -> dict[str, Any]:
    host = f"10.{(i >> 8) & 255}.{i & 255}.1"
    return {"name": f"c{i}", "endpoints": [{"address": host, "port": 8080}, {"address": host, "port": 8081}]}


def _cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# --------------------------------------------------------------------------- server process


def server_main(conn: Connection, clusters: int) -> None:
    child_setup()
    asyncio.run(_server(conn, clusters))


async def _server(conn: Connection, clusters: int) -> None:
    from controlplane.app import ControlPlane, tune_gc_for_streams
    from controlplane.health.store import HealthStatus
    from controlplane.snapshots.snapshot import Snapshot
    from controlplane.topology.parse import parse_topology
    from controlplane.xds.server import StreamCallbacks
    from controlplane.xds.stream import PendingResponse, RequestKind, RequestOutcome, StreamState

    class Watch(StreamCallbacks):
        """Passes every callback on; counts what is written, and notes the last awaited ACK."""

        def __init__(self, inner: StreamCallbacks) -> None:
            self.inner = inner
            self.bytes = 0
            self.responses = 0
            self.resources = 0
            self.targets: dict[str, str] = {}
            self.pending: dict[int, set[str]] = {}
            self.remaining = 0
            self.done = asyncio.Event()
            self.cpu_at_done = 0.0
            self.loop_cpu_at_done = 0.0
            self.time_at_done = 0.0

        def arm(self, targets: dict[str, str], streams: list[StreamState]) -> None:
            """Wait for every stream to ACK `targets` (type URL -> version), those it has not already."""
            self.targets = targets
            self.pending = {}
            for s in streams:
                missing = {t for t, v in targets.items() if (ts := s.types.get(t)) is None or ts.acked_version != v}
                if missing:
                    self.pending[s.stream_id] = missing
            self.remaining = len(self.pending)
            self.done.clear()
            if self.remaining == 0:
                self._finish()

        def _finish(self) -> None:
            self.cpu_at_done, self.time_at_done = _cpu_seconds(), time.time()
            self.loop_cpu_at_done = time.thread_time()  # this callback runs on the event loop's thread
            self.done.set()

        def on_stream_open(self, stream: StreamState) -> None:
            self.inner.on_stream_open(stream)

        def on_stream_closed(self, stream: StreamState) -> None:
            self.inner.on_stream_closed(stream)

        def on_response(self, stream: StreamState, response: PendingResponse, snapshot: Snapshot) -> None:
            self.inner.on_response(stream, response, snapshot)
            # The body is encoded once per snapshot and cached: this is a lookup, not an encoding.
            self.bytes += len(stream.response_body(snapshot, response)) + len(response.nonce) + 2
            self.responses += 1
            self.resources += len(response.names)

        def on_request(self, stream: StreamState, outcome: RequestOutcome) -> None:
            self.inner.on_request(stream, outcome)
            if outcome.kind is RequestKind.ACK and self.targets.get(outcome.type_url) == outcome.version:
                missing = self.pending.get(stream.stream_id)
                if missing is not None and outcome.type_url in missing:
                    missing.discard(outcome.type_url)
                    if not missing:
                        del self.pending[stream.stream_id]
                        self.remaining -= 1
                        if self.remaining == 0:
                            self._finish()

    document = topology(clusters)
    cp = ControlPlane(parse_topology(document, source="bench"))
    tune_gc_for_streams()
    watch = Watch(cp.ads.callbacks)
    cp.ads.callbacks = watch
    await cp.start()
    conn.send({"xds_port": cp.xds_port, "pid": os.getpid(), "rss_kb": rss_kb()})
    flips = 0
    added = 0

    def streams() -> list[StreamState]:
        return list(cp.ads.streams.values())

    async def settle(expected: int, limit: float) -> dict[str, Any]:
        """Wait until `expected` streams ACKed the current CDS and EDS versions; then read RSS."""
        snap = cp.snapshot
        deadline = time.monotonic() + limit
        while True:
            synced = sum(
                1
                for s in streams()
                if all(
                    (ts := s.types.get(t)) is not None and ts.acked_version == snap.type_versions[t] for t in (CDS, EDS)
                )
                and len(s.types[EDS].sent) == len(snap.resources[EDS])
            )
            if synced >= expected or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # the last streams' buffers and tasks settle
        import gc

        gc.collect()
        return {"streams": len(cp.ads.streams), "synced": synced, "rss_kb": rss_kb()}

    async def change(kind: str, limit: float) -> dict[str, Any]:
        nonlocal flips, added
        watch.bytes = watch.responses = watch.resources = 0
        if kind == "cluster":
            # Parsing the edited file is the file watcher's work, the same for either protocol:
            # done before the clock starts.
            document["clusters"].append(cluster_document(clusters + added))
            added += 1
            edited = parse_topology(document, source="bench")
        cpu0, t0, loop0 = _cpu_seconds(), time.time(), time.thread_time()
        if kind == "health":
            status = HealthStatus.UNHEALTHY if flips % 2 == 0 else HealthStatus.HEALTHY
            flips += 1
            snapshot = cp.set_override("c0", "10.0.0.1:8080", status, who="bench")
            targets = [EDS]
        else:
            snapshot = cp.update_topology(edited)
            targets = [CDS, EDS]
        published = time.time()
        if snapshot is None:
            raise RuntimeError(f"the {kind} change published nothing")
        watch.arm({t: snapshot.type_versions[t] for t in targets}, streams())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(watch.done.wait(), limit)
        complete = watch.done.is_set()
        await asyncio.sleep(0.2)  # late writes (none expected) would still be counted
        return {
            "complete": complete,
            "missing": watch.remaining,
            "publish_ms": (published - t0) * 1000,
            "last_ack_ms": (watch.time_at_done - t0) * 1000 if complete else math.nan,
            "cpu_ms": (watch.cpu_at_done - cpu0) * 1000 if complete else math.nan,
            # The rest is gRPC core's own threads (its poller): no Python runs there.
            "loop_cpu_ms": (watch.loop_cpu_at_done - loop0) * 1000 if complete else math.nan,
            "bytes": watch.bytes,
            "responses": watch.responses,
            "resources": watch.resources,
        }

    try:
        await serve_commands(conn, dispatch({"settle": settle, "change": change}))
    finally:
        await cp.aclose(grace=0)


# --------------------------------------------------------------------------- gRPC alone (the floor)

FLOOR_METHOD = "/healthplane.bench.Floor/Stream"


def floor_server_main(conn: Connection, response_bytes: list[int]) -> None:
    child_setup()
    asyncio.run(_floor_server(conn, response_bytes))


async def _floor_server(conn: Connection, response_bytes: list[int]) -> None:
    """The messages of a delta cluster addition and nothing else: per node, a response, then (on
    the first request that follows) a second one, and three requests read, on a grpc.aio server
    with the ADS server's options and its shape (a reader task and a writer woken by an event).
    No parsing, no bookkeeping, no callbacks: the CPU the gRPC path alone costs."""
    import grpc

    from controlplane.app import tune_gc_for_streams
    from controlplane.xds.server import create_server

    first, second = (b"\x12" * n for n in response_bytes)

    class Stream:
        __slots__ = ("pending", "reads", "wake")

        def __init__(self) -> None:
            self.wake = asyncio.Event()
            self.pending: list[bytes] = [first]  # every node gets one round as it connects
            self.reads = 0

    streams: list[Stream] = []
    done = asyncio.Event()
    remaining = 0
    cpu_at_done = time_at_done = loop_cpu_at_done = 0.0
    synced = 0
    expected = 1 << 62  # nodes the parent waits for (settle)
    all_synced = asyncio.Event()

    async def handler(_requests: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        stream = Stream()

        async def read() -> None:
            nonlocal remaining, cpu_at_done, time_at_done, loop_cpu_at_done, synced
            while (await context.read()) is not grpc.aio.EOF:
                stream.reads += 1
                if stream.reads == 1:  # the hello, as a node's first request
                    stream.wake.set()
                    continue
                step = (stream.reads - 2) % 3
                if step == 0:  # the subscription: answered with the second response
                    stream.pending.append(second)
                    stream.wake.set()
                elif step == 2:  # the last ACK of the round
                    if stream.reads == 4:
                        synced += 1
                        if synced >= expected:
                            all_synced.set()
                    else:
                        remaining -= 1
                        if remaining == 0:
                            cpu_at_done, time_at_done = _cpu_seconds(), time.time()
                            loop_cpu_at_done = time.thread_time()
                            done.set()

        reader = asyncio.create_task(read())
        streams.append(stream)
        try:
            while not reader.done():
                await stream.wake.wait()
                stream.wake.clear()
                if stream.reads == 0:
                    continue
                while stream.pending:
                    await context.write(stream.pending.pop(0))
        finally:
            reader.cancel()

    def _identity(data: bytes) -> bytes:
        return data

    method = grpc.stream_stream_rpc_method_handler(
        handler, request_deserializer=_identity, response_serializer=_identity
    )
    service, name = FLOOR_METHOD.strip("/").split("/")
    server = create_server(grpc.method_handlers_generic_handler(service, {name: method}))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    tune_gc_for_streams()
    conn.send({"xds_port": port, "pid": os.getpid(), "rss_kb": rss_kb()})

    async def handle(message: tuple[Any, ...]) -> Any:
        nonlocal remaining, expected
        command, *args = message
        if command == "settle":
            expected, limit = args
            if synced >= expected:
                all_synced.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(all_synced.wait(), limit)
            await asyncio.sleep(1.0)
            import gc

            gc.collect()
            return {"streams": len(streams), "synced": synced, "rss_kb": rss_kb()}
        if command == "change":
            _kind, limit = args
            done.clear()
            remaining = len(streams)
            cpu0, t0, loop0 = _cpu_seconds(), time.time(), time.thread_time()
            for stream in streams:
                stream.pending.append(first)
                stream.wake.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), limit)
            complete = done.is_set()
            return {
                "complete": complete,
                "missing": remaining,
                "publish_ms": 0.0,
                "last_ack_ms": (time_at_done - t0) * 1000 if complete else math.nan,
                "cpu_ms": (cpu_at_done - cpu0) * 1000 if complete else math.nan,
                "loop_cpu_ms": (loop_cpu_at_done - loop0) * 1000 if complete else math.nan,
                "bytes": sum(response_bytes) * len(streams),
                "responses": 2 * len(streams),
                "resources": 0,
            }
        if command in ("stop", "errors"):
            return "stopped" if command == "stop" else []
        raise ValueError(f"unknown command {command!r}")

    try:
        await serve_commands(conn, handle)
    finally:
        await server.stop(0)


# --------------------------------------------------------------------------- client process


def _identity(data: bytes) -> bytes:
    return data


def _cluster_name(value: bytes) -> str:
    """A serialized Cluster's name (field 1, written first by a deterministic serializer)."""
    if value[:1] == b"\x0a":
        length, i, shift = 0, 1, 0
        while True:
            byte = value[i]
            length |= (byte & 0x7F) << shift
            i += 1
            if not byte & 0x80:
                break
            shift += 7
        return value[i : i + length].decode()
    from envoy.config.cluster.v3 import cluster_pb2

    return str(cluster_pb2.Cluster.FromString(value).name)


def worker_main(conn: Connection, port: int, first: int, count: int, protocol: str) -> None:
    child_setup()
    asyncio.run(_clients(conn, port, first, count, protocol))


async def _clients(conn: Connection, port: int, first: int, count: int, protocol: str) -> None:
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import ads_pb2_grpc

    from lab.adsclient import AdsClient, AdsStream, DeltaAdsClient, DeltaAdsStream

    options: list[tuple[str, Any]] = [
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.max_receive_message_length", 256 << 20),
        ("grpc.http2.bdp_probe", 0),
    ]
    channels: list[grpc.aio.Channel] = []
    tasks: list[asyncio.Task[None]] = []
    errors: list[str] = []
    started = 0
    progress = asyncio.Event()

    async def sotw(index: int, stub: Any) -> None:
        client = AdsClient(base_pb2.Node(id=f"sotw-{first + index}", cluster="bench"))
        stream = AdsStream(stub, client)
        await stream.send(client.subscribe(CDS))
        while (response := await stream.read()) is not None:
            if response.type_url == CDS:
                names = [_cluster_name(r.value) for r in response.resources]
                await stream.send(client.ack(response))
                if names != client.names.get(EDS):
                    await stream.send(client.subscribe(EDS, names))
            else:
                await stream.send(client.ack(response))
            yield_started(response.type_url)

    async def delta(index: int, stub: Any) -> None:
        client = DeltaAdsClient(base_pb2.Node(id=f"delta-{first + index}", cluster="bench"))
        stream = DeltaAdsStream(stub, client)
        await stream.send(client.subscribe(CDS))
        while (response := await stream.read()) is not None:
            if response.type_url == CDS:
                added = [r.name for r in response.resources if r.name not in client.held.get(CDS, {})]
                removed = [n for n in response.removed_resources if n in client.held.get(CDS, {})]
                ack = client.ack(response)
                if added or removed or not client.subscribed(EDS):
                    await stream.send(client.subscribe(EDS, added, removed))
                await stream.send(ack)
            else:
                await stream.send(client.ack(response))
            yield_started(response.type_url)

    async def floor(index: int, channel: grpc.aio.Channel) -> None:
        # Requests of the sizes a delta node sends: its first, an EDS subscription, two ACKs.
        from envoy.service.discovery.v3 import discovery_pb2

        hello = DeltaAdsClient(base_pb2.Node(id=f"floor-{first + index}", cluster="bench")).subscribe(CDS)
        subscribe = discovery_pb2.DeltaDiscoveryRequest(type_url=EDS, resource_names_subscribe=["c1000"])
        acks = [discovery_pb2.DeltaDiscoveryRequest(type_url=t, response_nonce="12") for t in (CDS, EDS)]
        wire = [m.SerializeToString() for m in (hello, subscribe, *acks)]
        call = channel.stream_stream(FLOOR_METHOD, request_serializer=_identity, response_deserializer=_identity)()
        await call.write(wire[0])
        answered = 0
        while (await call.read()) is not grpc.aio.EOF:
            answered += 1
            if answered % 2:
                await call.write(wire[1])
                await call.write(wire[2])
            else:
                await call.write(wire[3])
                yield_started(EDS)

    def yield_started(type_url: str) -> None:
        nonlocal started
        if type_url == EDS:
            started += 1
            progress.set()

    async def client(index: int, channel: grpc.aio.Channel) -> None:
        try:
            if protocol == "floor":
                await floor(index, channel)
            else:
                stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
                await (sotw if protocol == "sotw" else delta)(index, stub)
            errors.append(f"{first + index}: the server ended the stream")
        except grpc.aio.AioRpcError as exc:
            errors.append(f"{first + index}: {exc.code().name} {exc.details()}")
        finally:
            progress.set()

    async def connect(batch: int, limit: float) -> dict[str, Any]:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                for start in range(0, count, batch):
                    end = min(count, start + batch)
                    for index in range(start, end):
                        channels.append(grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options))
                        tasks.append(asyncio.create_task(client(index, channels[-1])))
                    while started < end and not errors:
                        progress.clear()
                        await progress.wait()
        return {"connected": started, "errors": errors[:5]}

    try:
        await serve_commands(conn, dispatch({"connect": connect, "errors": lambda: errors[:5]}))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(c.close(grace=None) for c in channels), return_exceptions=True)


# --------------------------------------------------------------------------- parent


def run_protocol(
    ctx: Any,
    children: list[Child],
    protocol: str,
    args: argparse.Namespace,
    log: Callable[[str], None],
    floor_sizes: list[int] | None = None,
) -> dict[str, Any]:
    if protocol == "floor":
        server = Child(ctx, "delta-bench-server-floor", floor_server_main, floor_sizes)
    else:
        server = Child(ctx, f"delta-bench-server-{protocol}", server_main, args.clusters)
    children.append(server)
    ready = server.recv(120)
    port = ready["xds_port"]
    workers = max(1, min(args.workers, args.nodes))
    shares = [args.nodes // workers + (1 if w < args.nodes % workers else 0) for w in range(workers)]
    clients: list[Child] = []
    first = 0
    for w, share in enumerate(shares):
        clients.append(Child(ctx, f"delta-bench-worker-{protocol}-{w}", worker_main, port, first, share, protocol))
        first += share
    children.extend(clients)
    try:
        limit = 120 + args.nodes * 0.2
        t0 = time.monotonic()
        for c in clients:
            c.send("connect", args.batch, limit)
        answers = [c.recv(limit + 30) for c in clients]
        connected = sum(a["connected"] for a in answers)
        if connected < args.nodes:
            raise RuntimeError(f"{protocol}: {connected} of {args.nodes} nodes connected: {answers}")
        settled = server.ask("settle", args.nodes, limit, limit=limit + 30)
        if settled["synced"] < args.nodes:
            raise RuntimeError(f"{protocol}: the server saw {settled['synced']} of {args.nodes} nodes in sync")
        connect_s = time.monotonic() - t0
        kb_per_stream = (settled["rss_kb"] - ready["rss_kb"]) / args.nodes
        log(
            f"{protocol}: {args.nodes} nodes hold {args.clusters} clusters after {connect_s:.1f} s; "
            f"RSS {ready['rss_kb']} -> {settled['rss_kb']} kB ({kb_per_stream:.1f} kB/stream)"
        )
        results: dict[str, list[dict[str, Any]]] = {"health": [], "cluster": []}
        changes = (
            (("cluster", args.adds),) if protocol == "floor" else (("health", args.pushes), ("cluster", args.adds))
        )
        for kind, n in changes:
            spy = None
            if args.profile is not None:
                out = args.profile / f"server-{protocol}-{kind}.txt"
                spy = start_py_spy(ready["pid"], out, rate=250, options=["--threads", "--idle"], attach_wait=1.0)
            for i in range(n + 1):  # the first of each is a warm-up
                time.sleep(args.pause)
                r = server.ask("change", kind, 60 + args.nodes * 0.1, limit=120 + args.nodes * 0.1)
                if not r["complete"]:
                    errors = [c.ask("errors", limit=10) for c in clients]
                    raise RuntimeError(f"{protocol} {kind}: {r['missing']} nodes did not ACK; {errors}")
                log(
                    f"  {kind:7} {'warm-up' if i == 0 else f'{i}/{n}':8} last ACK {r['last_ack_ms']:8.1f} ms, "
                    f"server CPU {r['cpu_ms']:8.1f} ms, {r['bytes']:>12,} bytes in {r['responses']} responses "
                    f"({r['resources']} resources), publish {r['publish_ms']:.1f} ms"
                )
                if i > 0:
                    results[kind].append(r)
            if spy is not None:
                stop_py_spy(spy, log)
        return {"protocol": protocol, "connect_s": connect_s, "kb_per_stream": kb_per_stream, **results}
    finally:
        for c in [*clients, server]:
            c.close()
            children.remove(c)


def summarize(run: dict[str, Any], nodes: int) -> dict[str, dict[str, float]]:
    out = {}
    for kind in ("health", "cluster"):
        rs = run[kind]
        if not rs:
            continue
        out[kind] = {
            "bytes_per_node": statistics.median(r["bytes"] for r in rs) / nodes,
            "resources_per_node": statistics.median(r["resources"] for r in rs) / nodes,
            "cpu_us_per_node": statistics.median(r["cpu_ms"] for r in rs) * 1000 / nodes,
            "stream_cpu_us_per_node": statistics.median(r["cpu_ms"] - r["publish_ms"] for r in rs) * 1000 / nodes,
            "grpc_threads_us_per_node": statistics.median(r["cpu_ms"] - r["loop_cpu_ms"] for r in rs) * 1000 / nodes,
            "last_ack_ms": statistics.median(r["last_ack_ms"] for r in rs),
            "publish_ms": statistics.median(r["publish_ms"] for r in rs),
        }
    return out


def table(runs: dict[str, dict[str, Any]], nodes: int) -> str:
    s = {p: summarize(r, nodes) for p, r in runs.items()}
    rows = [
        "| change | metric | state of the world | delta | SotW / delta |",
        "|---|---|---:|---:|---:|",
    ]
    metrics = [
        ("bytes written per node", "bytes_per_node", "{:,.0f}"),
        ("resources sent per node", "resources_per_node", "{:,.1f}"),
        ("server CPU per node (µs)", "cpu_us_per_node", "{:,.1f}"),
        ("of which after the snapshot is published (µs)", "stream_cpu_us_per_node", "{:,.1f}"),
        ("of which in gRPC core's threads, not the event loop's (µs)", "grpc_threads_us_per_node", "{:,.1f}"),
        ("time until the last ACK (ms)", "last_ack_ms", "{:,.1f}"),
        ("snapshot build + publish (ms)", "publish_ms", "{:,.1f}"),
    ]
    for kind, label in (("health", "one endpoint's health"), ("cluster", "one cluster added")):
        for name, key, fmt in metrics:
            a, b = s["sotw"][kind][key], s["delta"][kind][key]
            ratio = f"{a / b:,.1f} x" if b else "-"
            rows.append(f"| {label} | {name} | {fmt.format(a)} | {fmt.format(b)} | {ratio} |")
    if "floor" in s:
        # The same five messages per node as delta with no xDS work: what gRPC alone costs, and so
        # the most SotW / delta could reach on this server.
        a, b = s["sotw"]["cluster"]["cpu_us_per_node"], s["floor"]["cluster"]["cpu_us_per_node"]
        rows.append(
            f"| one cluster added | gRPC alone: delta's 5 messages, no xDS work: server CPU per node (µs) "
            f"| - | {b:,.1f} | {a / b:,.1f} x |"
        )
        b = s["floor"]["cluster"]["grpc_threads_us_per_node"]
        rows.append(f"| one cluster added | gRPC alone: of which in gRPC core's threads (µs) | - | {b:,.1f} | - |")
    a, b = runs["sotw"]["kb_per_stream"], runs["delta"]["kb_per_stream"]
    rows.append(f"| (connected) | server memory per stream (kB RSS) | {a:,.1f} | {b:,.1f} | {a / b:,.2f} x |")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="State of the world against delta xDS (see the module docstring).")
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--pushes", type=int, default=3, help="measured health changes per protocol")
    parser.add_argument("--adds", type=int, default=3, help="measured cluster additions per protocol")
    parser.add_argument("--workers", type=int, default=2, help="client processes")
    parser.add_argument("--batch", type=int, default=100, help="nodes each client process connects at a time")
    parser.add_argument("--pause", type=float, default=0.5, help="seconds between changes")
    parser.add_argument("--json", type=Path, help="write every measurement here")
    parser.add_argument(
        "--protocols",
        nargs="+",
        choices=RUNS,
        default=list(RUNS),
        help="floor: delta's gRPC messages alone, no xDS work (the lower bound of delta's CPU)",
    )
    parser.add_argument("--profile", type=Path, help="record the server's stacks with py-spy into this folder")
    args = parser.parse_args(argv)

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def on_sigterm(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    raise_fd_limit()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, on_sigterm)
    ctx = mp.get_context("spawn")
    children: list[Child] = []
    runs: dict[str, dict[str, Any]] = {}
    began = time.monotonic()
    try:
        for protocol in args.protocols:
            sizes = [220, 215]  # delta's CDS and EDS responses for one cluster added, about
            if (delta := runs.get("delta")) is not None:
                r = delta["cluster"][len(delta["cluster"]) // 2]
                sizes = [round(r["bytes"] / r["responses"])] * 2
            runs[protocol] = run_protocol(ctx, children, protocol, args, log, sizes)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        for c in list(children):
            c.close()
    print(
        f"{args.nodes} nodes, {args.clusters} clusters, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, "
        f"{time.monotonic() - began:.0f} s"
    )
    if all(p in runs for p in PROTOCOLS):
        print(table(runs, args.nodes))
    if args.json is not None:
        args.json.write_text(json.dumps({"argv": sys.argv, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
