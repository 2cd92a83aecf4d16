"""What operators expect of the `healthplane` process (issue 18): --version, logging options in
either place and as JSON lines, readiness with nothing to check, and a quiet deliberate shutdown."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import signal
import sys
from collections.abc import AsyncIterator
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc

from controlplane.cli.main import JsonFormatter, build_parser, main
from controlplane.events import EventLog
from lab.adsclient import AdsClient, AdsStream
from lab.envoyproc import poll_until

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
# No health check anywhere: with --no-prober there is nothing any prober would do.
TOPOLOGY: dict[str, Any] = {
    "controlplane": {"xds": {"port": 0}, "admin": {"port": 0}, "watch_interval": 0},
    "clusters": [{"name": "web", "endpoints": [{"address": "127.0.0.1", "port": 8081}]}],
}


def test_version_names_the_installed_distribution(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"healthplane {metadata.version('healthplane')}\n"


@pytest.mark.parametrize(
    ("argv", "level", "fmt"),
    [
        (["validate", "t.yaml"], "info", "text"),
        (["--log-level", "debug", "validate", "t.yaml"], "debug", "text"),
        (["validate", "--log-level", "debug", "--log-format", "json", "t.yaml"], "debug", "json"),
        (["--log-level", "error", "serve", "-c", "t.yaml", "--log-level", "warning"], "warning", "text"),
        (["--log-format", "json", "endpoints", "--log-level", "error"], "error", "json"),
    ],
)
def test_logging_options_are_taken_before_or_after_the_subcommand(argv: list[str], level: str, fmt: str) -> None:
    args = build_parser().parse_args(argv)
    assert (args.log_level, args.log_format) == (level, fmt)


def test_json_log_lines_carry_the_event_fields(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="healthplane.events"):
        EventLog().record("override", "web 10.0.0.1:80 pinned DRAINING", cluster="web", who="alice (127.0.0.1)")
    records = [r for r in caplog.records if r.name == "healthplane.events"]
    (line,) = [json.loads(JsonFormatter().format(r)) for r in records]
    assert line["level"] == "INFO" and line["logger"] == "healthplane.events"
    assert line["message"] == "override: web 10.0.0.1:80 pinned DRAINING"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", line["time"])
    event = line["event"]
    assert (event["kind"], event["cluster"], event["who"]) == ("override", "web", "alice (127.0.0.1)")
    assert event["id"] == 1 and event["message"] == "web 10.0.0.1:80 pinned DRAINING"


class Served:
    """`healthplane serve --no-prober` as a real process, its ports read from what it prints."""

    def __init__(self, proc: asyncio.subprocess.Process, xds: int, admin: int) -> None:
        self.proc, self.xds, self.admin = proc, xds, admin

    async def stop(self) -> str:
        """SIGTERM, then everything it wrote to stderr."""
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.stderr is not None
        err = await asyncio.wait_for(self.proc.stderr.read(), timeout=30)
        assert await asyncio.wait_for(self.proc.wait(), timeout=30) == 0, err.decode()
        return err.decode()


@pytest.fixture
async def served(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    config = tmp_path / "topology.yaml"
    config.write_text(yaml.safe_dump(TOPOLOGY))
    extra: list[str] = getattr(request, "param", [])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controlplane", "serve", "--config", str(config), "--no-prober", *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=60)).decode()
        ports = re.search(r"xDS on [\d.]+:(\d+), admin on http://[\d.]+:(\d+)", line)
        assert ports is not None, line
        yield Served(proc, int(ports[1]), int(ports[2]))
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_readyz_under_no_prober_with_nothing_to_check(served: Served) -> None:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{served.admin}/readyz") as r:
        assert (r.status, (await r.json())["status"]) == (200, "ready")
    await served.stop()


async def _open_streams(xds: int, count: int) -> tuple[grpc.aio.Channel, list[AdsStream]]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{xds}")
    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
    streams = []
    for i in range(count):
        client = AdsClient(base_pb2.Node(id=f"node-{i}", cluster="svc"))
        stream = AdsStream(stub, client)
        await stream.send(client.subscribe(CDS))
        response = await stream.read()
        assert response is not None and response.type_url == CDS
        streams.append(stream)
    return channel, streams


async def test_a_deliberate_shutdown_is_one_info_line(served: Served) -> None:
    from tests.integration.test_central_prober import ExternalProber

    channel, streams = await _open_streams(served.xds, 3)
    prober = ExternalProber()
    await prober.connect(served.xds)
    try:
        async with aiohttp.ClientSession() as session:

            async def prober_connected() -> bool:
                async with session.get(f"http://127.0.0.1:{served.admin}/probers") as r:
                    return any(p["connected"] for p in (await r.json())["remote"])

            await poll_until(prober_connected, timeout=20, what="the prober link to connect")
        err = await served.stop()
        assert "ERROR" not in err and "Traceback" not in err and "CancelledError" not in err, err
        assert "disconnected" not in err, err  # no line per node or prober: the one line counts them
        (line,) = [line for line in err.splitlines() if "shut down" in line]
        assert line.endswith("INFO healthplane: shut down, streams closed: 3 xDS, 1 prober"), line
        # The streams ended with UNAVAILABLE and why, so Envoy reconnects (to another replica) at once.
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await streams[0].read()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert info.value.details() == "the control plane is shutting down"
    finally:
        await prober.disconnect()
        await channel.close()


@pytest.mark.parametrize("served", [["--log-format", "json"]], indirect=True)
async def test_serve_logs_json_lines_with_the_event_fields(served: Served) -> None:
    channel, _ = await _open_streams(served.xds, 1)
    try:
        err = await served.stop()
    finally:
        await channel.close()
    lines = [json.loads(line) for line in err.splitlines()]  # every line is one JSON object
    (connected,) = [x for x in lines if x.get("event", {}).get("kind") == "node"]
    assert connected["event"]["node"] == "node-0" and connected["logger"] == "healthplane.events"
    assert lines[-1]["message"] == "shut down, streams closed: 1 xDS, 0 prober"
