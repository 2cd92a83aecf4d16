"""TLS and mutual TLS on the xDS port (a real Envoy, the prober link, plain gRPC clients), and the admin API's
TLS, read token and request-size limit. Certificates are made per test session with `openssl`."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml

from controlplane.app import ControlPlane
from controlplane.cli.main import main as cli_main
from controlplane.errors import ConfigError
from controlplane.snapshots import resources as rs
from controlplane.topology.parse import load_topology, parse_topology
from controlplane.xds.bootstrap import XdsTls, make_bootstrap
from controlplane.xds.tls import channel_credentials
from healthplane.v1 import prober_pb2
from lab.envoyproc import EnvoyProcess, free_port, poll_until
from prober.link import ControlPlaneLink
from prober.scheduler import Prober
from tests.controlplane.xds.certs import Certs, _signed, make_certs
from tests.controlplane.xds.xds_fuzz import HealthyNode

READ_TOKEN = "read-token-123"
CHANGE_TOKEN = "change-token-456"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def document(certs: Certs, *, client_ca: bool = True, admin: dict[str, Any] | None = None) -> dict[str, Any]:
    tls: dict[str, Any] = {"cert": str(certs.server_cert), "key": str(certs.server_key)}
    if client_ca:
        tls["client_ca"] = str(certs.ca)
    return {
        "controlplane": {
            "xds": {"address": "127.0.0.1", "port": 0, "tls": tls},
            "admin": {"address": "127.0.0.1", "port": 0, **(admin or {})},
            "watch_interval": 0,
        },
        "clusters": [{"name": "web", "endpoints": [{"address": "127.0.0.1", "port": 18081}]}],
        "listeners": [{"name": "ingress", "address": "127.0.0.1", "port": free_port(), "routes": [{"cluster": "web"}]}],
    }


@contextlib.asynccontextmanager
async def serving(doc: dict[str, Any], tmp_path: Path) -> AsyncIterator[ControlPlane]:
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(doc))
    cp = ControlPlane(load_topology(path))
    await cp.start()
    try:
        yield cp
    finally:
        await cp.aclose(grace=0)


def client_creds(certs: Certs, *, cert: Path | None = None, key: Path | None = None) -> grpc.ChannelCredentials:
    return channel_credentials(certs.ca, cert, key)


async def first_eds(channel: grpc.aio.Channel) -> str:
    node = HealthyNode(channel, "tls-client")
    try:
        await node.start()
        async with asyncio.timeout(10):
            while not node.versions:
                node.changed.clear()
                if node.task is not None and node.task.done():
                    node.task.result()  # the stream's error, if it failed
                    raise AssertionError("the stream ended without a response")
                await node.changed.wait()
        return node.versions[0]
    finally:
        await node.aclose()


# --------------------------------------------------------------------------- configuration


def test_tls_paths_are_checked_and_relative_to_the_topology_file(certs: Certs, tmp_path: Path) -> None:
    (tmp_path / "tls").mkdir()
    for src in (certs.server_cert, certs.server_key):
        (tmp_path / "tls" / src.name).write_bytes(src.read_bytes())
    doc = document(certs, client_ca=False)
    doc["controlplane"]["xds"]["tls"] = {"cert": f"tls/{certs.server_cert.name}", "key": f"tls/{certs.server_key.name}"}
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(doc))
    sec = load_topology(path).controlplane.security
    assert sec.xds_tls is not None and sec.xds_tls.cert == tmp_path / "tls" / certs.server_cert.name
    assert not sec.xds_tls.mutual

    doc["controlplane"]["xds"]["tls"]["key"] = "tls/missing.key"
    with pytest.raises(ConfigError) as err:
        parse_topology(doc, source=str(path))
    assert err.value.path == "controlplane.xds.tls.key" and "no such file" in err.value.message
    doc["controlplane"]["xds"]["tls"] = {"cert": str(certs.server_cert)}
    with pytest.raises(ConfigError) as err:
        parse_topology(doc, source=str(path))
    assert err.value.path == "controlplane.xds.tls.key" and err.value.message == "is required (a PEM file path)"


@pytest.mark.parametrize(
    ("section", "field", "value", "message"),
    [
        ("xds", "max_message_bytes", 10, "must be 1024..268435456"),
        ("xds", "max_streams_per_peer", -1, "must be 0..1000000"),
        ("admin", "max_request_bytes", "big", "must be an integer, got a string"),
        ("admin", "read_token", "short", "must be at least 8 characters without spaces"),
        (
            "xds",
            "tls",
            {"cert": "a", "key": "b", "ca": "c"},
            "unknown field (expected one of: cert, client_ca, key, prober_names)",
        ),
    ],
)
def test_limit_and_token_fields_are_validated(section: str, field: str, value: Any, message: str) -> None:
    doc = {"controlplane": {section: {field: value}}}
    with pytest.raises(ConfigError) as err:
        parse_topology(doc, source="t.yaml")
    assert message in err.value.message
    assert err.value.path.startswith(f"controlplane.{section}.{field}")


def test_bootstrap_command_writes_an_upstream_tls_context(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bootstrap", "--node-id", "n1", "--service", "s", "--xds", "127.0.0.1:18000"]
    tls = ["--tls-ca", "/etc/hp/ca.pem", "--tls-cert", "/etc/hp/c.pem", "--tls-key", "/etc/hp/c.key"]
    assert cli_main([*args, *tls, "--tls-sni", "cp.example"]) == 0
    cluster = yaml.safe_load(capsys.readouterr().out)["static_resources"]["clusters"][0]
    context = cluster["transport_socket"]["typed_config"]
    assert context["sni"] == "cp.example"
    common = context["common_tls_context"]
    assert common["validation_context"]["trusted_ca"] == {"filename": "/etc/hp/ca.pem"}
    assert common["tls_certificates"] == [
        {"certificate_chain": {"filename": "/etc/hp/c.pem"}, "private_key": {"filename": "/etc/hp/c.key"}}
    ]
    assert cli_main([*args, "--tls-cert", "/etc/hp/c.pem"]) == 2
    assert "--tls-ca" in capsys.readouterr().err


# --------------------------------------------------------------------------- the xDS port


async def test_mutual_tls_admits_clients_with_a_cert_from_the_ca_and_refuses_the_rest(
    certs: Certs, tmp_path: Path
) -> None:
    async with serving(document(certs), tmp_path) as cp:
        target = f"127.0.0.1:{cp.xds_port}"
        creds = client_creds(certs, cert=certs.client_cert, key=certs.client_key)
        async with grpc.aio.secure_channel(target, creds) as channel:
            assert await first_eds(channel) == cp.snapshot.type_versions[rs.ENDPOINT]

        for label, channel_of in [
            ("no client certificate", lambda: grpc.aio.secure_channel(target, client_creds(certs))),
            (
                "a certificate from another CA",
                lambda: grpc.aio.secure_channel(
                    target, client_creds(certs, cert=certs.rogue_cert, key=certs.rogue_key)
                ),
            ),
            ("plaintext", lambda: grpc.aio.insecure_channel(target)),
        ]:
            async with channel_of() as channel:
                with pytest.raises((grpc.aio.AioRpcError, TimeoutError, AssertionError)):
                    await first_eds(channel)
            assert len(cp.ads.streams) == 0, label


async def test_a_real_envoy_gets_its_config_over_mutual_tls(certs: Certs, tmp_path: Path) -> None:
    async with serving(document(certs), tmp_path) as cp:
        tls = XdsTls(ca=str(certs.ca), cert=str(certs.client_cert), key=str(certs.client_key), sni="127.0.0.1")
        bootstrap = make_bootstrap(
            node_id="tls-envoy", service="front", xds_host="127.0.0.1", xds_port=cp.xds_port, admin_port=0, tls=tls
        )
        async with EnvoyProcess(bootstrap, name="tls-envoy") as envoy:
            await envoy.wait_live()

            async def acked() -> bool:
                node = cp.nodes.get("tls-envoy")
                eds = None if node is None else node.types.get(rs.ENDPOINT)
                return eds is not None and eds.acked_version == cp.snapshot.type_versions[rs.ENDPOINT]

            await poll_until(acked, timeout=20, what="the Envoy ACKing EDS over mTLS")
            assert "ingress" in await envoy.listeners()
            assert "web" in await envoy.clusters()


async def test_an_envoy_with_a_cert_from_another_ca_gets_nothing(certs: Certs, tmp_path: Path) -> None:
    async with serving(document(certs), tmp_path) as cp:
        tls = XdsTls(ca=str(certs.ca), cert=str(certs.rogue_cert), key=str(certs.rogue_key), sni="127.0.0.1")
        bootstrap = make_bootstrap(
            node_id="rogue-envoy", service="front", xds_host="127.0.0.1", xds_port=cp.xds_port, admin_port=0, tls=tls
        )
        async with EnvoyProcess(bootstrap, name="rogue-envoy") as envoy:

            async def refused() -> bool:
                stats = await envoy.stats("cluster.healthplane_xds.")
                return stats.get("cluster.healthplane_xds.upstream_cx_connect_fail", 0) > 0 or any(
                    v > 0 for k, v in stats.items() if ".ssl.connection_error" in k or ".ssl.fail_verify" in k
                )

            await poll_until(refused, timeout=20, what="the rogue Envoy's TLS handshakes failing")
            assert cp.nodes.get("rogue-envoy") is None
            assert await envoy.listeners() == []


@contextlib.asynccontextmanager
async def linked_prober(cp: ControlPlane, prober_id: str, creds: grpc.ChannelCredentials) -> AsyncIterator[None]:
    """A real prober reporting over the prober link with `creds`, connected."""
    link = ControlPlaneLink(f"127.0.0.1:{cp.xds_port}", prober_id=prober_id, credentials=creds)
    prober = Prober(sink=link, source=f"prober:{prober_id}")
    link.prober = prober
    await prober.start()
    task = asyncio.create_task(link.run())
    try:
        await asyncio.wait_for(link.connected.wait(), 10)
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await prober.aclose()


async def test_the_prober_link_over_mutual_tls(certs: Certs, tmp_path: Path) -> None:
    async with serving(document(certs), tmp_path) as cp:
        creds = client_creds(certs, cert=certs.client_cert, key=certs.client_key)
        async with linked_prober(cp, "tls-prober", creds):

            async def registered() -> bool:
                record = cp.prober_link.probers.get("tls-prober")
                return record is not None and record.connected and record.full_state_at is not None

            await poll_until(registered, timeout=10, what="the prober's full state over mTLS")


async def test_prober_names_keep_envoy_certificates_off_the_prober_link(certs: Certs, tmp_path: Path) -> None:
    doc = document(certs)
    doc["controlplane"]["xds"]["tls"]["prober_names"] = ["prober.internal"]
    async with serving(doc, tmp_path) as cp:
        # An Envoy's certificate, signed by the same CA, still gets its config over ADS...
        envoy_creds = client_creds(certs, cert=certs.client_cert, key=certs.client_key)
        async with grpc.aio.secure_channel(f"127.0.0.1:{cp.xds_port}", envoy_creds) as channel:
            assert await first_eds(channel)
            # ...but may not report verdicts.
            report = channel.stream_stream(
                "/healthplane.v1.ProberLink/Report",
                request_serializer=prober_pb2.ProberMessage.SerializeToString,
                response_deserializer=prober_pb2.ControlPlaneMessage.FromString,
            )
            call = report()
            await call.write(prober_pb2.ProberMessage(hello=prober_pb2.Hello(prober_id="impostor")))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert err.value.details() == (
                "prober link: the client certificate's names (envoy) are not in controlplane.xds.tls.prober_names"
            )
        assert "impostor" not in cp.prober_link.probers

        # The prober's certificate (SAN prober.internal) is let in.
        creds = client_creds(certs, cert=certs.prober_cert, key=certs.prober_key)
        async with linked_prober(cp, "named-prober", creds):

            async def registered() -> bool:
                return "named-prober" in cp.prober_link.probers

            await poll_until(registered, timeout=10, what="the named prober registered")


def renewable(certs: Certs, tmp_path: Path) -> tuple[Path, Path, tuple[Path, Path], Path]:
    """(cert, key) files holding the server certificate, a renewal of it, and the renewal's CA.

    The renewal is signed by another CA, so a client can tell which certificate it was served.
    """
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "server.pem", live / "server.key"
    cert.write_bytes(certs.server_cert.read_bytes())
    key.write_bytes(certs.server_key.read_bytes())
    other_ca = certs.ca.parent / "rogue-ca.pem"
    renewed = _signed(
        tmp_path, "renewed", other_ca, certs.ca.parent / "rogue-ca.key", "/CN=healthplane",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )  # fmt: skip
    return cert, key, renewed, other_ca


async def test_a_renewed_xds_certificate_is_served_from_the_next_handshake(certs: Certs, tmp_path: Path) -> None:
    cert, key, renewed, other_ca = renewable(certs, tmp_path)
    doc = document(certs, client_ca=False)
    doc["controlplane"]["xds"]["tls"] = {"cert": str(cert), "key": str(key)}

    async with serving(doc, tmp_path) as cp:

        async def served_to(trusting: Path) -> str:
            # A channel of its own: a new connection, so a new handshake.
            options = [("grpc.use_local_subchannel_pool", 1)]
            creds = channel_credentials(trusting, None, None)
            async with grpc.aio.secure_channel(f"127.0.0.1:{cp.xds_port}", creds, options=options) as channel:
                return await first_eds(channel)

        assert await served_to(certs.ca)
        key.write_bytes(renewed[1].read_bytes())  # half-way: a key that does not match the cert
        assert await served_to(certs.ca)  # ...so the last good certificate is still served
        cert.write_bytes(renewed[0].read_bytes())
        assert await served_to(other_ca)
        with pytest.raises(grpc.aio.AioRpcError):
            await served_to(certs.ca)


def test_prober_names_need_a_client_ca(certs: Certs) -> None:
    doc = document(certs, client_ca=False)
    doc["controlplane"]["xds"]["tls"]["prober_names"] = ["prober.internal"]
    with pytest.raises(ConfigError) as err:
        parse_topology(doc, source="t.yaml")
    assert err.value.path == "controlplane.xds.tls.prober_names"
    assert err.value.message.startswith("needs client_ca")


# --------------------------------------------------------------------------- the admin port


async def test_a_renewed_admin_certificate_is_loaded_without_a_restart(certs: Certs, tmp_path: Path) -> None:
    from controlplane.admin.app import CERTIFICATE_KEY

    cert, key, renewed, other_ca = renewable(certs, tmp_path)
    async with serving(document(certs, admin={"tls": {"cert": str(cert), "key": str(key)}}), tmp_path) as cp:
        certificate = cp._process._admin.app[CERTIFICATE_KEY]  # type: ignore[union-attr]

        async def healthz(trusting: Path) -> int:
            context = ssl.create_default_context(cafile=str(trusting))
            connector = aiohttp.TCPConnector(force_close=True)  # a new handshake each time
            async with aiohttp.ClientSession(connector=connector) as session:
                async with session.get(f"https://127.0.0.1:{cp.admin_port}/healthz", ssl=context) as r:
                    return r.status

        assert await healthz(certs.ca) == 200
        assert certificate.check() is False  # nothing changed
        key.write_bytes(renewed[1].read_bytes())  # half-way: the key no longer matches the cert
        assert certificate.check() is False
        assert await healthz(certs.ca) == 200
        cert.write_bytes(renewed[0].read_bytes())
        assert certificate.check() is True  # what the admin app's poll calls every ADMIN_CERT_POLL s
        assert await healthz(other_ca) == 200
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await healthz(certs.ca)


async def test_admin_tls_read_token_change_token_and_body_limit(certs: Certs, tmp_path: Path) -> None:
    admin = {
        "tls": {"cert": str(certs.server_cert), "key": str(certs.server_key)},
        "token": CHANGE_TOKEN,
        "read_token": READ_TOKEN,
        "max_request_bytes": 4096,
    }
    async with serving(document(certs, admin=admin), tmp_path) as cp:
        context = ssl.create_default_context(cafile=str(certs.ca))
        base = f"https://127.0.0.1:{cp.admin_port}"
        version = cp.snapshot.version

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:

            async def call(method: str, path: str, token: str | None = None, **kw: Any) -> tuple[int, Any]:
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                async with session.request(method, base + path, ssl=context, headers=headers, **kw) as r:
                    return r.status, await r.json(content_type=None)

            assert (await call("GET", "/healthz"))[0] == 200  # probes stay open
            code, body = await call("GET", "/snapshot")
            assert code == 401 and body["field"] == "Authorization"
            assert (await call("GET", "/snapshot", "wrong-token-0"))[0] == 401
            assert (await call("GET", "/snapshot", READ_TOKEN))[0] == 200
            assert (await call("GET", "/endpoints", CHANGE_TOKEN))[0] == 200  # the change token reads too

            override = "/endpoints/web/127.0.0.1:18081/override"
            assert (await call("POST", override, READ_TOKEN, json={"status": "UNHEALTHY"}))[0] == 401
            code, body = await call("PUT", "/topology", CHANGE_TOKEN, data=b"x" * 10_000)
            assert code == 413
            assert body == {
                "error": "request body is over controlplane.admin.max_request_bytes (4096)",
                "field": "controlplane.admin.max_request_bytes",
            }
            assert cp.snapshot.version == version
            code, body = await call("POST", override, CHANGE_TOKEN, json={"status": "UNHEALTHY"})
            assert code == 200 and body["changed"] is True

        # Plain HTTP on the TLS port gets nowhere.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            with pytest.raises(aiohttp.ClientError):
                async with session.get(f"http://127.0.0.1:{cp.admin_port}/healthz") as r:
                    await r.read()


async def test_put_topology_cannot_change_tls_or_limits_while_running(certs: Certs, tmp_path: Path) -> None:
    async with serving(document(certs), tmp_path) as cp:
        doc = document(certs)
        doc["controlplane"]["xds"]["max_message_bytes"] = 2048
        doc["controlplane"]["xds"]["port"] = cp.topology.controlplane.xds.port
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{cp.admin_port}/topology"
            async with session.put(url, json=doc) as r:
                body = await r.json()
        assert r.status == 400 and body["field"] == "controlplane.xds.max_message_bytes"


async def test_admin_mutual_tls_needs_a_client_certificate_from_the_ca(certs: Certs, tmp_path: Path) -> None:
    admin = {"tls": {"cert": str(certs.server_cert), "key": str(certs.server_key), "client_ca": str(certs.ca)}}
    async with serving(document(certs, admin=admin), tmp_path) as cp:
        url = f"https://127.0.0.1:{cp.admin_port}/snapshot"

        def context(cert: Path | None, key: Path | None) -> ssl.SSLContext:
            ctx = ssl.create_default_context(cafile=str(certs.ca))
            if cert is not None and key is not None:
                ctx.load_cert_chain(cert, key)
            return ctx

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with session.get(url, ssl=context(certs.client_cert, certs.client_key)) as r:
                assert r.status == 200
            for cert, key in ((None, None), (certs.rogue_cert, certs.rogue_key)):
                with pytest.raises(aiohttp.ClientError):
                    async with session.get(url, ssl=context(cert, key)) as r:
                        await r.read()
