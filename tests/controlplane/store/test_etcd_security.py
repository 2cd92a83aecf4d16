"""The store's TLS and authentication against a real etcd: mutual TLS (etcd's --client-cert-auth),
users and passwords (etcd's auth enabled), and the reason a replica gives when they are wrong."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aetcd import rpc

from controlplane.app import ControlPlane
from controlplane.health.store import HealthStatus
from controlplane.store.changes import OverrideChange
from controlplane.store.etcd import connect
from controlplane.topology.parse import load_topology
from controlplane.topology.store import EtcdSettings
from lab.envoyproc import poll_until
from lab.etcd import EtcdNotFound, EtcdServer, EtcdServerTls
from tests.controlplane.xds.certs import _signed, make_certs


def write(tmp_path: Path, name: str, etcd: dict[str, Any]) -> Path:
    path = tmp_path / f"{name}.yaml"
    document = {
        "controlplane": {"xds": {"port": 0}, "admin": {"port": 0}, "store": {"replica_id": name, "etcd": etcd}},
        "clusters": [{"name": "web", "endpoints": [{"address": "127.0.0.1", "port": 1001}]}],
    }
    path.write_text(yaml.safe_dump(document))
    return path


@pytest.fixture
async def tls_etcd(tmp_path: Path) -> AsyncIterator[tuple[EtcdServer, Any]]:
    certs = make_certs(tmp_path / "certs")
    # etcd's own gRPC gateway dials the server with the server's certificate: it needs clientAuth too.
    cert, key = _signed(
        tmp_path / "certs", "etcd", certs.ca, tmp_path / "certs" / "test-ca.key", "/CN=etcd",
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
    )  # fmt: skip
    tls = EtcdServerTls(cert, key, certs.ca, certs.client_cert, certs.client_key)
    server = EtcdServer(tmp_path / "etcd", tls=tls)
    try:
        await server.start()
    except EtcdNotFound as exc:
        pytest.skip(str(exc))
    try:
        yield server, certs
    finally:
        await server.stop()


async def test_mutual_tls(tmp_path: Path, tls_etcd: tuple[EtcdServer, Any]) -> None:
    server, certs = tls_etcd
    etcd = {
        "endpoints": [f"https://{server.endpoint}"],
        "timeout": "2s",
        "tls": {"ca": str(certs.ca), "cert": str(certs.client_cert), "key": str(certs.client_key)},
    }
    cp = ControlPlane(load_topology(write(tmp_path, "a", etcd)), config_path=tmp_path / "a.yaml")
    await cp.start()
    try:
        assert cp.store.problems() == []
        await cp.store.submit(OverrideChange("web", "127.0.0.1:1001", HealthStatus.DRAINING, "alice"))
        assert cp.overrides() == {("web", "127.0.0.1:1001"): HealthStatus.DRAINING}
    finally:
        await cp.aclose()
    # Without a client certificate etcd refuses the connection, and the replica says so.
    no_cert = {**etcd, "tls": {"ca": str(certs.ca)}}
    cp = ControlPlane(load_topology(write(tmp_path, "b", no_cert)), config_path=tmp_path / "b.yaml")
    await cp.start()
    try:
        [problem] = cp.store.problems()
        assert f"etcd {server.endpoint} unavailable" in problem
        assert [e.port for e in cp.topology.clusters[0].endpoints] == [1001]  # its file, served degraded
    finally:
        await cp.aclose()


async def test_username_and_password(tmp_path: Path, etcd: EtcdServer) -> None:
    (tmp_path / "secret").write_text("hunter22\n")
    admin = connect(EtcdSettings(endpoints=(("127.0.0.1", etcd.client_port),)))
    try:
        await admin.connect()
        auth = rpc.AuthStub(admin.channel)
        await auth.UserAdd(rpc.AuthUserAddRequest(name="root", password="hunter22"))
        await auth.RoleAdd(rpc.AuthRoleAddRequest(name="root"))
        await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"))
        await auth.AuthEnable(rpc.AuthEnableRequest())
    finally:
        await admin.close()
    good = {"endpoints": [etcd.endpoint], "timeout": "2s", "username": "root", "password_file": "secret"}
    cp = ControlPlane(load_topology(write(tmp_path, "a", good)), config_path=tmp_path / "a.yaml")
    await cp.start()
    try:
        assert cp.store.problems() == []
        await cp.store.submit(OverrideChange("web", "127.0.0.1:1001", HealthStatus.DRAINING, "alice"))
        assert len(cp.overrides()) == 1
    finally:
        await cp.aclose()
    bad = {**good, "password": "wrong-one"}
    del bad["password_file"]
    cp = ControlPlane(load_topology(write(tmp_path, "b", bad)), config_path=tmp_path / "b.yaml")
    await cp.start()
    try:

        async def refused() -> list[str] | None:
            problems = cp.store.problems()
            return problems if problems and "password" in problems[0] else None

        [problem] = await poll_until(refused, timeout=10, what="the wrong password named")
        assert f"etcd {etcd.endpoint} unavailable" in problem, problem
    finally:
        await cp.aclose()
