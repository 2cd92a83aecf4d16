"""Soak and reconnect storm: N simulated ADS nodes held for minutes with a health change every second.

    python bench/soak.py [--nodes 5000] [--minutes 10] [--interval 1] [--workers 2] [--json soak.json]

The server process and the client processes are bench/fanout.py's (its plumbing is imported):
one `ControlPlane` on ephemeral ports, W worker processes holding N grpc.aio ADS streams that
subscribe to EDS for `web` and ACK every response at once, as Envoy does. Then:

1. Soak: every `--interval` seconds the server flips one endpoint's override (a health change and
   a new EDS version). Per minute it reports the server's RSS (sampled every 5 s), the ACKs
   processed and the push latency of each ACK (verdict of the ACKed version -> the server
   processed the ACK) as p50 / p99 / max. SotW sends one response per type at a time and the
   next is the latest version, so when a push takes longer than the interval, versions in
   between are skipped by design; the report counts them.
2. Lost ACKs: the flips stop, the fleet settles, and every stream must have ACKed the last
   version, with as many ACKs (and NACKs) as responses it was sent.
3. Reconnect storm: every worker closes all its connections and opens them all again at once
   (no batching); the time until all N new streams have ACKed the current version, and the
   streams refused (client errors, and the server's per-peer refusals) which must be 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import signal
import statistics
import sys
import time
from collections import defaultdict
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/fanout.py, as a sibling module
from fanout import CLUSTER, EDS, FLIPPED, TOPOLOGY, _percentile

from bench.procs import Child, child_setup, dispatch, raise_fd_limit, rss_kb, serve_commands

RSS_SAMPLE_S = 5.0


# --------------------------------------------------------------------------- server process


def server_main(conn: Connection) -> None:
    child_setup()
    asyncio.run(_server(conn))


async def _server(conn: Connection) -> None:
    from controlplane.app import ControlPlane, tune_gc_for_streams
    from controlplane.health.store import HealthStatus
    from controlplane.snapshots.snapshot import Snapshot
    from controlplane.topology.parse import parse_topology
    from controlplane.xds.server import StreamCallbacks
    from controlplane.xds.stream import PendingResponse, RequestKind, RequestOutcome, StreamState

    class Ledger(StreamCallbacks):
        """Counts EDS responses and ACKs per stream, and the latency of each ACK, without holding on to streams."""

        def __init__(self, inner: StreamCallbacks) -> None:
            self.inner = inner
            self.verdict_at: dict[str, float] = {}  # EDS version -> when its verdict was made
            self.sent: dict[int, int] = defaultdict(int)  # stream id -> EDS responses sent
            self.answered: dict[int, int] = defaultdict(int)  # stream id -> EDS ACKs + NACKs
            self.nacks = 0
            self.latencies: list[float] = []  # of the ACKs since the last drain
            self.closed_unbalanced = 0  # streams that closed owing ACKs (outside a storm: lost)

        def on_stream_open(self, stream: StreamState) -> None:
            self.inner.on_stream_open(stream)

        def on_stream_closed(self, stream: StreamState) -> None:
            self.inner.on_stream_closed(stream)
            sent, answered = self.sent.pop(stream.stream_id, 0), self.answered.pop(stream.stream_id, 0)
            if sent != answered:
                self.closed_unbalanced += 1

        def on_response(self, stream: StreamState, response: PendingResponse, snapshot: Snapshot) -> None:
            self.inner.on_response(stream, response, snapshot)
            if response.type_url == EDS:
                self.sent[stream.stream_id] += 1

        def on_request(self, stream: StreamState, outcome: RequestOutcome) -> None:
            self.inner.on_request(stream, outcome)
            if outcome.type_url != EDS or outcome.kind not in (RequestKind.ACK, RequestKind.NACK):
                return
            self.answered[stream.stream_id] += 1
            if outcome.kind is RequestKind.NACK:
                self.nacks += 1
                return
            verdict = self.verdict_at.get(outcome.version)
            if verdict is not None:
                self.latencies.append(time.time() - verdict)

    cp = ControlPlane(parse_topology(TOPOLOGY, source="bench"))
    tune_gc_for_streams()  # as `healthplane serve` does
    ledger = Ledger(cp.ads.callbacks)
    cp.ads.callbacks = ledger
    await cp.start()
    conn.send({"xds_port": cp.xds_port, "pid": os.getpid(), "rss_kb": rss_kb()})
    flips = 0

    def eds_version() -> str:
        return cp.snapshot.type_versions[EDS]

    def flip() -> str:
        nonlocal flips
        status = HealthStatus.UNHEALTHY if flips % 2 == 0 else HealthStatus.HEALTHY
        flips += 1
        verdict = time.time()
        snapshot = cp.set_override(CLUSTER, FLIPPED, status, who="soak")
        if snapshot is None:
            raise RuntimeError(f"setting {FLIPPED} {status.name} published nothing")
        version = snapshot.type_versions[EDS]
        ledger.verdict_at[version] = verdict
        return version

    def on_current(since: float = 0.0) -> int:
        current = eds_version()
        return sum(
            1
            for s in cp.nodes.streams()
            if s.opened >= since and (ts := s.types.get(EDS)) is not None and ts.acked_version == current
        )

    async def settle(expected: int, limit: float, since: float = 0.0) -> dict[str, Any]:
        """Wait until `expected` streams (opened after `since`) ACKed the current EDS version."""
        t0 = time.monotonic()
        while True:
            acked = on_current(since)
            if acked >= expected or time.monotonic() - t0 > limit:
                break
            await asyncio.sleep(0.02)
        return {"acked": acked, "seconds": time.monotonic() - t0, "streams": len(cp.ads.streams), "rss_kb": rss_kb()}

    async def soak(seconds: float, interval: float) -> dict[str, Any]:
        t0 = time.monotonic()
        next_flip, next_sample, minute_end = t0, t0, t0 + 60
        minutes: list[dict[str, Any]] = []
        rss: list[int] = []
        versions = 0
        ledger.latencies.clear()
        while True:
            now = time.monotonic()
            if now >= minute_end or now - t0 >= seconds:
                lat = sorted(ledger.latencies)
                ledger.latencies.clear()
                minutes.append(
                    {
                        "minute": len(minutes) + 1,
                        "versions": versions,
                        "acks": len(lat),
                        "p50_ms": round(_percentile(lat, 50) * 1000, 1) if lat else None,
                        "p99_ms": round(_percentile(lat, 99) * 1000, 1) if lat else None,
                        "max_ms": round(lat[-1] * 1000, 1) if lat else None,
                        "rss_kb_min": min(rss, default=0),
                        "rss_kb_max": max(rss, default=0),
                        "rss_kb_last": rss[-1] if rss else 0,
                        "streams": len(cp.ads.streams),
                    }
                )
                print(f"    soak minute {json.dumps(minutes[-1])}", file=sys.stderr, flush=True)
                versions, rss = 0, []
                minute_end += 60
                if now - t0 >= seconds:
                    break
            if now >= next_sample:
                rss.append(rss_kb())
                next_sample += RSS_SAMPLE_S
            if now >= next_flip:
                flip()
                versions += 1
                next_flip += interval
            await asyncio.sleep(max(0.0, min(next_flip, next_sample, minute_end) - time.monotonic()))
        return {"minutes": minutes, "flips": flips}

    def ledger_check() -> dict[str, Any]:
        """After settling: every open stream ACKed (or NACKed) every EDS response it was sent."""
        owing = {sid: sent - ledger.answered.get(sid, 0) for sid, sent in ledger.sent.items()}
        return {
            "streams": len(cp.ads.streams),
            "responses": sum(ledger.sent.values()),
            "acks_and_nacks": sum(ledger.answered.values()),
            "nacks": ledger.nacks,
            "streams_owing_acks": sum(1 for v in owing.values() if v > 0),
            "closed_owing_acks": ledger.closed_unbalanced,
            "on_current_version": on_current(),
            "refused_by_server": cp.ads.peers.refused,
        }

    def storm_start() -> dict[str, Any]:
        ledger.closed_unbalanced = 0  # the storm closes streams mid-push on purpose
        return {"wall": time.time(), "version": eds_version()}

    commands = {"settle": settle, "soak": soak, "ledger": ledger_check, "storm-start": storm_start}
    try:
        await serve_commands(conn, dispatch(commands))
    finally:
        await cp.aclose(grace=0)


# --------------------------------------------------------------------------- client process


def worker_main(conn: Connection, port: int, first: int, count: int) -> None:
    child_setup()
    asyncio.run(_clients(conn, port, first, count))


async def _clients(conn: Connection, port: int, first: int, count: int) -> None:
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

    # As in fanout.py: one TCP connection per stream, no BDP pings (Envoy's codec sends none).
    options: list[tuple[str, Any]] = [
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.max_receive_message_length", 16 << 20),
        ("grpc.http2.bdp_probe", 0),
    ]
    channels: list[grpc.aio.Channel] = []
    tasks: list[asyncio.Task[None]] = []
    started = 0
    progress = asyncio.Event()
    errors: list[str] = []
    responses = 0

    async def client(index: int, channel: grpc.aio.Channel) -> None:
        nonlocal started, responses
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
        first_response = True
        try:
            await call.write(
                discovery_pb2.DiscoveryRequest(
                    node=base_pb2.Node(id=f"soak-{first + index}", cluster="bench"),
                    type_url=EDS,
                    resource_names=[CLUSTER],
                )
            )
            while (response := await call.read()) is not grpc.aio.EOF:
                await call.write(
                    discovery_pb2.DiscoveryRequest(
                        version_info=response.version_info,
                        response_nonce=response.nonce,
                        type_url=EDS,
                        resource_names=[CLUSTER],
                    )
                )
                responses += 1
                if first_response:
                    first_response = False
                    started += 1
                    progress.set()
            errors.append(f"soak-{first + index}: the server ended the stream")
        except grpc.aio.AioRpcError as exc:
            if exc.code() is not grpc.StatusCode.CANCELLED:
                errors.append(f"soak-{first + index}: {exc.code().name} {exc.details()}")
        except asyncio.CancelledError:
            pass
        finally:
            progress.set()

    async def connect(batch: int, limit: float) -> dict[str, Any]:
        """Open the streams, `batch` at a time (0: all at once), until each got its first response."""
        nonlocal started
        started = 0
        t0 = time.monotonic()
        batch = batch or count
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
        return {"connected": started, "seconds": time.monotonic() - t0, "errors": len(errors), "sample": errors[:5]}

    async def drop() -> None:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(c.close(grace=None) for c in channels), return_exceptions=True)
        tasks.clear()
        channels.clear()

    async def storm(limit: float) -> dict[str, Any]:
        """Every connection closed, then all opened again at once."""
        errors_before = len(errors)
        t0 = time.monotonic()
        await drop()
        dropped = time.monotonic() - t0
        result = await connect(0, limit)
        result["drop_seconds"] = dropped
        result["errors"] = len(errors) - errors_before
        return result

    def stats() -> dict[str, Any]:
        return {"responses": responses, "errors": len(errors), "sample": errors[:5]}

    try:
        await serve_commands(conn, dispatch({"connect": connect, "storm": storm, "stats": stats}))
    finally:
        await drop()


# --------------------------------------------------------------------------- parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=5000)
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the soak")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between health changes")
    parser.add_argument("--workers", type=int, default=2, help="client processes")
    parser.add_argument("--batch", type=int, default=250, help="streams each worker opens at a time at the start")
    parser.add_argument("--no-storm", action="store_true", help="skip the reconnect storm")
    parser.add_argument(
        "--after-storm-minutes",
        type=float,
        default=0.0,
        help="after the storm, soak this long again and report the server's RSS per minute (issue 19)",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
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
    n = args.nodes
    result: dict[str, Any] = {"nodes": n, "minutes": args.minutes, "interval_s": args.interval, "argv": sys.argv}
    try:
        server = Child(ctx, "soak-server", server_main)
        children.append(server)
        ready = server.recv(60)
        port = ready["xds_port"]
        result["rss_kb_before_clients"] = ready["rss_kb"]
        log(f"server pid {ready['pid']}, xDS port {port}, RSS {ready['rss_kb']} kB; load {os.getloadavg()}")
        workers = max(1, min(args.workers, n))
        shares = [n // workers + (1 if w < n % workers else 0) for w in range(workers)]
        first = 0
        clients: list[Child] = []
        for w, share in enumerate(shares):
            clients.append(Child(ctx, f"soak-worker-{w}", worker_main, port, first, share))
            first += share
        children.extend(clients)

        limit = 60 + n * 0.05
        for c in clients:
            c.send("connect", args.batch, limit)
        answers = [c.recv(limit + 30) for c in clients]
        if sum(a["connected"] for a in answers) < n:
            raise RuntimeError(f"only {sum(a['connected'] for a in answers)} of {n} connected: {answers}")
        settled = server.ask("settle", n, limit, 0.0, limit=limit + 30)
        result["connect"] = {"seconds": max(a["seconds"] for a in answers), "rss_kb": settled["rss_kb"]}
        log(f"{n} streams connected in {result['connect']['seconds']:.1f} s, server RSS {settled['rss_kb']} kB")

        seconds = args.minutes * 60
        log(f"soak: {args.minutes} min, a health change every {args.interval} s")
        soak = server.ask("soak", seconds, args.interval, limit=seconds + 120)
        result["soak"] = soak
        settled = server.ask("settle", n, 120, 0.0, limit=150)
        ledger = server.ask("ledger", limit=60)
        stats = [c.ask("stats", limit=30) for c in clients]
        result["after_soak"] = {
            "settle_seconds": settled["seconds"],
            **ledger,
            "client_errors": sum(s["errors"] for s in stats),
            "client_error_sample": [e for s in stats for e in s["sample"]][:5],
        }
        log(f"after the soak: {json.dumps(result['after_soak'])}")

        if not args.no_storm:
            start = server.ask("storm-start", limit=30)
            t0 = time.monotonic()
            for c in clients:
                c.send("storm", limit)
            storm_answers = [c.recv(limit + 30) for c in clients]
            back = server.ask("settle", n, limit, start["wall"], limit=limit + 30)
            total = time.monotonic() - t0
            ledger = server.ask("ledger", limit=60)
            result["storm"] = {
                "nodes_back_on_current_version": back["acked"],
                "seconds_until_all_back": round(total, 2),
                "client_first_response_seconds": round(max(a["seconds"] for a in storm_answers), 2),
                "drop_seconds": round(max(a["drop_seconds"] for a in storm_answers), 2),
                "refused_streams": sum(a["errors"] for a in storm_answers) + ledger["refused_by_server"],
                "error_sample": [e for a in storm_answers for e in a["sample"]][:5],
                "rss_kb": back["rss_kb"],
                "streams": back["streams"],
            }
            log(f"storm: {json.dumps(result['storm'])}")
            if args.after_storm_minutes > 0:
                # Is what the storm allocated given back, and does anything keep growing after it?
                seconds = args.after_storm_minutes * 60
                log(f"after the storm: {args.after_storm_minutes} min more, RSS per minute")
                after = server.ask("soak", seconds, args.interval, limit=seconds + 120)
                by_minute = [round(m["rss_kb_max"] / 1024, 1) for m in after["minutes"] if m["rss_kb_max"]]
                result["after_storm"] = {
                    "rss_mb_at_storm_end": round(back["rss_kb"] / 1024, 1),
                    "rss_mb_max_by_minute": by_minute,
                    "rss_growth_first_to_last_minute_pct": round((by_minute[-1] - by_minute[0]) / by_minute[0] * 100, 1)
                    if len(by_minute) > 1
                    else None,
                }
                log(f"after the storm: {json.dumps(result['after_storm'])}")
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        for c in children:
            c.close()

    minutes = result["soak"]["minutes"]
    rss = [m["rss_kb_max"] for m in minutes if m["rss_kb_max"]]
    result["summary"] = {
        "rss_mb_first_minute_max": round(rss[0] / 1024, 1) if rss else None,
        "rss_mb_last_minute_max": round(rss[-1] / 1024, 1) if rss else None,
        "rss_mb_max_by_minute": [round(r / 1024, 1) for r in rss],
        # The first minute still grows (buffers, allocator arenas); the bound is on what follows.
        "rss_growth_after_minute_2_pct": round((max(rss[1:]) - rss[1]) / rss[1] * 100, 1) if len(rss) > 1 else None,
        "p50_ms_by_minute": [m["p50_ms"] for m in minutes],
        "p99_ms_by_minute": [m["p99_ms"] for m in minutes],
        "p99_ms_median_over_minutes": statistics.median([m["p99_ms"] for m in minutes if m["p99_ms"] is not None])
        if any(m["p99_ms"] is not None for m in minutes)
        else None,
        "versions": sum(m["versions"] for m in minutes),
        "acks_measured": sum(m["acks"] for m in minutes),
        "lost_acks": result["after_soak"]["streams_owing_acks"] + result["after_soak"]["closed_owing_acks"],
    }
    print(json.dumps(result["summary"], indent=1))
    if "storm" in result:
        print(json.dumps(result["storm"], indent=1))
    if "after_storm" in result:
        print(json.dumps(result["after_storm"], indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
