"""`healthplane serve --workers N`: the option, and the command itself with two xDS workers."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
from pathlib import Path

import grpc
import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc

from controlplane.cli.serve import _workers, auto_workers
from controlplane.snapshots import resources as rs
from lab.adsclient import AdsClient, AdsStream
from lab.replicas.serve import ServeProcess


def test_workers_takes_a_number_or_auto() -> None:
    assert _workers("3") == 3
    assert _workers("auto") == auto_workers() == len(os.sched_getaffinity(0))
    for bad, why in (("0", "not between 1 and 256"), ("-2", "not between"), ("two", "neither a number nor auto")):
        with pytest.raises(argparse.ArgumentTypeError, match=why):
            _workers(bad)


def children(pid: int) -> set[int]:
    with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
        return {int(p) for p in f.read().split()}


def alive(pid: int) -> bool:
    """Running, not gone or a zombie (the workers are the server's children, reaped by it)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            return "zombie" not in f.read()
    except FileNotFoundError:
        return False


async def test_serve_with_two_workers_serves_ads_and_stops_them(tmp_path: Path) -> None:
    config = tmp_path / "topology.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "controlplane": {"xds": {"port": 0}, "admin": {"port": 0}, "watch_interval": 0},
                "clusters": [{"name": "web", "endpoints": [{"address": "127.0.0.1", "port": 8081}]}],
            }
        )
    )
    served = ServeProcess(config, no_prober=True, log_level="info", serve_args=["--workers", "2"])
    try:
        await served.start()
        workers = children(served.pid)
        assert len(workers) == 2, workers
        async with grpc.aio.insecure_channel(served.xds_address) as channel:
            client = AdsClient(base_pb2.Node(id="cli-node", cluster="test"))
            stream = AdsStream(ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel), client)
            await stream.send(client.subscribe(rs.ENDPOINT, ["web"]))
            response = await asyncio.wait_for(stream.read(), 10)
            assert response is not None and response.version_info
            await stream.send(client.ack(response))
            stopping = asyncio.create_task(served.stop(grace=20))  # SIGTERM
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await asyncio.wait_for(stream.read(), 10)
            assert ended.value.code() is grpc.StatusCode.UNAVAILABLE
            assert ended.value.details() == "the control plane is shutting down"
            await stopping
        assert served.returncode == 0
        log = served.log_path.read_text()
        assert "shut down, streams closed: 1 xDS, 0 prober" in log, log
        assert not [pid for pid in workers if alive(pid)]
    finally:
        await served.aclose()


async def test_the_workers_log_as_the_main_process_does(tmp_path: Path) -> None:
    """`--log-format json`: every line on stderr is one JSON object, the workers' naming the worker."""
    config = tmp_path / "topology.yaml"
    config.write_text(
        yaml.safe_dump(
            {"controlplane": {"xds": {"port": 0}, "admin": {"port": 0}, "watch_interval": 0}, "clusters": []}
        )
    )
    served = ServeProcess(config, no_prober=True, log_level="info", log_format="json", serve_args=["--workers", "2"])
    try:
        await served.start()
        async with grpc.aio.insecure_channel(served.xds_address) as channel:
            # A request without a node: refused by the worker that holds the stream, which logs why.
            client = AdsClient(base_pb2.Node(id="x"))
            client.node_sent = True
            stream = AdsStream(ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel), client)
            await stream.send(client.subscribe(rs.ENDPOINT, ["web"]))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await asyncio.wait_for(stream.read(), 10)
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        await served.stop(grace=20)  # SIGTERM
        assert served.returncode == 0
        lines = [json.loads(line) for line in served.log_path.read_text().splitlines()]
        [refusal] = [x for x in lines if "must carry node" in x["message"]]
        assert refusal["xds_worker"] in (0, 1) and refusal["level"] == "WARNING"
        # (The refused stream may still be finishing in its worker when the stop comes: 0 or 1.)
        assert re.fullmatch(r"shut down, streams closed: [01] xDS, 0 prober", lines[-1]["message"]), lines[-1]
        assert "xds_worker" not in lines[-1]
    finally:
        await served.aclose()
