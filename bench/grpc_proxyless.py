"""Proxyless gRPC beside Envoy: from a verdict until every client stops calling the endpoint.

One control plane (in this process, real sockets) serves cluster `greeter`: two gRPC demo
servers (`python -m lab.grpcdemo`, own processes). Two kinds of clients call them with
`/healthplane.demo.Demo/Who`, each channel naming itself in metadata so the servers know
when each one last called:

- proxyless: P processes (`python -m lab.grpcclient`), each with T channels to `xds:///bench-K`
  (T gRPC services, all on `greeter`). grpcio keeps one xDS client per target, so every channel
  is its own ADS stream and its own node (`grpc-J@bench-K`): P x T independent xDS clients;
- Envoy: E real Envoys, each with its own listener, and M plain gRPC channels through each
  (one more client process).

Each round sets g1 UNHEALTHY with the admin API (t0 = just before the POST), waits until every
node ACKed the new EDS version, lets calls run on, then asks g1 when each channel last called.
Per channel, "stopped" is that last call minus t0 (0 if it was before t0); per node, "ACK" is the
EDS ACK as the server processed it minus t0. Then g1 goes back HEALTHY and every channel must
call it again before the next round. Each channel calls `--rate` times a second, round robin over
two servers, so a channel reaches g1 about every 2/rate s: the "stopped" figures are lower bounds
within that spacing; the ACK figures are exact.

    python bench/grpc_proxyless.py [--processes 25] [--targets 4] [--envoys 4] [--envoy-channels 5]
                                   [--rate 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import grpc

# Registers HttpProtocolOptions, which the cluster's `envoy` fragment names (HTTP/2 to the servers).
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401

from controlplane.app import ControlPlane
from controlplane.snapshots import resources as rs
from controlplane.snapshots.snapshot import version_key
from controlplane.topology.parse import parse_topology
from controlplane.xds.bootstrap import make_bootstrap, make_grpc_bootstrap
from lab.envoyproc import EnvoyProcess, free_port, poll_until, with_parent_death_signal
from lab.grpcclient import ClientProcess
from lab.grpcdemo import LAST_CALLS_METHOD

HTTP2 = {
    "typed_extension_protocol_options": {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary(values: list[float]) -> str:
    if not values:
        return "n/a"
    ms = [v * 1000 for v in values]
    return f"{statistics.median(ms):.0f} / {percentile(ms, 0.99):.0f} / {max(ms):.0f}"


async def last_calls(port: int) -> dict[str, float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        method = channel.unary_unary(LAST_CALLS_METHOD)
        data: bytes = await method(b"", timeout=5)
    out: dict[str, float] = json.loads(data)
    return out


async def start_server(name: str, port: int) -> asyncio.subprocess.Process:
    argv = [sys.executable, "-m", "lab.grpcdemo", "--port", str(port), "--name", name]
    proc = await asyncio.create_subprocess_exec(*with_parent_death_signal(argv), stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    await asyncio.wait_for(proc.stdout.readline(), 30)
    return proc


async def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-grpc-"))
    ports = [free_port(), free_port()]
    servers = [await start_server(f"g{i + 1}", p) for i, p in enumerate(ports)]
    envoy_ports = [free_port() for _ in range(args.envoys)]
    document = {
        "controlplane": {"xds": {"port": 0}, "admin": {"port": 0}, "watch_interval": 0},
        "clusters": [
            {"name": "greeter", "endpoints": [{"address": "127.0.0.1", "port": p} for p in ports], "envoy": HTTP2}
        ],
        "listeners": [
            {
                "name": f"ingress-{i}",
                "address": "127.0.0.1",
                "port": p,
                "routes": [{"cluster": "greeter"}],
                "nodes": [f"bench-envoy-{i}"],
            }
            for i, p in enumerate(envoy_ports)
        ],
        "grpc_services": [{"name": f"bench-{k}", "cluster": "greeter"} for k in range(args.targets)],
    }
    cp = ControlPlane(parse_topology(document))
    await cp.start()
    envoys: list[EnvoyProcess] = []
    clients: list[ClientProcess] = []
    session = aiohttp.ClientSession()
    rounds: list[dict[str, list[float]]] = []
    try:
        for i in range(args.envoys):
            boot = make_bootstrap(
                node_id=f"envoy-{i}", service=f"bench-envoy-{i}", xds_host="127.0.0.1", xds_port=cp.xds_port,
                admin_port=0,
            )  # fmt: skip
            envoy = EnvoyProcess(
                boot, name=f"envoy-{i}", workdir=workdir / f"envoy-{i}", extra_args=("--concurrency", "1")
            )
            envoys.append(envoy)
            await envoy.start()
            await envoy.wait_live()
        for j in range(args.processes):
            path = workdir / f"grpc-{j}.json"
            path.write_text(
                json.dumps(make_grpc_bootstrap(node_id=f"grpc-{j}", xds_host="127.0.0.1", xds_port=cp.xds_port))
            )
            targets = [f"bench-{k}" for k in range(args.targets)]
            clients.append(ClientProcess(path, targets, rate=args.rate, name=f"p{j}", quiet=True))
        if args.envoys:
            targets = [f"127.0.0.1:{p}" for p in envoy_ports]
            clients.append(
                ClientProcess(
                    None, targets, rate=args.rate, channels=args.envoy_channels, name="e", quiet=True, plain=True
                )
            )
        for client in clients:
            await client.start()
        expected = {f"p{j}/bench-{k}/0" for j in range(args.processes) for k in range(args.targets)}
        expected |= {f"e/127.0.0.1:{p}/{c}" for p in envoy_ports for c in range(args.envoy_channels)}
        print(f"{len(expected)} channels ({args.processes * args.targets} proxyless, "
              f"{args.envoys * args.envoy_channels} through {args.envoys} Envoys)", flush=True)  # fmt: skip
        endpoint = f"127.0.0.1:{ports[0]}"
        url = f"http://127.0.0.1:{cp.admin_port}/endpoints/greeter/{endpoint}/override"

        async def all_calling(since: float) -> bool:
            seen = await last_calls(ports[0])
            return all(seen.get(cid, 0) > since for cid in expected)

        def acked(version: str) -> bool:
            streams = cp.nodes.streams()
            return len(streams) == args.processes * args.targets + args.envoys and all(
                (ts := s.types.get(rs.ENDPOINT)) is not None
                and ts.acked_version is not None
                and version_key(ts.acked_version) >= version_key(version)
                for s in streams
            )

        await poll_until(lambda: all_calling(0), timeout=120, interval=0.5, what="every channel calling g1")
        for r in range(args.rounds):
            back = time.time() + 0.5
            async with session.post(url, json={"status": "HEALTHY"}) as resp:
                assert resp.status == 200
            await poll_until(
                lambda since=back: all_calling(since), timeout=60, interval=0.5, what="every channel back on g1"
            )
            await asyncio.sleep(1)
            t0 = time.time()
            async with session.post(url, json={"status": "UNHEALTHY"}) as resp:
                assert resp.status == 200
            version = cp.snapshot.version

            async def all_acked(v: str = version) -> bool:
                return acked(v)

            await poll_until(all_acked, timeout=60, interval=0.05, what="every node ACKing the verdict")
            acks = {s.node_key: (s.types[rs.ENDPOINT].acked_at or t0) - t0 for s in cp.nodes.streams()}
            await asyncio.sleep(max(2.0, 4.0 / args.rate))
            seen = await last_calls(ports[0])
            stopped = {cid: max(0.0, seen.get(cid, 0.0) - t0) for cid in expected}
            rounds.append(
                {
                    "proxyless_stopped": [v for c, v in stopped.items() if c.startswith("p")],
                    "envoy_stopped": [v for c, v in stopped.items() if c.startswith("e")],
                    "proxyless_ack": [v for n, v in acks.items() if n.startswith("grpc-")],
                    "envoy_ack": [v for n, v in acks.items() if n.startswith("envoy-")],
                }
            )
            print(f"round {r + 1}: " + ", ".join(f"{k} {summary(v)}" for k, v in rounds[-1].items()), flush=True)
    finally:
        for client in clients:
            await client.stop()
        for envoy in envoys:
            await envoy.stop()
        await session.close()
        await cp.aclose()
        for proc in servers:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            await proc.wait()
    pooled = {k: [v for rnd in rounds for v in rnd[k]] for k in rounds[0]} if rounds else {}
    return {"args": vars(args), "rounds": rounds, "pooled": pooled}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=25, help="proxyless client processes")
    parser.add_argument("--targets", type=int, default=4, help="xds:/// targets (channels, ADS streams) per process")
    parser.add_argument("--envoys", type=int, default=4)
    parser.add_argument("--envoy-channels", type=int, default=5, help="plain gRPC channels through each Envoy")
    parser.add_argument("--rate", type=float, default=10.0, help="calls per second per channel")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    pooled = result["pooled"]
    print()
    print("| clients | verdict -> ACK, ms (p50 / p99 / last) | verdict -> last call at g1, ms (p50 / p99 / last) |")
    print("| --- | --- | --- |")
    print(
        f"| {args.processes * args.targets} proxyless channels ({args.processes} processes x {args.targets} targets) "
        f"| {summary(pooled['proxyless_ack'])} | {summary(pooled['proxyless_stopped'])} |"
    )
    if args.envoys:
        print(
            f"| {args.envoys * args.envoy_channels} channels through {args.envoys} Envoys "
            f"| {summary(pooled['envoy_ack'])} | {summary(pooled['envoy_stopped'])} |"
        )
    if args.json:
        args.json.write_text(json.dumps(result, default=str, indent=1))


if __name__ == "__main__":
    main()
