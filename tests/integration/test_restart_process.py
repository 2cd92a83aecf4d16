"""`healthplane serve` killed with SIGKILL under steady traffic through a real Envoy, and started again.

A crash, not a clean shutdown: nothing gets a chance to flush. The verdicts committed to SQLite
before the kill are what the new process serves from its first snapshot; the embedded prober
restarts with it and knows nothing yet, and its UNKNOWN does not flap the dead backend.
"""

from __future__ import annotations

import asyncio
import collections
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from controlplane.snapshots.snapshot import version_key
from controlplane.xds.bootstrap import make_bootstrap
from lab.demoapp import DemoApp
from lab.envoyproc import EnvoyProcess, free_port, poll_until
from tests.conftest import web_topology
from tests.integration.test_central_prober import HEALTH_CHECK

pytestmark = pytest.mark.envoy


class Serve:
    """`python -m controlplane serve` as a child process."""

    def __init__(self, config: Path, admin_port: int) -> None:
        self.config, self.admin = config, f"http://127.0.0.1:{admin_port}"
        self.process: asyncio.subprocess.Process | None = None
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "controlplane", "--log-level", "warning", "serve", "--config", str(self.config),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip

        async def ready() -> bool:
            try:
                return (await self.get("/readyz"))[0] == 200
            except aiohttp.ClientError:
                return False

        await poll_until(ready, timeout=20, what="healthplane serve ready")

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.session.get(self.admin + path) as r:
            return r.status, await r.json()

    async def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def aclose(self) -> None:
        if self.process is not None and self.process.returncode is None:
            await self.kill()
        await self.session.close()


async def served(serve: Serve) -> dict[int, str]:
    _, snapshot = await serve.get("/snapshot")
    return {e["port"]: e["status"] for e in snapshot["clusters"][0]["endpoints"]}


async def test_sigkill_under_traffic(backends: list[DemoApp], tmp_path: Path) -> None:
    listener_port, xds_port, admin_port = free_port(), free_port(), free_port()
    document = web_topology(backends, listener_port, health_check=HEALTH_CHECK)
    document["controlplane"] = {
        "xds": {"port": xds_port},
        "admin": {"port": admin_port},
        "data_dir": str(tmp_path / "data"),
    }
    config = tmp_path / "topology.yaml"
    config.write_text(yaml.safe_dump(document))
    serve = Serve(config, admin_port)
    envoy = EnvoyProcess(
        make_bootstrap(node_id="front-1", service="front-proxy", xds_host="127.0.0.1", xds_port=xds_port, admin_port=0),
        name="front-1",
    )
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
    results: collections.Counter[str] = collections.Counter()
    stop = asyncio.Event()

    async def traffic() -> None:
        while not stop.is_set():
            try:
                async with session.get(f"http://127.0.0.1:{listener_port}/") as response:
                    await response.read()
                    results["ok" if response.status == 200 else f"status {response.status}"] += 1
            except aiohttp.ClientError as exc:
                results[f"error {type(exc).__name__}"] += 1
            await asyncio.sleep(0.005)

    dead = backends[0]
    loop: asyncio.Task[None] | None = None
    try:
        await serve.start()
        await envoy.start()
        await envoy.wait_live()
        await dead.stop()

        async def dead_out() -> bool:
            hosts = (await envoy.clusters()).get("web", [])
            flags = next((h.health_flags for h in hosts if h.port == dead.port), frozenset())
            statuses = await served(serve)
            return "failed_eds_health" in flags and sorted(statuses.values()) == ["HEALTHY", "HEALTHY", "UNHEALTHY"]

        await poll_until(dead_out, timeout=20, what="the dead backend UNHEALTHY and out of Envoy")
        _, before = await serve.get("/snapshot")
        loop = asyncio.create_task(traffic())
        await poll_until(lambda: _at_least(results, 50), timeout=10, what="traffic flowing")

        await serve.kill()
        crashed_at = results["ok"]
        await poll_until(lambda: _at_least(results, crashed_at + 50), timeout=10, what="traffic with no control plane")
        await serve.start()

        async def envoy_current() -> bool:
            _, nodes = await serve.get("/nodes")
            return any(n["id"] == "front-1" and n["up_to_date"] and len(n["types"]) == 4 for n in nodes["nodes"])

        await poll_until(envoy_current, timeout=20, what="Envoy reconnected to the new process and up to date")

        async def prober_checked() -> bool:
            _, rows = await serve.get("/endpoints")
            return all(r["check"] is not None and r["check"]["checks"] >= 3 for r in rows["endpoints"])

        await poll_until(prober_checked, timeout=20, what="the restarted prober checking again")
        resumed_at = results["ok"]
        await poll_until(lambda: _at_least(results, resumed_at + 50), timeout=10, what="traffic after the restart")
    finally:
        stop.set()
        if loop is not None:
            await loop
        _, after = await serve.get("/snapshot")
        _, history = await serve.get("/snapshots?limit=100")
        await serve.aclose()
        await envoy.stop()
        await session.close()

    assert set(results) == {"ok"}, f"failed requests around the crash: {results}"
    # Every snapshot of the new process, the first one included: 2 HEALTHY, 1 UNHEALTHY, never UNKNOWN.
    assert history["snapshots"] and all(
        s["endpoints"] == {"HEALTHY": 2, "UNHEALTHY": 1} for s in history["snapshots"]
    ), history["snapshots"]
    assert history["snapshots"][-1]["cause"]["kind"] == "start"
    for short, version in after["type_versions"].items():
        assert version_key(version) > version_key(before["type_versions"][short]), short


async def _at_least(results: collections.Counter[str], n: int) -> bool:
    return results["ok"] >= n
