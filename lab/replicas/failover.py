"""Simulated ADS nodes over several replicas: each holds one stream, and moves to the next replica when it drops.

    fleet = FailoverFleet(["127.0.0.1:18000", "127.0.0.1:18001", "127.0.0.1:18002"], 3000)
    await fleet.start()          # node i starts on replica i % 3
    ...                          # a replica dies: its nodes re-open their stream on the next one

Each node is a `lab.fleet.SimNode` (CDS, EDS, LDS, RDS as Envoy subscribes, ACKing every
response). When its stream ends it does what an Envoy with every replica in its `healthplane_xds`
cluster does (`healthplane bootstrap --xds A --xds B ...`): waits a jittered backoff (uniform in
[0, cap), the cap starting at 250 ms and doubling up to 5 s on each failed try, Envoy's
JitteredExponentialBackOffStrategy with the bootstrap's `retry_back_off`) and opens a new stream
to another replica of its list, picked at random (Envoy's round robin starts at a random host, so
across a fleet the nodes of a dead replica spread evenly over the others). The node's ACKed
versions are kept across streams, as Envoy keeps its config.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc

from controlplane.errors import ConfigError
from lab.fleet import CHANNEL_OPTIONS, Received, SimNode

__all__ = ["BACKOFF_BASE", "BACKOFF_MAX", "FailoverFleet", "FailoverNode"]

BACKOFF_BASE = 0.25  # controlplane.xds.bootstrap.ADS_RETRY_BACK_OFF
BACKOFF_MAX = 5.0


@dataclass
class FailoverNode:
    """One simulated node and the replica it is on; `run()` holds a stream until cancelled."""

    sim: SimNode
    targets: Sequence[str]
    target: int  # index into targets of the replica the node is (or was last) on
    rng: random.Random = field(default_factory=random.Random)
    ended_streams: int = 0  # streams that ended after a first response (moves away from a replica)
    failed_tries: int = 0  # streams that ended before it (a dead replica picked)
    lost_at: float | None = None  # time.time() when the last stream ended

    async def run(self) -> None:
        cap = BACKOFF_BASE
        while True:
            channel = grpc.aio.insecure_channel(self.targets[self.target], options=CHANNEL_OPTIONS)
            before = len(self.sim.history)
            self.sim.error = None
            try:
                await self.sim.run(ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel))
            finally:
                await channel.close(grace=None)
            self.lost_at = time.time()
            if len(self.sim.history) > before:
                self.ended_streams += 1
                cap = BACKOFF_BASE
            else:
                self.failed_tries += 1
            await asyncio.sleep(self.rng.uniform(0, cap))
            cap = min(cap * 2, BACKOFF_MAX)
            if len(self.targets) > 1:  # another replica, at random: Envoy's round robin starts at a random host
                self.target = (self.target + 1 + self.rng.randrange(len(self.targets) - 1)) % len(self.targets)

    def current_since(self, versions: dict[str, str], since: float) -> float | None:
        """When the node, after `since`, had ACKed every type at `versions` (type URL -> version); else None."""
        done: dict[str, float] = {}
        for received in self.sim.history:
            if (
                received.answered_at >= since
                and not received.nacked
                and versions.get(received.type_url) == received.version
            ):
                done.setdefault(received.type_url, received.answered_at)
        if done.keys() < versions.keys():
            return None
        return max(done.values())


class FailoverFleet:
    """`nodes` FailoverNodes over `targets`, node i starting on target i % len(targets)."""

    def __init__(
        self,
        targets: Sequence[str],
        nodes: int,
        *,
        prefix: str = "sim",
        first: int = 0,
        seed: int | None = None,
        on_answer: Callable[[SimNode, Received], None] | None = None,
    ) -> None:
        if not targets:
            raise ConfigError("at least one replica is needed", path="targets")
        if nodes < 1:
            raise ConfigError("must be at least 1", path="nodes")
        rng = random.Random(seed)
        self.targets = list(targets)
        self.nodes = [
            FailoverNode(
                SimNode(node_id=f"{prefix}-{i}", rng=random.Random(rng.random()), on_answer=on_answer),
                self.targets,
                i % len(self.targets),
                random.Random(rng.random()),
            )
            for i in range(first, first + nodes)
        ]
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, *, limit: float = 120.0, batch: int = 200) -> None:
        """Open every node's first stream, `batch` at a time, each batch once the last one has CDS and LDS."""
        for start in range(0, len(self.nodes), batch):
            chunk = self.nodes[start : start + batch]
            self._tasks += [asyncio.create_task(n.run(), name=f"failover-{n.sim.node_id}") for n in chunk]
            async with asyncio.timeout(limit):
                await asyncio.gather(*(n.sim.ready.wait() for n in chunk))
        failed = [n for n in self.nodes if n.sim.error]
        if failed:
            raise ConnectionError(f"{len(failed)} of {len(self.nodes)} nodes failed, e.g. {failed[0].sim.error}")

    async def aclose(self) -> None:
        """Cancel every node; safe to call twice."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
