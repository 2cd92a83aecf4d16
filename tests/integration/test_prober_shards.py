"""Probers with shards (issue 17), whole: `healthplane prober` processes over real gRPC, real
backends counting the checks they get, a real control plane and a real Envoy.

- Two probers share the endpoints: each checks about half, each endpoint is checked by one.
- One is killed: its share is checked by the other within the staleness bound, and no endpoint
  flips (every snapshot published across the move, and the Envoy's traffic, say so).
- One prober linked to two control planes gives both the same verdicts, and one of them down
  delays nothing for the other; back, it gets the full state.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from controlplane.app import ControlPlane
from controlplane.health.store import HealthStatus
from controlplane.probers.ownership import owners
from controlplane.snapshots.snapshot import Snapshot
from controlplane.topology.parse import parse_topology
from lab.demoapp import DemoApp
from lab.envoyproc import poll_until
from tests.conftest import Lab, Traffic, web_topology
from tests.integration.test_central_prober import flip

pytestmark = pytest.mark.envoy

INTERVAL = 0.2
STALENESS = 3.0  # controlplane.prober_staleness: the bound a dead prober's share moves within
HEALTH_CHECK = {
    "http": {"path": "/livez"},
    "interval": f"{int(INTERVAL * 1000)}ms",
    "timeout": "150ms",
    "healthy_threshold": 1,
    "unhealthy_threshold": 1,
}


class ProberProcess:
    """`healthplane prober` in its own process."""

    def __init__(self, prober_id: str, *controlplanes: int) -> None:
        self.prober_id = prober_id
        self.controlplanes = controlplanes
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        targets = [arg for port in self.controlplanes for arg in ("--controlplane", f"127.0.0.1:{port}")]
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "controlplane", "--log-level", "warning", "prober", *targets,
            "--id", self.prober_id,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip

    async def stop(self, sig: int = signal.SIGTERM) -> bytes:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(sig)
        output, _ = await asyncio.wait_for(self.process.communicate(), 10)
        return output


def balanced_ids(endpoints: list[str]) -> tuple[str, str]:
    """Two prober ids that split these endpoints 40/60 or closer (the ports are ephemeral)."""
    for n in range(100):
        ids = (f"p{n}a", f"p{n}b")
        first = sum(owners(f"web/{ep}", ids, 1)[0] == ids[0] for ep in endpoints)
        if 0.4 <= first / len(endpoints) <= 0.6:
            return ids
    raise AssertionError("no balanced pair of ids")


def checks(backends: list[DemoApp]) -> dict[int, int]:
    return {b.port: b.health_checks["/livez"] for b in backends}


def check_source(cp: ControlPlane, endpoint: str) -> tuple[str, float]:
    info = cp.prober_link.checks.get(("web", endpoint))
    return (info.prober, info.last_time or 0.0) if info is not None else ("", 0.0)


async def _true(value: object) -> object:
    return value


async def wait(check: Callable[[], object], what: str, within: float = 15) -> None:
    await poll_until(lambda: _true(check()), timeout=within, what=what)


async def test_two_probers_share_the_endpoints_and_a_killed_ones_share_moves_without_a_flip(
    lab: Lab, ten_backends: list[DemoApp], listener_port: int
) -> None:
    doc = web_topology(ten_backends, listener_port, health_check=HEALTH_CHECK)
    doc["controlplane"]["prober_staleness"] = f"{STALENESS}s"
    cp = await lab.start_control_plane(doc)
    endpoints = [f"127.0.0.1:{b.port}" for b in ten_backends]
    one, two = balanced_ids(endpoints)
    probers = [ProberProcess(one, cp.xds_port), ProberProcess(two, cp.xds_port)]
    for p in probers:
        await p.start()
    try:
        await wait(lambda: cp.prober_link.ownership.members == tuple(sorted((one, two))), "two members")
        mine = {ep: owners(f"web/{ep}", (one, two), 1)[0] for ep in endpoints}
        await wait(
            lambda: all(check_source(cp, ep)[0] == f"prober:{mine[ep]}" for ep in endpoints), "checks by the owners"
        )
        await wait(lambda: all(cp.health.status("web", ep) is HealthStatus.HEALTHY for ep in endpoints), "all HEALTHY")
        envoy = await lab.start_envoy()
        await wait(lambda: cp.nodes.get("front-1") is not None, "the Envoy connected")

        # Each endpoint is checked by one prober, at the rate of one (two would double it).
        before = checks(ten_backends)
        await asyncio.sleep(2.0)
        after = checks(ten_backends)
        per_endpoint = [(after[p] - before[p]) * INTERVAL / 2.0 for p in after]  # 1.0: one check per interval
        assert all(0.5 <= rate <= 1.3 for rate in per_endpoint), per_endpoint
        code, body = await lab.admin("GET", "/endpoints")
        assert code == 200 and {e["endpoint"]: e["owners"] for e in body["endpoints"]} == {
            ep: [mine[ep]] for ep in endpoints
        }
        code, body = await lab.admin("GET", "/probers")
        owns = {p["id"]: p["owns"] for p in body["remote"]}
        assert owns == {i: sum(o == i for o in mine.values()) for i in (one, two)} and all(owns.values())

        # Watch every snapshot published across the move, and traffic through the Envoy.
        statuses: list[set[HealthStatus]] = []

        def seen() -> None:
            snapshot: Snapshot | None = cp.cache.current()
            assert snapshot is not None
            statuses.append({e.status for e in snapshot.endpoints})

        cancel = cp.cache.subscribe(seen)
        traffic = Traffic(lab, listener_port)
        await asyncio.sleep(0.3)

        # The second prober dies: SIGKILL, no goodbye.
        killed_at = time.time()
        await probers[1].stop(signal.SIGKILL)
        moved = [ep for ep in endpoints if mine[ep] == two]
        await wait(
            lambda: all(
                check_source(cp, ep)[0] == f"prober:{one}" and check_source(cp, ep)[1] > killed_at for ep in moved
            ),
            f"{two}'s share checked by {one}",
            within=STALENESS,
        )
        took = time.time() - killed_at
        before = checks(ten_backends)
        await asyncio.sleep(1.0)
        after = checks(ten_backends)
        assert all(after[int(ep.rsplit(":", 1)[1])] > before[int(ep.rsplit(":", 1)[1])] for ep in moved)
        results = await traffic.stop()
        cancel()

        assert took < STALENESS, took
        assert all(s == {HealthStatus.HEALTHY} for s in statuses), statuses  # no endpoint flipped
        assert set(results) == {"ok"}, results
        hosts = (await envoy.clusters())["web"]
        assert not any("failed_eds_health" in h.health_flags for h in hosts)
        code, body = await lab.admin("GET", "/endpoints")
        assert all(e["owners"] == [one] and e["status"] == "HEALTHY" for e in body["endpoints"])
        # The dead prober's share moved: no staleness alarm for it, even past the bound.
        cp.prober_link.probers[one].last_message_at = time.time() + 10
        cp.check_probers(now=time.time() + 10)
        assert cp.admission.alarms.active("prober_stale") == []
    finally:
        for p in probers:
            await p.stop()


async def test_a_prober_linked_to_two_control_planes_gives_both_the_same_verdicts(
    lab: Lab, backends: list[DemoApp], listener_port: int, tmp_path: Path
) -> None:
    doc = web_topology(backends, listener_port, health_check=HEALTH_CHECK)
    a = await lab.start_control_plane(doc)
    b = ControlPlane(parse_topology(doc))
    await b.start()
    b_port = b.xds_port
    prober = ProberProcess("both", a.xds_port, b_port)
    await prober.start()
    endpoints = [f"127.0.0.1:{x.port}" for x in backends]

    def status(cp: ControlPlane, x: DemoApp) -> HealthStatus:
        return cp.health.status("web", f"127.0.0.1:{x.port}")

    try:
        await wait(
            lambda: all(cp.health.status("web", ep) is HealthStatus.HEALTHY for cp in (a, b) for ep in endpoints),
            "all HEALTHY on both",
        )
        await flip(backends[0], "down")
        await wait(
            lambda: status(a, backends[0]) is status(b, backends[0]) is HealthStatus.UNHEALTHY, "UNHEALTHY on both"
        )

        # Replica b goes away: a still gets every verdict at once.
        await b.aclose()
        await flip(backends[1], "down")
        await wait(lambda: status(a, backends[1]) is HealthStatus.UNHEALTHY, "a gets the verdict with b down", 5)

        # b back on its port: the link reconnects and sends the full state.
        doc_b: dict[str, Any] = {**doc, "controlplane": {**doc["controlplane"], "xds": {"port": b_port}}}
        b = ControlPlane(parse_topology(doc_b))
        await b.start()
        await wait(
            lambda: (
                [status(b, x) for x in backends]
                == [HealthStatus.UNHEALTHY, HealthStatus.UNHEALTHY, HealthStatus.HEALTHY]
            ),
            "b back with the full state",
        )
        assert [status(a, x) for x in backends] == [status(b, x) for x in backends]
    finally:
        output = await prober.stop()
        await b.aclose()
    assert prober.process is not None and prober.process.returncode == 0, output.decode()
    # A clean stop said goodbye: no alarm will follow on a.
    assert a.prober_link.probers["both"].left
