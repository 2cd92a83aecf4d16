"""Simulated ADS nodes: real grpc.aio streams that subscribe, apply after a modelled time, and ACK.

For experiments and benchmarks beyond the real Envoys one machine can hold. Each `SimNode`
behaves as Envoy does on ADS (state of the world): it subscribes to every Cluster, then to the
ClusterLoadAssignments of the clusters it got, to every Listener, then to the
RouteConfigurations those listeners name; it answers each response after a modelled apply time
with an ACK (or, at `nack_rate`, a NACK keeping its previous version). The node is sent on the
first request only. Each node records, per type and version, when it read the response and
when it answered. With `delta`, a node speaks incremental xDS as Envoy with DELTA_GRPC does:
wildcard CDS and LDS, then subscribes (and unsubscribes) the ClusterLoadAssignments and
RouteConfigurations it needs as clusters and listeners come and go, and lists what it holds
as `initial_resource_versions` when it reconnects.

    healthplane fleet --nodes 1000 --controlplane 127.0.0.1:18000 [--apply 0ms-20ms] [--zones a,b] [--delta]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from controlplane.errors import ConfigError
from controlplane.snapshots import resources as rs
from controlplane.topology.addresses import host_port
from controlplane.topology.durations import parse_duration
from lab.adsclient import AdsClient, AdsStream, DeltaAdsClient, DeltaAdsStream

log = logging.getLogger("healthplane.fleet")

CDS, EDS, LDS, RDS = rs.CLUSTER, rs.ENDPOINT, rs.LISTENER, rs.ROUTE
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    # A private subchannel pool makes each channel its own TCP connection, as separate Envoys have.
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.max_receive_message_length", 64 << 20),
    # Envoy's HTTP/2 codec sends no BDP pings; a gRPC client does by default (bench/fanout.py).
    ("grpc.http2.bdp_probe", 0),
]

ApplyTime = Callable[[random.Random], float]


def parse_apply(text: str) -> ApplyTime:
    """`5ms` (fixed) or `0ms-20ms` (uniform) as a draw function; ConfigError otherwise."""
    try:
        if "-" in text:
            lo_text, hi_text = text.split("-", 1)
            lo, hi = parse_duration(lo_text), parse_duration(hi_text)
            if lo > hi:
                raise ValueError(f"{text!r}: low exceeds high")
            return lambda rng: rng.uniform(lo, hi)
        fixed = parse_duration(text)
    except ValueError as exc:
        raise ConfigError(f"{exc} (use e.g. 5ms or 0ms-20ms)", path="--apply") from None
    return lambda rng: fixed


@dataclass
class Received:
    """One response as a node handled it."""

    type_url: str
    version: str
    read_at: float
    answered_at: float
    nacked: bool


@dataclass
class SimNode:
    """One simulated Envoy on one ADS stream."""

    node_id: str
    node_cluster: str = "fleet"
    zone: str = ""
    apply: ApplyTime = field(default=lambda rng: 0.0)
    nack_rate: float = 0.0
    rng: random.Random = field(default_factory=random.Random)
    history: list[Received] = field(default_factory=list)
    acked: dict[str, str] = field(default_factory=dict)  # type URL -> version ACKed
    error: str | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # set after the first ACK of each type
    on_answer: Callable[[SimNode, Received], None] | None = None
    delta: bool = False
    held: dict[str, dict[str, str]] = field(default_factory=dict)  # delta: type URL -> name -> version
    routes_of: dict[str, set[str]] = field(default_factory=dict)  # delta: listener -> its route names

    def _node(self) -> base_pb2.Node:
        node = base_pb2.Node(id=self.node_id, cluster=self.node_cluster)
        if self.zone:
            node.locality.zone = self.zone
        return node

    async def run(self, stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub) -> None:
        """Hold the stream until the server ends it or the task is cancelled."""
        if self.delta:
            await self._run_delta(stub)
            return
        client = AdsClient(self._node())
        stream = AdsStream(stub, client)
        client.acked = self.acked  # the node's own record, kept across streams
        try:
            await stream.send(client.subscribe(CDS))
            while (response := await stream.read()) is not None:
                read_at = time.time()
                type_url = response.type_url
                pause = self.apply(self.rng)
                if pause > 0:
                    await asyncio.sleep(pause)  # the modelled time Envoy takes to apply the update
                nack = self.nack_rate > 0 and self.rng.random() < self.nack_rate
                await stream.send(client.nack(response, "simulated NACK") if nack else client.ack(response))
                received = Received(type_url, response.version_info, read_at, time.time(), nack)
                self.history.append(received)
                if self.on_answer is not None:
                    self.on_answer(self, received)
                if nack:
                    continue
                # Make-before-break, as Envoy: EDS after CDS, LDS after the first CDS, RDS after LDS.
                if type_url == CDS:
                    clusters = sorted(_names(response, cluster_pb2.Cluster))
                    if clusters != client.names.get(EDS, []) or not client.subscribed(EDS):
                        await stream.send(client.subscribe(EDS, clusters))
                    if not client.subscribed(LDS):
                        await stream.send(client.subscribe(LDS))
                elif type_url == LDS:
                    routes = sorted(_route_names(response))
                    if routes != client.names.get(RDS, []) or not client.subscribed(RDS):
                        await stream.send(client.subscribe(RDS, routes))
                if {CDS, LDS} <= self.acked.keys() and not self.ready.is_set():
                    self.ready.set()
            self.error = "the server ended the stream"
        except grpc.aio.AioRpcError as exc:
            self.error = f"{exc.code().name}: {exc.details()}"
        finally:
            self.ready.set()  # whoever waits for readiness learns of the error at once
            stream.cancel()

    async def _run_delta(self, stub: ads_pb2_grpc.AggregatedDiscoveryServiceStub) -> None:
        client = DeltaAdsClient(self._node(), self.held)
        stream = DeltaAdsStream(stub, client)
        client.acked = self.acked
        try:
            await stream.send(client.subscribe(CDS))
            while (response := await stream.read()) is not None:
                read_at = time.time()
                type_url = response.type_url
                pause = self.apply(self.rng)
                if pause > 0:
                    await asyncio.sleep(pause)
                nack = self.nack_rate > 0 and self.rng.random() < self.nack_rate
                if nack:
                    await stream.send(client.nack(response, "simulated NACK"))
                else:
                    if type_url == LDS:
                        for resource in response.resources:
                            self.routes_of[resource.name] = _listener_routes(resource.resource)
                        for name in response.removed_resources:
                            self.routes_of.pop(name, None)
                    client.apply(response)
                    # As Envoy: the new subscriptions a response brings go out before its ACK.
                    if type_url == CDS:
                        await self._follow(stream, client, EDS, set(self.held.get(CDS, {})))
                        if not client.subscribed(LDS):
                            await stream.send(client.subscribe(LDS))
                    elif type_url == LDS:
                        await self._follow(stream, client, RDS, set().union(*self.routes_of.values()))
                    await stream.send(client.ack(response))
                received = Received(type_url, response.system_version_info, read_at, time.time(), nack)
                self.history.append(received)
                if self.on_answer is not None:
                    self.on_answer(self, received)
                if {CDS, LDS} <= self.acked.keys() and not self.ready.is_set():
                    self.ready.set()
            self.error = "the server ended the stream"
        except grpc.aio.AioRpcError as exc:
            self.error = f"{exc.code().name}: {exc.details()}"
        finally:
            self.ready.set()
            stream.cancel()

    @staticmethod
    async def _follow(stream: DeltaAdsStream, client: DeltaAdsClient, type_url: str, wanted: set[str]) -> None:
        """Subscribe what `wanted` adds to `type_url`'s names and unsubscribe what it drops."""
        have = client.names.get(type_url)
        if have is None:
            if wanted:
                await stream.send(client.subscribe(type_url, sorted(wanted)))
            return
        add, drop = sorted(wanted - have), sorted(have - wanted)
        if add or drop:
            await stream.send(client.subscribe(type_url, add, drop))
        for name in drop:
            client.held.get(type_url, {}).pop(name, None)


