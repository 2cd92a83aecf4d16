"""What the xDS workers' relay costs on the verdict path, side by side with one process.

A control plane runs in its own process, with ADS in that process (`--xds-workers 1`) or in N
worker processes (the prober link, CSDS and access logs then reach the main process through a
worker's relay, controlplane/xds/workers/relay.py). A client process plays a remote prober and an
ADS node at once, on the xDS port:

- verdict -> EDS: it sends one verdict over the prober link (flipping one endpoint) and times
  until its own ADS stream reads the ClusterLoadAssignment with the new health_status. Through
  workers this includes the relay (verdict up), the snapshot hand-off (down) and the worker's
  write; in one process, none of those. The control plane batches verdicts for 5 ms
  (`verdict_batch_window`) in both.
- CSDS: the round trip of one FetchClientStatus (unary), relayed or not.

    python bench/relay.py [--xds-workers 1 2] [--rounds 200] [--repeat 3]

Every child process ignores SIGINT, dies with its parent and exits when its pipe closes.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.append(_ROOT)

from bench.procs import Child, child_setup, serve_commands  # noqa: E402

EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
ENDPOINTS = [("127.0.0.1", 18081 + i) for i in range(3)]
TOPOLOGY: dict[str, Any] = {
    "controlplane": {
        "xds": {"address": "127.0.0.1", "port": 0},
        "admin": {"address": "127.0.0.1", "port": 0},
        "watch_interval": 0,
    },
    "clusters": [{"name": "web", "endpoints": [{"address": a, "port": p} for a, p in ENDPOINTS]}],
}


def server_main(conn: Connection, xds_workers: int) -> None:
    child_setup()
    asyncio.run(_server(conn, xds_workers))


async def _server(conn: Connection, xds_workers: int) -> None:
    from controlplane.app import ControlPlane
    from controlplane.topology.parse import parse_topology

    cp = ControlPlane(parse_topology(TOPOLOGY, source="bench"), workers=xds_workers)
    cp.expect_remote_prober = True
    await cp.start()
    conn.send({"xds_port": cp.xds_port})

    async def handle(message: tuple[Any, ...]) -> Any:
        return "stopped" if message[0] == "stop" else None

    try:
        await serve_commands(conn, handle)
    finally:
        await cp.aclose(grace=0)


def client_main(conn: Connection, port: int) -> None:
    child_setup()
    asyncio.run(_client(conn, port))


async def _client(conn: Connection, port: int) -> None:
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.config.endpoint.v3 import endpoint_pb2
    from envoy.service.discovery.v3 import ads_pb2_grpc
    from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc

    from healthplane.v1 import prober_pb2
    from lab.adsclient import AdsClient, AdsStream

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    link = channel.stream_stream(
        "/healthplane.v1.ProberLink/Report",
        request_serializer=prober_pb2.ProberMessage.SerializeToString,
        response_deserializer=prober_pb2.ControlPlaneMessage.FromString,
    )()

    def verdict(port_: int, status: int) -> Any:
        v = prober_pb2.Verdict(cluster="web", endpoint=f"127.0.0.1:{port_}", status=status, reason="bench")
        v.time.GetCurrentTime()
        return v

    await link.write(prober_pb2.ProberMessage(hello=prober_pb2.Hello(prober_id="bench", version="bench")))
    healthy = [verdict(p, prober_pb2.HEALTHY) for _, p in ENDPOINTS]
    full = prober_pb2.VerdictBatch(full_state=True, verdicts=healthy)
    await link.write(prober_pb2.ProberMessage(verdicts=full))
    drain = asyncio.create_task(_drain(link))

    ads = AdsClient(base_pb2.Node(id="bench-node", cluster="bench"))
    stream = AdsStream(ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel), ads)
    await stream.send(ads.subscribe(EDS, ["web"]))
    statuses: asyncio.Queue[tuple[int, float]] = asyncio.Queue()

    async def read() -> None:
        while (response := await stream.read()) is not None:
            at = time.monotonic()
            await stream.send(ads.ack(response))
            cla = endpoint_pb2.ClusterLoadAssignment()
            response.resources[0].Unpack(cla)
            statuses.put_nowait((cla.endpoints[0].lb_endpoints[0].health_status, at))

    reader = asyncio.create_task(read())
    csds = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(channel)

    async def wait_for(status: int, limit: float = 10) -> float:
        async with asyncio.timeout(limit):
            while True:
                got, at = await statuses.get()
                if got == status:
                    return at

    async def measure(rounds: int) -> dict[str, list[float]]:
        await wait_for(1)  # HEALTHY from the full state
        verdict_ms: list[float] = []
        csds_ms: list[float] = []
        status = prober_pb2.UNHEALTHY
        for _ in range(rounds):
            began = time.monotonic()
            batch = prober_pb2.VerdictBatch(verdicts=[verdict(ENDPOINTS[0][1], status)])
            await link.write(prober_pb2.ProberMessage(verdicts=batch))
            # EDS says UNHEALTHY as 2 and HEALTHY as 1, as the prober's enum does.
            verdict_ms.append((await wait_for(status) - began) * 1000)
            status = prober_pb2.HEALTHY if status == prober_pb2.UNHEALTHY else prober_pb2.UNHEALTHY
            began = time.monotonic()
            await csds.FetchClientStatus(csds_pb2.ClientStatusRequest())
            csds_ms.append((time.monotonic() - began) * 1000)
            await asyncio.sleep(0.01)
        return {"verdict_ms": verdict_ms, "csds_ms": csds_ms}

    async def handle(message: tuple[Any, ...]) -> Any:
        command, *args = message
        if command == "measure":
            return await measure(*args)
        return "stopped" if command == "stop" else None

    try:
        await serve_commands(conn, handle)
    finally:
        for task in (drain, reader):
            task.cancel()
        await channel.close()


async def _drain(link: Any) -> None:
    while await link.read() is not None:  # the topology the control plane sends its probers
        pass


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] if ordered else math.nan


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The relay's cost on the verdict path (see the module docstring).")
    parser.add_argument("--xds-workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=200, help="verdicts (and CSDS calls) per run")
    parser.add_argument("--repeat", type=int, default=3, help="runs per worker count, interleaved")
    args = parser.parse_args(argv)
    ctx = mp.get_context("spawn")
    samples: dict[int, dict[str, list[float]]] = {x: {"verdict_ms": [], "csds_ms": []} for x in args.xds_workers}
    for r in range(args.repeat):
        for x in args.xds_workers:
            server = Child(ctx, "relay-server", server_main, x)
            client: Child | None = None
            try:
                port = server.recv(60)["xds_port"]
                client = Child(ctx, "relay-client", client_main, port)
                got = client.ask("measure", args.rounds, limit=60 + args.rounds)
                for key, values in got.items():
                    samples[x][key].extend(values)
                print(
                    f"run {r + 1}/{args.repeat}, {x} xDS worker(s): verdict -> EDS p50 "
                    f"{statistics.median(got['verdict_ms']):.2f} ms, CSDS p50 {statistics.median(got['csds_ms']):.2f} "
                    f"ms, load {os.getloadavg()[0]:.2f}",
                    file=sys.stderr,
                    flush=True,
                )
            finally:
                if client is not None:
                    client.close()
                server.close()
    print("| xDS workers | verdict -> EDS p50 ms | p90 ms | p99 ms | CSDS round trip p50 ms | p99 ms |")
    print("|---:|---:|---:|---:|---:|---:|")
    for x, s in samples.items():
        v, c = s["verdict_ms"], s["csds_ms"]
        cells = [_pct(v, 50), _pct(v, 90), _pct(v, 99), _pct(c, 50), _pct(c, 99)]
        print(f"| {x} | " + " | ".join(f"{cell:.2f}" for cell in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
