"""Passive health from the Envoys' access logs (issue 15): ingest cost, and failure to fleet-wide exclusion.

ingest: a real Envoy sends its access log for `--record` requests to a control plane that keeps
the raw StreamAccessLogsMessages. Those messages are then replayed by another process over
`--streams` streams (one node id each) for `--seconds`, while an ADS client in a third process
watches EDS pushes of an override toggled every 50 ms; the same window is run first with no
replay. Reported: entries counted per second, the control plane's CPU use (1.0 = one core), and
EDS push latency (toggle to the client's receipt) with ingest off and on.

exclusion: two front Envoys, two clusters of three backends with the same active check (the
example's: /livez every 1 s, 2 failures); cluster `pas` has passive checks too. Traffic at
`--rate` requests/s per cluster through both Envoys. In each round one backend of each cluster
starts answering 500 everywhere (its health path too) at the same moment; from the first request
it failed to the last request that reached it, on either Envoy, is its exclusion time.

    python bench/passive.py [--record 3000] [--streams 32] [--seconds 5] [--replay-rate 50000]
                            [--per-message N] [--rate 200] [--rounds 3] [--flush-ms 10] [--only ingest|exclusion]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import yaml
from aiohttp import web
from envoy.config.core.v3 import base_pb2
from envoy.service.accesslog.v3 import als_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

sys.path.insert(0, str(Path(__file__).parent))
from procs import child_setup

from controlplane.app import ControlPlane
from controlplane.health.store import HealthStatus
from controlplane.probers.accesslog import SERVICE, AccessLogService
from controlplane.snapshots import resources as rs
from controlplane.topology.parse import load_topology
from controlplane.xds.bootstrap import make_bootstrap
from lab.envoyproc import EnvoyProcess, free_port
from prober.embedded import attach_embedded_prober


class Backend:
    """Answers every path with 200, or 500 once failing; notes when it failed a request (not a check)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.failing = False
        self.failed: list[float] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _any(self, request: web.Request) -> web.Response:
        if self.failing:
            if request.path != "/livez":  # the prober's checks are not traffic
                self.failed.append(time.time())
            return web.Response(text=f"ServerName: {self.name}\n", status=500)
        return web.Response(text=f"ServerName: {self.name}\n")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._any)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


class Recorder(AccessLogService):
    """The access-log service, keeping each raw message it is sent."""

    recorded: list[bytes]

    async def StreamAccessLogs(self, requests: AsyncIterator[bytes], context: Any) -> als_pb2.StreamAccessLogsResponse:
        async def tap() -> AsyncIterator[bytes]:
            async for raw in requests:
                self.recorded.append(raw)
                yield raw

        return await super().StreamAccessLogs(tap(), context)


async def start_cp(tmp: Path, document: dict[str, Any], *, prober: bool = False, record: bool = False) -> ControlPlane:
    path = tmp / "topology.yaml"
    path.write_text(yaml.safe_dump(document))
    cp = ControlPlane(load_topology(path))
    if record:
        recorder = Recorder(cp, cp.events, lambda: cp.topology)
        recorder.recorded = []
        cp.access_log = recorder
    if prober:
        attach_embedded_prober(cp)
    await cp.start()
    return cp


async def start_envoy(cp: ControlPlane, node: str) -> EnvoyProcess:
    bootstrap = make_bootstrap(node_id=node, service=node, xds_host="127.0.0.1", xds_port=cp.xds_port, admin_port=0)
    envoy = EnvoyProcess(bootstrap, name=node)
    await envoy.start()
    await envoy.wait_live()
    return envoy


def controlplane_section() -> dict[str, Any]:
    return {"xds": {"port": 0}, "admin": {"port": 0}, "watch_interval": 0, "stuck_stream_timeout": 0}


# --------------------------------------------------------------------------- ingest