def _listener_routes(resource: Any) -> set[str]:
    listener = listener_pb2.Listener()
    resource.Unpack(listener)
    out: set[str] = set()
    for chain in listener.filter_chains:
        for flt in chain.filters:
            if flt.typed_config.Is(hcm_pb2.HttpConnectionManager.DESCRIPTOR):
                manager = hcm_pb2.HttpConnectionManager()
                flt.typed_config.Unpack(manager)
                if manager.HasField("rds"):
                    out.add(manager.rds.route_config_name)
    return out


def _names(response: discovery_pb2.DiscoveryResponse, message_type: Any) -> list[str]:
    out = []
    for resource in response.resources:
        message = message_type()
        resource.Unpack(message)
        out.append(message.name)
    return out


def _route_names(response: discovery_pb2.DiscoveryResponse) -> set[str]:
    return set().union(*(_listener_routes(resource) for resource in response.resources))


class Fleet:
    """N simulated nodes against one control plane; `async with` opens and closes them."""

    def __init__(
        self,
        target: str,
        nodes: int,
        *,
        prefix: str = "sim",
        node_cluster: str = "fleet",
        zones: tuple[str, ...] = (),
        apply: ApplyTime | None = None,
        nack_rate: float = 0.0,
        streams_per_channel: int = 1,
        seed: int | None = None,
        on_answer: Callable[[SimNode, Received], None] | None = None,
        delta: bool = False,
    ) -> None:
        if nodes < 1:
            raise ConfigError("must be at least 1", path="--nodes")
        if not 0 <= nack_rate <= 1:
            raise ConfigError("must be 0..1", path="--nack-rate")
        self.target = target
        self.streams_per_channel = max(1, streams_per_channel)
        rng = random.Random(seed)
        self.nodes = [
            SimNode(
                node_id=f"{prefix}-{i}",
                node_cluster=node_cluster,
                zone=zones[i % len(zones)] if zones else "",
                apply=apply or (lambda r: 0.0),
                nack_rate=nack_rate,
                rng=random.Random(rng.random()),
                on_answer=on_answer,
                delta=delta,
            )
            for i in range(nodes)
        ]
        self._channels: list[grpc.aio.Channel] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, *, limit: float = 60.0, batch: int = 200) -> None:
        """Open every stream, `batch` at a time, each batch once the last one has its first CDS and LDS."""
        stub = None
        for start in range(0, len(self.nodes), batch):
            chunk = self.nodes[start : start + batch]
            for i, node in enumerate(chunk, start):
                if stub is None or i % self.streams_per_channel == 0:
                    channel = grpc.aio.insecure_channel(self.target, options=CHANNEL_OPTIONS)
                    self._channels.append(channel)
                    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
                self._tasks.append(asyncio.create_task(node.run(stub), name=f"fleet-{node.node_id}"))
            async with asyncio.timeout(limit):
                await asyncio.gather(*(n.ready.wait() for n in chunk))
        failed = [n for n in self.nodes if n.error]
        if failed:
            raise ConnectionError(f"{len(failed)} of {len(self.nodes)} nodes failed, e.g. {failed[0].error}")

    def acked(self, type_url: str, version: str) -> int:
        """How many nodes have ACKed `version` of `type_url`."""
        return sum(1 for n in self.nodes if n.acked.get(type_url) == version)

    async def aclose(self) -> None:
        """Cancel every stream and close the channels; safe to call twice."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(c.close(grace=None) for c in self._channels), return_exceptions=True)
        self._tasks, self._channels = [], []

    async def __aenter__(self) -> Fleet:
        try:
            await self.start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# --------------------------------------------------------------------------- CLI


def add_fleet_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nodes", type=int, required=True, help="how many simulated nodes")
    p.add_argument("--controlplane", required=True, help="the control plane's xDS address HOST:PORT")
    p.add_argument("--apply", default="0ms", help="modelled apply time before each ACK: 5ms, or 0ms-20ms (uniform)")
    p.add_argument("--nack-rate", type=float, default=0.0, help="share of responses answered with a NACK (0..1)")
    p.add_argument("--zones", default="", help="comma-separated node.locality.zone values, assigned in turn")
    p.add_argument("--cluster", default="fleet", help="node.cluster of every node")
    p.add_argument("--prefix", default="sim", help="node ids are PREFIX-0, PREFIX-1, ...")
    p.add_argument("--streams-per-channel", type=int, default=1, help="ADS streams sharing one TCP connection")
    p.add_argument("--seed", type=int, help="seed of the apply-time and NACK draws")
    p.add_argument("--delta", action="store_true", help="the nodes speak incremental xDS (DeltaAggregatedResources)")


def fleet_command(args: argparse.Namespace) -> int:
    """Run the fleet until Ctrl-C, printing each new version and how fast the fleet ACKed it."""
    host_port(args.controlplane, "--controlplane")
    seen: dict[str, list[float]] = {}  # version -> answer times (EDS, CDS, LDS, RDS alike)

    def on_answer(node: SimNode, received: Received) -> None:
        seen.setdefault(received.version, []).append(received.answered_at)

    fleet = Fleet(
        args.controlplane,
        args.nodes,
        prefix=args.prefix,
        node_cluster=args.cluster,
        zones=tuple(z for z in args.zones.split(",") if z),
        apply=parse_apply(args.apply),
        nack_rate=args.nack_rate,
        streams_per_channel=args.streams_per_channel,
        seed=args.seed,
        on_answer=on_answer,
        delta=args.delta,
    )

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError):
                loop.add_signal_handler(sig, stop.set)
        began = time.monotonic()
        async with fleet:
            print(
                f"healthplane fleet: {args.nodes} nodes connected to {args.controlplane} "
                f"in {time.monotonic() - began:.1f} s",
                flush=True,
            )
            reported: dict[str, int] = {}
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
                for version, times in sorted(seen.items()):
                    if reported.get(version) != len(times):
                        reported[version] = len(times)
                        spread = (max(times) - min(times)) * 1000
                        print(f"version {version}: {len(times)} answers over {spread:.1f} ms", flush=True)
                errors = [n.error for n in fleet.nodes if n.error]
                if errors:
                    print(f"{len(errors)} nodes lost their stream, e.g. {errors[0]}", flush=True)
                    return 1
        return 0

    return asyncio.run(run())
