"""Shared fixtures: real demo backends, a real control plane, real Envoys, all on 127.0.0.1."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import yaml

from controlplane.app import ControlPlane
from controlplane.topology.parse import load_topology
from controlplane.xds.bootstrap import make_bootstrap
from lab.demoapp import DemoApp
from lab.envoyproc import EnvoyProcess, free_port
from lab.etcd import EtcdCluster, EtcdNotFound, EtcdServer
from prober.embedded import attach_embedded_prober

_SERVER_NAME = re.compile(r"ServerName: ([^,\s]+)")


@pytest.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[EtcdServer]:
    """A real single-member etcd on ephemeral 127.0.0.1 ports (Debian's etcd-server; `.ci/run` installs it)."""
    async with _running(EtcdServer(tmp_path / "etcd")) as server:
        yield server


@pytest.fixture
async def etcd_cluster(tmp_path: Path) -> AsyncIterator[EtcdCluster]:
    """Three real etcd members on ephemeral 127.0.0.1 ports, one cluster."""
    async with _running(EtcdCluster(tmp_path / "etcd-cluster", size=3)) as cluster:
        yield cluster


Etcd = TypeVar("Etcd", EtcdServer, EtcdCluster)


@contextlib.asynccontextmanager
async def _running(server: Etcd) -> AsyncIterator[Etcd]:
    """`server` started (the test skipped, with the reason, where there is no etcd) and stopped after."""
    try:
        await server.start()
    except EtcdNotFound as exc:
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def backends() -> AsyncIterator[list[DemoApp]]:
    """Three demo apps (b1, b2, b3) on ephemeral ports."""
    async with demo_apps(3) as apps:
        yield apps


@pytest.fixture
async def ten_backends() -> AsyncIterator[list[DemoApp]]:
    """Ten demo apps (b1 .. b10) on ephemeral ports: enough to split between probers."""
    async with demo_apps(10) as apps:
        yield apps


@contextlib.asynccontextmanager
async def demo_apps(count: int) -> AsyncIterator[list[DemoApp]]:
    """`count` demo apps named b1, b2, ... on ephemeral 127.0.0.1 ports, stopped after."""
    apps = [DemoApp(f"b{i}") for i in range(1, count + 1)]
    try:
        for app in apps:
            await app.start("127.0.0.1", 0)
        yield apps
    finally:
        for app in apps:
            await app.stop()


def web_topology(backends: list[DemoApp], listener_port: int, **cluster: Any) -> dict[str, Any]:
    """A topology document: cluster `web` of the backends behind listener `ingress`."""
    return {
        "controlplane": {"xds": {"port": 0}, "admin": {"port": 0}, "watch_interval": "100ms"},
        "clusters": [
            {
                "name": "web",
                "endpoints": [{"address": "127.0.0.1", "port": b.port} for b in backends],
                **cluster,
            }
        ],
        "listeners": [
            {
                "name": "ingress",
                "address": "127.0.0.1",
                "port": listener_port,
                "routes": [{"prefix": "/", "cluster": "web"}],
            }
        ],
    }


class Lab:
    """A control plane serving a topology file, and the Envoys attached to it."""

    def __init__(self, tmp_path: Path) -> None:
        self.config = tmp_path / "topology.yaml"
        self.cp: ControlPlane | None = None
        self.envoys: list[EnvoyProcess] = []
        self.embedded_prober = False
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))

    def write(self, document: dict[str, Any]) -> None:
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(document))
        tmp.replace(self.config)

    async def start_control_plane(
        self, document: dict[str, Any], *, xds_port: int = 0, workers: int = 1
    ) -> ControlPlane:
        document = dict(document)
        document["controlplane"] = {**document["controlplane"], "xds": {"port": xds_port}}
        self.write(document)
        self.cp = ControlPlane(load_topology(self.config), config_path=self.config, workers=workers)
        if self.embedded_prober:
            attach_embedded_prober(self.cp)
        await self.cp.start()
        return self.cp

    async def start_envoy(
        self, node_id: str = "front-1", service: str = "front-proxy", *, delta: bool = False
    ) -> EnvoyProcess:
        assert self.cp is not None
        envoy = EnvoyProcess(
            make_bootstrap(
                node_id=node_id,
                service=service,
                xds_host="127.0.0.1",
                xds_port=self.cp.xds_port,
                admin_port=0,
                delta=delta,
            ),
            name=node_id,
        )
        self.envoys.append(envoy)
        await envoy.start()
        await envoy.wait_live()
        return envoy

    async def admin(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        assert self.cp is not None
        url = f"http://127.0.0.1:{self.cp.admin_port}{path}"
        async with self.session.request(method, url, **kwargs) as response:
            return response.status, await response.json()

    async def override(self, endpoint: str, status: str, cluster: str = "web") -> Any:
        code, body = await self.admin("POST", f"/endpoints/{cluster}/{endpoint}/override", json={"status": status})
        assert code == 200, body
        return body

    async def hits(self, port: int, n: int = 30) -> collections.Counter[str]:
        """Send n requests through an Envoy listener; count answers by backend (or status)."""
        seen: collections.Counter[str] = collections.Counter()
        for _ in range(n):
            async with self.session.get(f"http://127.0.0.1:{port}/") as response:
                text = await response.text()
                match = _SERVER_NAME.search(text)
                seen[match.group(1) if response.status == 200 and match else f"status {response.status}"] += 1
        return seen

    async def aclose(self) -> None:
        for envoy in self.envoys:
            await envoy.stop()
        if self.cp is not None:
            await self.cp.aclose()
        await self.session.close()


@pytest.fixture
async def lab(tmp_path: Path) -> AsyncIterator[Lab]:
    lab = Lab(tmp_path)
    try:
        yield lab
    finally:
        await lab.aclose()


@pytest.fixture
def listener_port() -> int:
    return free_port()


class Traffic:
    """Requests through the listener back to back, counted by outcome, until stopped."""

    def __init__(self, lab: Lab, port: int) -> None:
        self.lab, self.port = lab, port
        self.results: collections.Counter[str] = collections.Counter()
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            try:
                async with self.lab.session.get(f"http://127.0.0.1:{self.port}/") as response:
                    await response.read()
                    self.results["ok" if response.status == 200 else f"status {response.status}"] += 1
            except aiohttp.ClientError as exc:
                self.results[f"error {type(exc).__name__}"] += 1
            await asyncio.sleep(0.005)

    async def stop(self) -> collections.Counter[str]:
        self._stop.set()
        await self._task
        return self.results
