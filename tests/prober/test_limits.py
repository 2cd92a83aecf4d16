"""Descriptor budget: the pure planning, the bounded pool, and a prober under a low open-files limit."""

from __future__ import annotations

import asyncio
import json
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from controlplane.topology.model import HealthCheck, HttpCheck, TcpCheck
from prober.checks import NetworkChecker
from prober.limits import RESERVE, keepalive_connections, pool_budget, pool_message
from prober.state import ResultKind, Target
from tests.prober.backends import LOCALHOST
from tests.prober.test_checks import http_target

ROOT = Path(__file__).resolve().parents[2]

# --------------------------------------------------------------------------- planning (pure)


def test_pool_budget_leaves_room_for_checks_in_flight_and_the_rest() -> None:
    assert pool_budget(20_000, in_use=30, max_concurrency=512) == 20_000 - 30 - 512 - RESERVE
    assert pool_budget(100, in_use=30, max_concurrency=512) == 0  # never negative
    assert pool_budget(-1, in_use=0, max_concurrency=0, reserve=0) == 1 << 20  # unlimited


def test_keepalive_connections_count_one_per_address_and_check_port() -> None:
    web = [http_target(8080), http_target(8080), http_target(8081), http_target(8082, hc_port=9000)]
    others = [
        http_target(8090, keepalive=False),
        http_target(8091, https=True),
        Target("db", "10.0.0.1", 5432, HealthCheck(kind="tcp", tcp=TcpCheck())),
    ]
    same_port_other_cluster = Target("api", LOCALHOST, 8080, HealthCheck(kind="http", http=HttpCheck(path="/")))
    assert keepalive_connections([*web, *others, same_port_other_cluster]) == 3


def test_pool_message_only_when_short() -> None:
    assert pool_message(100, 100, 200) is None
    message = pool_message(30_000, 19_400, 20_000)
    assert message is not None
    assert "30000 keep-alive endpoints" in message and "19400 keep their connection" in message
    assert "other 10600 connect for every check" in message


# --------------------------------------------------------------------------- the bounded pool


async def _servers(count: int) -> list[asyncio.Server]:
    class Answer(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK")  # type: ignore[attr-defined]

    loop = asyncio.get_running_loop()
    return [await loop.create_server(Answer, LOCALHOST, 0) for _ in range(count)]


async def test_a_full_pool_closes_connections_instead_of_keeping_them() -> None:
    servers = await _servers(4)
    checker = NetworkChecker(max_idle_connections=2)
    try:
        targets = [http_target(s.sockets[0].getsockname()[1], path="/") for s in servers]
        for _ in range(3):
            results = [await checker.check(t) for t in targets]
            assert all(r.ok for r in results), results
            assert len(checker.pool) == 2
        assert checker.pool.refused == 2 * 3  # the two that did not fit, every round
    finally:
        await checker.aclose()
        for s in servers:
            s.close()


# --------------------------------------------------------------------------- a prober process at its limit

PROBER = textwrap.dedent(
    """
    import asyncio, json, logging, sys
    from controlplane.topology.parse import parse_topology
    from prober.events import NullSink
    from prober.scheduler import Prober

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    ports = json.loads(sys.argv[1])
    hc = {"http": {"path": "/"}, "interval": 0.2, "timeout": 0.2, "initial_jitter": 0.2,
          "healthy_threshold": 1, "unhealthy_threshold": 1}
    document = {"clusters": [{"name": "web", "health_check": hc,
                              "endpoints": [{"address": "127.0.0.1", "port": p} for p in ports]}]}

    async def main() -> None:
        kinds = {}
        prober = Prober(parse_topology(document), sink=NullSink(), max_concurrency=16)
        prober.check_listeners.append(lambda t, r: kinds.__setitem__(r.kind.value, kinds.get(r.kind.value, 0) + 1))
        async with prober:
            await asyncio.sleep(2.0)
            pool = prober._checker.pool
            statuses = {}
            for key in list(prober.endpoints()):
                status = prober.endpoint(*key).status.name
                statuses[status] = statuses.get(status, 0) + 1
            print(json.dumps({"kinds": kinds, "statuses": statuses, "pooled": len(pool), "max_idle": pool.max_idle}))

    asyncio.run(main())
    """
)


@pytest.mark.timeout(60)
async def test_a_prober_with_more_endpoints_than_descriptors_fails_no_check() -> None:
    limit = 128
    servers = await _servers(150)  # more keep-alive endpoints than the prober may open sockets

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))  # the hard one too: nothing to raise to

    try:
        ports = [s.sockets[0].getsockname()[1] for s in servers]
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            PROBER,
            json.dumps(ports),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=low_limit,
        )
        out, err = await proc.communicate()
    finally:
        for s in servers:
            s.close()
    assert proc.returncode == 0, err.decode()[-3000:]
    report = json.loads(out)
    log = err.decode()
    assert "150 keep-alive endpoints need 150 sockets but the open-files limit is 128" in log, log[-3000:]
    assert report["statuses"] == {"HEALTHY": 150}
    assert set(report["kinds"]) == {ResultKind.SUCCESS.value}, report  # no failure, nothing inconclusive
    assert report["kinds"]["success"] >= 150 * 4
    assert 0 < report["max_idle"] < limit and report["pooled"] <= report["max_idle"]
