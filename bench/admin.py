"""Admin API and CSDS cost at fleet sizes: how long an operator waits, and what the event loop pays.

A real ControlPlane (xDS and admin on ephemeral loopback ports) serves N endpoints (clusters of
100, one in ten UNHEALTHY, a prober-like check record for each). Over real HTTP it times each read
`--repeat` times and reports the median and the largest wall time and the response size:
`/endpoints`, `/status` in HTML, CSV and JSON, `/snapshot`, `/metrics`, and a diff of two versions.
The event loop is blocked for the whole of each request (the views are synchronous), so these are
also the stalls the ADS streams see while an operator looks.

CSDS: M streams built by feeding StreamState the requests Envoy sends (CDS and EDS wildcard, both
ACKed) are registered with the control plane, and `FetchClientStatus` for all nodes is timed over
a real gRPC channel, with and without resource contents.

    python bench/admin.py --endpoints 1000 10000 --nodes 100 1000 [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import aiohttp
import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.status.v3 import csds_pb2, csds_pb2_grpc

from controlplane.app import ControlPlane
from controlplane.health.checks import CheckInfo
from controlplane.health.store import HealthStatus, Verdict
from controlplane.snapshots import resources as rs
from controlplane.topology.parse import parse_topology
from controlplane.xds.stream import StreamState


def topology(n: int) -> dict[str, Any]:
    clusters = []
    for c in range((n + 99) // 100):
        eps = [{"address": f"10.{c // 250}.{c % 250}.{i}", "port": 8080} for i in range(min(100, n - c * 100))]
        clusters.append({"name": f"c{c}", "endpoints": eps})
    return {"controlplane": {"xds": {"port": 0}, "admin": {"port": 0}, "watch_interval": 0}, "clusters": clusters}


def fill(cp: ControlPlane) -> None:
    verdicts, checks = [], {}
    for i, ep in enumerate(cp.snapshot.endpoints):
        key = f"{ep.address}:{ep.port}"
        bad = i % 10 == 0
        verdicts.append(
            Verdict(
                ep.cluster, key, HealthStatus.UNHEALTHY if bad else HealthStatus.HEALTHY, "http 506" if bad else "ok"
            )
        )
        checks[(ep.cluster, key)] = CheckInfo(
            "http", 2, 3, 0 if bad else 2, 3 if bad else 0, 0, 0, 10, "http_failure" if bad else "success",
            "http 506" if bad else "ok", time.time(), 0.0012, "prober:bench",
        )  # fmt: skip
    cp.submit_verdicts(verdicts)
    cp.prober_link.checks.update(checks)


def add_nodes(cp: ControlPlane, m: int) -> None:
    snap = cp.snapshot
    for i in range(m):
        stream = StreamState(i + 1, peer=f"ipv4:127.0.0.1:{30000 + i}")
        node = base_pb2.Node(id=f"node-{i}", cluster="sidecar")
        stream.on_request(discovery_pb2.DiscoveryRequest(type_url=rs.CLUSTER, node=node))
        stream.on_request(
            discovery_pb2.DiscoveryRequest(type_url=rs.ENDPOINT, resource_names=list(snap.resources[rs.ENDPOINT]))
        )
        for _ in range(2):  # the second round answers the EDS resend after CDS
            for r in stream.due(snap):
                stream.on_request(
                    discovery_pb2.DiscoveryRequest(
                        type_url=r.type_url, version_info=r.version, response_nonce=r.nonce,
                        resource_names=[] if r.type_url == rs.CLUSTER else list(snap.resources[rs.ENDPOINT]),
                    )
                )  # fmt: skip
        cp.nodes.on_stream_open(stream)


async def timed(fetch: Any, repeat: int) -> tuple[float, float, int]:
    times, size = [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        size = await fetch()
        times.append(time.perf_counter() - start)
    return statistics.median(times), max(times), size


def report(n: int, what: str, median: float, worst: float, size: int) -> None:
    times = f"median {median * 1000:8.1f} ms  max {worst * 1000:8.1f} ms"
    print(f"{n:>6} endpoints  {what:<36} {times}  {size / 1024:8.0f} KiB", flush=True)


async def run(n: int, nodes: list[int], repeat: int) -> None:
    cp = ControlPlane(parse_topology(topology(n)))
    await cp.start()
    try:
        first = cp.snapshot.version
        fill(cp)
        base = f"http://127.0.0.1:{cp.admin_port}"
        async with aiohttp.ClientSession() as session:

            async def get(path: str) -> int:
                async with session.get(base + path) as r:
                    assert r.status == 200, (path, r.status)
                    return len(await r.read())

            for path in (
                "/endpoints",
                "/endpoints?status=unhealthy",
                "/status",
                "/status?format=csv",
                "/status?format=json",
                "/snapshot",
                "/metrics",
                f"/snapshots/{first}/diff/{cp.snapshot.version}",  # start -> verdicts
            ):
                med, worst, size = await timed(lambda p=path: get(p), repeat)
                report(n, path, med, worst, size)
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{cp.xds_port}", options=[("grpc.max_receive_message_length", 1 << 30)]
        ) as channel:
            stub = csds_pb2_grpc.ClientStatusDiscoveryServiceStub(channel)
            added = 0
            for m in nodes:
                add_nodes(cp, m - added)
                added = m
                for bare in (False, True):
                    request = csds_pb2.ClientStatusRequest(exclude_resource_contents=bare)

                    async def fetch(req: csds_pb2.ClientStatusRequest = request) -> int:
                        return (await stub.FetchClientStatus(req)).ByteSize()

                    med, worst, size = await timed(fetch, repeat)
                    label = f"CSDS {m} nodes{' (no contents)' if bare else ''}"
                    report(n, label, med, worst, size)
    finally:
        await cp.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoints", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--nodes", type=int, nargs="+", default=[100])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    for n in args.endpoints:
        asyncio.run(run(n, sorted(args.nodes), args.repeat))


if __name__ == "__main__":
    main()