async def record(tmp: Path, requests: int) -> tuple[dict[str, Any], list[bytes]]:
    backends = [Backend(f"b{i}") for i in range(3)]
    for b in backends:
        await b.start()
    port = free_port()
    document = {
        "controlplane": controlplane_section(),
        "clusters": [
            {
                "name": "web",
                "endpoints": [{"address": "127.0.0.1", "port": b.port} for b in backends],
                "passive": {"unhealthy": {"http_failures": 5}},
            },
            {"name": "probe", "endpoints": [{"address": "127.0.0.1", "port": 9}]},
        ],
        "listeners": [{"name": "ingress", "address": "127.0.0.1", "port": port, "routes": [{"cluster": "web"}]}],
    }
    cp = await start_cp(tmp, document, record=True)
    envoy = await start_envoy(cp, "recorder")
    try:
        async with aiohttp.ClientSession() as session:
            left = iter(range(requests))

            async def worker() -> None:
                for _ in left:
                    async with session.get(f"http://127.0.0.1:{port}/") as r:
                        await r.read()

            await asyncio.gather(*(worker() for _ in range(32)))
        await asyncio.sleep(0.5)  # the last flush
    finally:
        await envoy.stop()
        await cp.aclose()
        for b in backends:
            await b.stop()
    assert isinstance(cp.access_log, Recorder)
    return document, cp.access_log.recorded


def replay_main(conn: Connection, port: int, messages: list[bytes], streams: int, seconds: float, rate: float) -> None:
    child_setup()
    conn.send(asyncio.run(_replay(port, messages, streams, seconds, rate)))


async def _replay(port: int, messages: list[bytes], streams: int, seconds: float, rate: float) -> int:
    """Send the recorded messages over `streams` streams for `seconds`: `rate` entries/s in all (0: at once)."""
    first = als_pb2.StreamAccessLogsMessage.FromString(messages[0])
    rest = [als_pb2.StreamAccessLogsMessage.FromString(m) for m in messages]
    for m in rest:
        m.ClearField("identifier")
    body = [m.SerializeToString() for m in rest]
    per_message = [len(m.http_logs.log_entry) for m in rest]
    sent = 0
    deadline = time.monotonic() + seconds

    async def stream(i: int) -> None:
        nonlocal sent
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.stream_unary(f"/{SERVICE}/StreamAccessLogs")

            async def requests() -> AsyncIterator[bytes]:
                nonlocal sent
                hello = als_pb2.StreamAccessLogsMessage()
                hello.CopyFrom(first)
                hello.identifier.node.id = f"replay-{i}"
                yield hello.SerializeToString()
                sent += per_message[0]
                start, mine = time.monotonic(), 0
                while time.monotonic() < deadline:
                    for raw, n in zip(body, per_message, strict=True):
                        yield raw
                        sent += n
                        mine += n
                        if rate:
                            await asyncio.sleep(max(0.0, start + mine * streams / rate - time.monotonic()))
                    await asyncio.sleep(0)

            await call(requests())

    await asyncio.gather(*(stream(i) for i in range(streams)))
    return sent


def ads_main(conn: Connection, port: int, seconds: float) -> None:
    child_setup()
    conn.send(asyncio.run(_ads(port, seconds)))


