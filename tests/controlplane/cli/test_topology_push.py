"""`healthplane topology push FILE`: a bad file never reaches etcd; errors name what is missing."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from controlplane.cli.main import main
from controlplane.store.etcd import connect
from controlplane.topology.store import EtcdSettings
from lab.envoyproc import free_port
from lab.etcd import EtcdServer


def write(path: Path, *, store: dict[str, Any] | None = None, endpoint_port: int = 8080) -> Path:
    document: dict[str, Any] = {
        "controlplane": {"xds": {"port": 18123}, **({"store": store} if store else {})},
        "clusters": [{"name": "web", "endpoints": [{"address": "127.0.0.1", "port": endpoint_port}]}],
    }
    path.write_text(yaml.safe_dump(document))
    return path


def test_without_a_store_it_asks_for_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["topology", "push", str(write(tmp_path / "t.yaml"))]) == 2
    assert "no controlplane.store: give --config" in capsys.readouterr().err


def test_an_unreachable_etcd_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = {"etcd": {"endpoints": [f"127.0.0.1:{free_port()}"], "timeout": "1s"}}
    assert main(["topology", "push", str(write(tmp_path / "t.yaml", store=store))]) == 2
    err = capsys.readouterr().err
    assert "etcd 127.0.0.1:" in err and "nothing was pushed" in err


async def test_a_good_file_is_pushed_and_a_bad_one_never_is(
    tmp_path: Path, etcd: EtcdServer, capsys: pytest.CaptureFixture[str]
) -> None:
    store = {"etcd": {"endpoints": [etcd.endpoint], "prefix": "/push"}}
    local = write(tmp_path / "local.yaml", store=store)
    good = write(tmp_path / "good.yaml", endpoint_port=9090)
    assert await asyncio.to_thread(main, ["topology", "push", str(good), "--config", str(local)]) == 0
    out = capsys.readouterr().out
    assert "at revision" in out and "not pushed: controlplane.xds" in out
    bad = write(tmp_path / "bad.yaml", endpoint_port=0)
    assert await asyncio.to_thread(main, ["topology", "push", str(bad), "--config", str(local)]) == 2
    assert "clusters[0].endpoints[0].port" in capsys.readouterr().err
    client = connect(EtcdSettings(endpoints=(("127.0.0.1", etcd.client_port),)))
    try:
        stored = json.loads((await client.get(b"/push/topology")).value)
    finally:
        await client.close()
    assert stored["document"]["clusters"][0]["endpoints"] == [{"address": "127.0.0.1", "port": 9090}]
    assert "controlplane" not in stored["document"]  # xds is each replica's own
