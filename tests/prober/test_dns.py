"""A --controlplane name: one link per address it resolves to (prober/dns/), the diff with its
grace period (pure), and the links over real gRPC to real control planes on 127.0.0.x."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from controlplane.app import ControlPlane
from controlplane.health.store import HealthStatus
from controlplane.topology.parse import parse_topology
from controlplane.xds.tls import channel_credentials
from prober.dns import AddressChange, ResolvedAddresses, link_target
from prober.link import ControlPlaneLinks
from prober.scheduler import Prober
from tests.controlplane.xds.certs import make_certs
from tests.prober.backends import HttpBackend, eventually


def test_new_addresses_link_at_once_and_a_missing_one_only_after_the_grace_period() -> None:
    addresses = ResolvedAddresses(grace=10)
    assert addresses.update(["10.0.0.2", "10.0.0.1"], now=0) == AddressChange(added=("10.0.0.1", "10.0.0.2"))
    assert addresses.update(["10.0.0.1", "10.0.0.2"], now=5) == AddressChange()
    # 10.0.0.2 missing: kept at the first missing answer, and until it has been missing for 10 s.
    assert addresses.update(["10.0.0.1", "10.0.0.3"], now=10) == AddressChange(added=("10.0.0.3",))
    assert addresses.current == ("10.0.0.1", "10.0.0.2", "10.0.0.3")
    assert addresses.missing() == {"10.0.0.2": 10}
    assert addresses.update(["10.0.0.1", "10.0.0.3"], now=19.9) == AddressChange()
    assert addresses.update(["10.0.0.1", "10.0.0.3"], now=20) == AddressChange(removed=("10.0.0.2",))
    assert addresses.current == ("10.0.0.1", "10.0.0.3")
    assert addresses.missing() == {}


def test_an_address_that_comes_back_within_the_grace_period_is_kept_and_its_clock_restarts() -> None:
    addresses = ResolvedAddresses(grace=10)
    addresses.update(["10.0.0.1", "10.0.0.2"], now=0)
    addresses.update(["10.0.0.1"], now=1)  # a flap
    assert addresses.update(["10.0.0.1", "10.0.0.2"], now=9) == AddressChange()
    assert addresses.missing() == {}
    addresses.update(["10.0.0.1"], now=12)  # missing again: 10 s from now, not from 1
    assert addresses.update(["10.0.0.1"], now=21) == AddressChange()
    assert addresses.update(["10.0.0.1"], now=22) == AddressChange(removed=("10.0.0.2",))


def test_a_grace_of_zero_still_waits_for_a_second_missing_answer() -> None:
    addresses = ResolvedAddresses(grace=0)
    addresses.update(["10.0.0.1", "10.0.0.2"], now=0)
    assert addresses.update(["10.0.0.1"], now=1) == AddressChange()
    assert addresses.update(["10.0.0.1"], now=1) == AddressChange(removed=("10.0.0.2",))


def test_every_address_replaced_at_once_links_the_new_ones_before_the_old_ones_go() -> None:
    addresses = ResolvedAddresses(grace=5)
    addresses.update(["10.0.0.1"], now=0)
    assert addresses.update(["10.0.0.9"], now=1) == AddressChange(added=("10.0.0.9",))
    assert addresses.current == ("10.0.0.1", "10.0.0.9")
    assert addresses.update(["10.0.0.9"], now=6) == AddressChange(removed=("10.0.0.1",))


def test_an_empty_answer_is_refused_and_a_negative_grace_too() -> None:
    addresses = ResolvedAddresses(grace=5)
    addresses.update(["10.0.0.1"], now=0)
    with pytest.raises(ValueError, match="empty answer"):
        addresses.update([], now=100)
    assert addresses.current == ("10.0.0.1",)
    with pytest.raises(ValueError, match="grace"):
        ResolvedAddresses(grace=-1)


def test_link_targets_bracket_ipv6() -> None:
    assert link_target("10.0.0.5", 18000) == "10.0.0.5:18000"
    assert link_target("fd00::5", 18000) == "[fd00::5]:18000"
    assert link_target("fe80::1%eth0", 1) == "[fe80::1%eth0]:1"
    with pytest.raises(ValueError):
        link_target("not-an-address", 1)


# ---------------------------------------------------------------------- live: real control planes


def replica_document(address: str, port: int, backend_port: int) -> dict[str, Any]:
    return {
        "controlplane": {"xds": {"address": address, "port": port}, "admin": {"address": "127.0.0.1", "port": 0}},
        "clusters": [
            {
                "name": "web",
                "endpoints": [{"address": "127.0.0.1", "port": backend_port}],
                "health_check": {"tcp": {}, "interval": "200ms", "timeout": "200ms"},
            }
        ],
    }


@contextlib.asynccontextmanager
async def replicas(count: int, backend_port: int) -> AsyncIterator[list[ControlPlane]]:
    """`count` control planes on 127.0.0.1, 127.0.0.2, ... all on one xDS port, as the pods of a
    headless Service are (the first picks an ephemeral port, the others take it on their address)."""
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(
            ControlPlane(parse_topology(replica_document("127.0.0.1", 0, backend_port)))
        )
        planes = [first]
        for i in range(2, count + 1):
            doc = replica_document(f"127.0.0.{i}", first.xds_port, backend_port)
            planes.append(await stack.enter_async_context(ControlPlane(parse_topology(doc))))
        yield planes


def linked(cp: ControlPlane, prober_id: str = "x") -> bool:
    record = cp.prober_link.probers.get(prober_id)
    return record is not None and record.connected


class Answers:
    """The resolver the links are given: answers what the test says, counts the calls."""

    def __init__(self, *addresses: str) -> None:
        self.answer: list[str] | OSError = list(addresses)
        self.calls: list[tuple[str, int]] = []

    async def __call__(self, name: str, port: int) -> list[str]:
        self.calls.append((name, port))
        if isinstance(self.answer, OSError):
            raise self.answer
        return list(self.answer)

    async def calls_after(self, n: int) -> None:
        start = len(self.calls)
        await eventually(lambda: len(self.calls) >= start + n, within=10)


@contextlib.asynccontextmanager
async def probing(links: ControlPlaneLinks) -> AsyncIterator[ControlPlaneLinks]:
    """A real prober reporting through `links`, and the links running; both stopped after."""
    prober = Prober(sink=links, source=f"prober:{links.prober_id}")
    links.prober = prober
    async with prober:
        task = asyncio.create_task(links.run())
        try:
            yield links
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_a_name_gets_one_link_per_address_as_its_addresses_come_and_go(
    http_backend: HttpBackend, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="healthplane.prober")
    endpoint = f"127.0.0.1:{http_backend.port}"
    async with replicas(3, http_backend.port) as (a, b, c):
        port = a.xds_port
        answers = Answers("127.0.0.1", "127.0.0.2")
        links = ControlPlaneLinks(
            [f"cp.test:{port}"], prober_id="x", resolver=answers, resolve_interval=0.05, resolve_grace=2.0
        )
        async with probing(links):
            await eventually(lambda: linked(a) and linked(b), within=10)
            assert answers.calls[0] == ("cp.test", port)
            assert sorted(link.target for link in links.links) == [f"127.0.0.1:{port}", f"127.0.0.2:{port}"]
            await eventually(lambda: b.health.effective("web", endpoint).source == "prober:x", within=10)
            assert not linked(c)

            # A third replica appears in DNS: linked at once, and it gets the full state first
            # (the verdict the prober already has, before any new check changes anything).
            answers.answer = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
            await eventually(lambda: linked(c), within=10)
            await eventually(lambda: c.health.status("web", endpoint) is HealthStatus.HEALTHY, within=10)
            assert c.health.effective("web", endpoint).source == "prober:x"

            # 127.0.0.2 leaves DNS: its link stays through the first missing answers ...
            answers.answer = ["127.0.0.1", "127.0.0.3"]
            await answers.calls_after(3)
            assert linked(b) and len(links.links) == 3
            # ... and is closed with a goodbye once it has been missing for the grace period.
            await eventually(lambda: not linked(b), within=10)
            assert b.prober_link.probers["x"].left  # left, not died: no alarm at that replica
            assert sorted(link.target for link in links.links) == [f"127.0.0.1:{port}", f"127.0.0.3:{port}"]

            # A failed resolution, or an empty one, keeps every link and says so, naming the name.
            answers.answer = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            await answers.calls_after(3)
            answers.answer = []
            await answers.calls_after(3)
            assert linked(a) and linked(c) and len(links.links) == 2
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert any(f"resolving control plane cp.test:{port} failed" in w for w in warnings)
            assert any(f"cp.test:{port} resolved to no address" in w for w in warnings)

            # It comes back: the verdicts keep flowing to every replica linked.
            answers.answer = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
            await eventually(lambda: linked(b), within=10)
            assert not b.prober_link.probers["x"].left
            await links.leave()
            await eventually(lambda: not (linked(a) or linked(b) or linked(c)), within=10)


async def test_localhost_is_really_resolved_and_linked(http_backend: HttpBackend) -> None:
    async with replicas(1, http_backend.port) as (cp,):
        links = ControlPlaneLinks([f"localhost:{cp.xds_port}"], prober_id="x", resolve_interval=0.2)
        async with probing(links):
            await eventually(lambda: linked(cp), within=10)
            # One link per address the system resolver gives for localhost (127.0.0.1, and
            # ::1 where /etc/hosts has it: that link retries, nothing listens there).
            resolved = {info[4][0] for info in socket.getaddrinfo("localhost", cp.xds_port, type=socket.SOCK_STREAM)}
            assert {link.target for link in links.links} == {link_target(a, cp.xds_port) for a in resolved}
            assert f"127.0.0.1:{cp.xds_port}" in {link.target for link in links.links}
            await links.leave()


async def test_ip_targets_are_one_link_each_and_never_resolved() -> None:
    answers = Answers("127.0.0.9")
    links = ControlPlaneLinks(["127.0.0.1:1", "[::1]:2", "cp.test:3"], prober_id="x", resolver=answers)
    assert [link.target for link in links.links] == ["127.0.0.1:1", "[::1]:2"]
    assert links.names == [("cp.test", 3)]
    assert answers.calls == []


async def test_over_tls_the_links_of_a_name_check_the_certificate_for_the_name(
    http_backend: HttpBackend, tmp_path: Path
) -> None:
    # The replica's certificate names 127.0.0.1 and localhost, not 127.0.0.2: the link to the
    # address localhost resolved to checks the certificate for localhost.
    certs = make_certs(tmp_path / "certs")
    doc = replica_document("127.0.0.2", 0, http_backend.port)
    doc["controlplane"]["xds"]["tls"] = {"cert": str(certs.server_cert), "key": str(certs.server_key)}
    async with ControlPlane(parse_topology(doc)) as cp:
        links = ControlPlaneLinks(
            [f"localhost:{cp.xds_port}"],
            prober_id="x",
            resolver=Answers("127.0.0.2"),
            resolve_interval=0.2,
            credentials=channel_credentials(certs.ca),
        )
        async with probing(links):
            await eventually(lambda: linked(cp), within=10)
            [link] = links.links
            assert (link.target, link.server_name) == (f"127.0.0.2:{cp.xds_port}", "localhost")
            await links.leave()


def test_the_resolve_flags_are_checked(capsys: pytest.CaptureFixture[str]) -> None:
    from controlplane.cli.main import main

    assert main(["prober", "--controlplane", "cp.test:18000", "--resolve-interval", "0"]) == 2
    assert "--resolve-interval: must be more than 0 seconds, got 0.0" in capsys.readouterr().err
    assert main(["prober", "--controlplane", "cp.test:18000", "--resolve-grace", "-1"]) == 2
    assert "--resolve-grace: must be 0 seconds or more, got -1.0" in capsys.readouterr().err


async def test_healthplane_prober_given_a_name_links_and_leaves_cleanly(http_backend: HttpBackend) -> None:
    async with replicas(1, http_backend.port) as (cp,):
        proc = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "controlplane", "prober", "--controlplane", f"localhost:{cp.xds_port}"],
            *["--id", "x", "--resolve-interval", "0.2", "--resolve-grace", "1"],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            await eventually(lambda: linked(cp), within=30)
            await eventually(lambda: cp.health.effective("web", f"127.0.0.1:{http_backend.port}").source == "prober:x")
        finally:
            proc.terminate()
            _, stderr = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, stderr.decode()[-2000:]
        await eventually(lambda: not linked(cp))
        assert cp.prober_link.probers["x"].left  # SIGTERM: a goodbye on the link to the resolved address