async def _ads(port: int, seconds: float) -> list[tuple[str, float]]:
    """EDS responses for cluster `probe`: (version, time received), each ACKed."""
    received: list[tuple[str, float]] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
        node = base_pb2.Node(id="push-probe", cluster="push-probe")
        await call.write(discovery_pb2.DiscoveryRequest(node=node, type_url=rs.ENDPOINT, resource_names=["probe"]))
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                response = await asyncio.wait_for(call.read(), max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                break
            received.append((response.version_info, time.time()))
            ack = discovery_pb2.DiscoveryRequest(
                type_url=rs.ENDPOINT,
                resource_names=["probe"],
                version_info=response.version_info,
                response_nonce=response.nonce,
            )
            await call.write(ack)
        call.cancel()
    return received


async def push_window(
    cp: ControlPlane, seconds: float, replay: tuple[list[bytes], int, float] | None
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    ads_parent, ads_child = ctx.Pipe()
    ads = ctx.Process(target=ads_main, args=(ads_child, cp.xds_port, seconds + 1.5))
    ads.start()
    await asyncio.sleep(1.0)  # the ADS client connected and holds the current version
    replayer = None
    if replay is not None:
        rp_parent, rp_child = ctx.Pipe()
        replayer = ctx.Process(
            target=replay_main, args=(rp_child, cp.xds_port, replay[0], replay[1], seconds + 0.5, replay[2])
        )
        replayer.start()
        await asyncio.sleep(0.3)  # the streams are open
    counted0 = cp.access_log.entries["counted"]
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.time()
    toggles: dict[str, float] = {}
    status = HealthStatus.UNHEALTHY
    while time.time() - t0 < seconds:
        snapshot = cp.set_override("probe", "127.0.0.1:9", status, who="bench")
        if snapshot is not None:
            toggles[snapshot.version] = time.time()
        status = HealthStatus.HEALTHY if status is HealthStatus.UNHEALTHY else HealthStatus.UNHEALTHY
        await asyncio.sleep(0.05)
    wall = time.time() - t0
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    counted = cp.access_log.entries["counted"] - counted0
    received = await asyncio.to_thread(ads_parent.recv)
    ads.join()
    if replayer is not None:
        await asyncio.to_thread(rp_parent.recv)
        replayer.join()
    latencies = sorted((t - toggles[v]) * 1000 for v, t in received if v in toggles)
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    return {
        "ingest": "off" if replay is None else (f"{replay[2]:g}/s offered" if replay[2] else "as fast as sent"),
        "entries_per_s": round(counted / wall),
        "cpu_cores": round(cpu / wall, 2),
        "pushes": len(latencies),
        "push_p50_ms": round(statistics.median(latencies), 2) if latencies else None,
        "push_p99_ms": round(latencies[int(0.99 * (len(latencies) - 1))], 2) if latencies else None,
    }


def rebatch(messages: list[bytes], per_message: int) -> list[bytes]:
    """The recorded entries in messages of `per_message` (a quiet Envoy flushes few entries at a time)."""
    parsed = [als_pb2.StreamAccessLogsMessage.FromString(m) for m in messages]
    entries = [e for m in parsed for e in m.http_logs.log_entry]
    out: list[bytes] = []
    for i in range(0, len(entries), per_message):
        m = als_pb2.StreamAccessLogsMessage()
        if i == 0:
            m.identifier.CopyFrom(parsed[0].identifier)
        m.http_logs.log_entry.extend(entries[i : i + per_message])
        out.append(m.SerializeToString())
    return out


async def ingest(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    document, messages = await record(tmp, args.record)
    if args.per_message:
        messages = rebatch(messages, args.per_message)
    entries = sum(len(als_pb2.StreamAccessLogsMessage.FromString(m).http_logs.log_entry) for m in messages)
    print(f"recorded {len(messages)} messages, {entries} entries ({entries / len(messages):.1f} per message)")
    cp = await start_cp(tmp, document)
    try:
        rows = [await push_window(cp, args.seconds, None)]
        for rate in (args.replay_rate, 0.0):
            rows.append(await push_window(cp, args.seconds, (messages, args.streams, rate)))
    finally:
        await cp.aclose()
    return rows


# --------------------------------------------------------------------------- exclusion

ACTIVE = {
    "http": {"path": "/livez"},
    "interval": "1s",
    "timeout": "500ms",
    "healthy_threshold": 2,
    "unhealthy_threshold": 2,
}


def traffic_main(conn: Connection, ports: list[int], rate: float, seconds: float) -> None:
    child_setup()
    conn.send(asyncio.run(_traffic(ports, rate, seconds)))


async def _traffic(ports: list[int], rate: float, seconds: float) -> dict[str, int]:
    """`rate` requests/s to each of /pas and /act, alternating over the Envoys' ports."""
    counts: dict[str, int] = {}
    tasks: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:

        async def one(url: str) -> None:
            try:
                async with session.get(url) as r:
                    await r.read()
                    key = str(r.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                key = type(exc).__name__
            counts[key] = counts.get(key, 0) + 1

        start = time.monotonic()
        n = 0
        while time.monotonic() - start < seconds:
            port = ports[n % len(ports)]
            for path in ("pas", "act"):
                task = asyncio.create_task(one(f"http://127.0.0.1:{port}/{path}"))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            n += 1
            await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
        await asyncio.gather(*tasks)
    return counts


async def exclusion(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    pas = [Backend(f"pas{i}") for i in range(3)]
    act = [Backend(f"act{i}") for i in range(3)]
    for b in (*pas, *act):
        await b.start()
    ports = [free_port(), free_port()]

    def cluster(name: str, backends: list[Backend], passive: bool) -> dict[str, Any]:
        c: dict[str, Any] = {
            "name": name,
            "endpoints": [{"address": "127.0.0.1", "port": b.port} for b in backends],
            "health_check": ACTIVE,
        }
        if passive:
            c["passive"] = {"unhealthy": {"http_statuses": [500], "http_failures": 3}, "eject_for": "5s"}
        return c

    document = {
        "controlplane": controlplane_section(),
        "clusters": [cluster("pas", pas, True), cluster("act", act, False)],
        "listeners": [
            {
                "name": f"front-{i}",
                "address": "127.0.0.1",
                "port": port,
                "nodes": [f"front-{i}"],
                "routes": [{"prefix": "/pas", "cluster": "pas"}, {"prefix": "/act", "cluster": "act"}],
            }
            for i, port in enumerate(ports, 1)
        ],
    }
    cp = await start_cp(tmp, document, prober=True)
    envoys = [await start_envoy(cp, f"front-{i}") for i in (1, 2)]
    rows: list[dict[str, Any]] = []

    async def all_healthy() -> None:
        for _ in range(300):
            if all(e.status is HealthStatus.HEALTHY for e in cp.snapshot.endpoints):
                return
            await asyncio.sleep(0.05)
        raise TimeoutError("endpoints not HEALTHY after 15 s")

    try:
        for round_ in range(1, args.rounds + 1):
            await all_healthy()
            await asyncio.sleep(0.5)
            ctx = multiprocessing.get_context("spawn")
            parent, child = ctx.Pipe()
            traffic = ctx.Process(target=traffic_main, args=(child, ports, args.rate, 5.0))
            traffic.start()
            await asyncio.sleep(1.5)  # steady traffic
            bad_pas, bad_act = pas[round_ % 3], act[round_ % 3]
            for b in (bad_pas, bad_act):
                b.failed.clear()
                b.failing = True
            counts = await asyncio.to_thread(parent.recv)
            traffic.join()
            for b in (bad_pas, bad_act):
                b.failing = False
            for name, b in (("passive", bad_pas), ("active only", bad_act)):
                span = (b.failed[-1] - b.failed[0]) * 1000 if b.failed else None
                rows.append(
                    {
                        "round": round_,
                        "cluster": name,
                        "failed_requests": len(b.failed),
                        "exclusion_ms": None if span is None else round(span, 1),
                        "traffic": counts,
                    }
                )
    finally:
        for envoy in envoys:
            await envoy.stop()
        await cp.aclose()
        for b in (*pas, *act):
            await b.stop()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", type=int, default=3000, help="requests through Envoy to record")
    parser.add_argument("--streams", type=int, default=32, help="access-log streams replaying them")
    parser.add_argument("--seconds", type=float, default=5.0, help="each push-latency window")
    parser.add_argument("--replay-rate", type=float, default=50_000, help="entries/s offered (then: unpaced)")
    parser.add_argument("--rate", type=float, default=200.0, help="requests/s per cluster (exclusion)")
    parser.add_argument("--rounds", type=int, default=3, help="failure rounds (exclusion)")
    parser.add_argument("--per-message", type=int, default=0, help="re-batch the recorded entries (0: as recorded)")
    parser.add_argument(
        "--flush-ms", type=float, default=None, help="the listeners' buffer_flush_interval (default: as shipped)"
    )
    parser.add_argument("--only", choices=["ingest", "exclusion"], help="run one part")
    args = parser.parse_args(argv)
    if args.flush_ms is not None:
        rs.ACCESS_LOG_FLUSH_INTERVAL = args.flush_ms / 1000

    async def run() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            if args.only in (None, "ingest"):
                print("## ingest (EDS push latency with the replay off, then on)")
                print("| ingest | entries/s | CPU cores | pushes | push p50 ms | push p99 ms |")
                print("|---|---|---|---|---|---|")
                for r in await ingest(args, Path(tmp)):
                    print(
                        f"| {r['ingest']} | {r['entries_per_s']} | {r['cpu_cores']} | {r['pushes']} "
                        f"| {r['push_p50_ms']} | {r['push_p99_ms']} |"
                    )
            if args.only in (None, "exclusion"):
                flush = rs.ACCESS_LOG_FLUSH_INTERVAL * 1000
                print(f"## failure to fleet-wide exclusion at {args.rate:g} requests/s per cluster, flush {flush:g} ms")
                print("| round | checks | failed requests | first failure to last request ms |")
                print("|---|---|---|---|")
                rows = await exclusion(args, Path(tmp))
                for r in rows:
                    print(f"| {r['round']} | {r['cluster']} | {r['failed_requests']} | {r['exclusion_ms']} |")
                for name in ("passive", "active only"):
                    spans = [r["exclusion_ms"] for r in rows if r["cluster"] == name and r["exclusion_ms"] is not None]
                    if spans:
                        print(f"median {name}: {statistics.median(spans):.1f} ms")
                print("traffic outcomes:", json.dumps([r["traffic"] for r in rows[::2]]))

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
