"""Propagation with real Envoys: verdict -> every Envoy's ACK, checked against the traffic each one routes.

Three Envoys, each with its own listener (node.cluster edge-N), route to three demo backends.
While requests flow through every Envoy, b1 is marked UNHEALTHY; the control plane measures each
Envoy's ACK of that version, and the traffic shows when each Envoy stopped sending to b1. Envoy
ACKs an EDS update after applying it (and after posting it to its workers), so no request that
starts after the control plane has the ACK may reach b1.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from controlplane.health.store import HealthStatus, Verdict
from lab.demoapp import DemoApp
from lab.envoyproc import free_port, poll_until
from tests.conftest import Lab

pytestmark = pytest.mark.envoy

_SERVER = re.compile(r"ServerName: ([^,\s]+)")
AFTER_ACK = 20  # requests each Envoy must route after its ACK before the check ends


@dataclass
class Traffic:
    """Requests through one Envoy: (start, end, backend or status) each."""

    port: int
    requests: list[tuple[float, float, str]] = field(default_factory=list)

    async def run(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        url = f"http://127.0.0.1:{self.port}/"
        while not stop.is_set():
            start = time.time()
            try:
                async with session.get(url) as response:
                    body = await response.text()
                    match = _SERVER.search(body)
                    who = match.group(1) if response.status == 200 and match else f"status {response.status}"
            except aiohttp.ClientError as exc:
                who = type(exc).__name__
            self.requests.append((start, time.time(), who))

    def after(self, t: float) -> list[str]:
        return [who for start, _, who in self.requests if start > t]

    def last_reaching(self, backend: str) -> tuple[float, float] | None:
        """(start, end) of the last request `backend` answered."""
        answered = [(start, end) for start, end, who in self.requests if who == backend]
        return max(answered) if answered else None


def topology(backends: list[DemoApp], ports: list[int], **cluster: Any) -> dict[str, Any]:
    """Cluster `web` of the backends (with `cluster`'s other fields); each Envoy `edge-i` its own
    listener on `ports[i-1]`."""
    return {
        "controlplane": {"xds": {"port": 0}, "admin": {"port": 0}, "watch_interval": 0},
        "clusters": [
            {"name": "web", "endpoints": [{"address": "127.0.0.1", "port": b.port} for b in backends], **cluster}
        ],
        "listeners": [
            {
                "name": f"ingress-{i}",
                "address": "127.0.0.1",
                "port": port,
                "nodes": [f"edge-{i}"],
                "routes": [{"prefix": "/", "cluster": "web"}],
            }
            for i, port in enumerate(ports, 1)
        ],
    }


async def test_a_verdict_reaches_every_envoy_and_its_traffic(lab: Lab, backends: list[DemoApp]) -> None:
    ports = [free_port() for _ in range(3)]
    cp = await lab.start_control_plane(topology(backends, ports))
    for i in range(1, 4):
        await lab.start_envoy(node_id=f"edge-{i}", service=f"edge-{i}")

    async def all_backends(port: int) -> bool:
        with contextlib.suppress(aiohttp.ClientError):
            return set(await lab.hits(port, 12)) == {"b1", "b2", "b3"}
        return False

    for port in ports:
        await poll_until(lambda port=port: all_backends(port), timeout=20, what=f"traffic on :{port} to b1-b3")

    traffic = [Traffic(port) for port in ports]
    stop = asyncio.Event()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        tasks = [asyncio.create_task(t.run(session, stop)) for t in traffic]
        try:
            await poll_until(lambda: _settled(traffic), timeout=10, what="traffic flowing through every Envoy")
            b1 = f"127.0.0.1:{backends[0].port}"
            # A prober's verdict, as the embedded prober or a remote one hands it over.
            snapshot = cp.submit_verdicts(
                [Verdict("web", b1, HealthStatus.UNHEALTHY, "http 503", source="prober:test")]
            )
            assert snapshot is not None and snapshot.cause.kind == "verdict"
            record = cp.propagation.get(snapshot.version) if cp.propagation else None
            assert record is not None

            async def converged() -> bool:
                return record.pending == 0

            await poll_until(converged, timeout=20, what="every Envoy to ACK the verdict")
            acks = {d.node: d.acked for d in record.deliveries.values()}
            assert set(acks) == {"edge-1", "edge-2", "edge-3"} and all(acks.values())

            async def enough_after_ack() -> bool:
                return all(len(t.after(acks[f"edge-{i}"] or 0.0)) >= AFTER_ACK for i, t in enumerate(traffic, 1))

            await poll_until(enough_after_ack, timeout=20, what=f"{AFTER_ACK} requests per Envoy after its ACK")
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)

    cause = record.cause_time
    for i, t in enumerate(traffic, 1):
        ack = acks[f"edge-{i}"]
        assert ack is not None
        after = t.after(ack)
        assert "b1" not in after and set(after) <= {"b2", "b3"}, (i, after[:10])
        assert any(who == "b1" for start, _, who in t.requests if start < cause), "b1 served before the verdict"
        last_b1 = t.last_reaching("b1")
        assert last_b1 is not None and last_b1[0] <= ack
        print(
            f"edge-{i}: ACK {1000 * (ack - cause):.1f} ms after the verdict; the last request b1 answered "
            f"started {1000 * (last_b1[0] - cause):.1f} ms and ended {1000 * (last_b1[1] - cause):.1f} ms after it; "
            f"{len(after)} requests started after the ACK, none to b1"
        )
    assert record.convergence is not None and record.convergence == max(a or 0.0 for a in acks.values()) - cause


async def _settled(traffic: list[Traffic]) -> bool:
    return all(len(t.requests) >= 10 for t in traffic)
