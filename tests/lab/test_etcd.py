"""EtcdServer against the real etcd binary: start, data kept across a kill, clear errors."""

from __future__ import annotations

from pathlib import Path

import aetcd
import pytest

from lab.envoyproc import free_port
from lab.etcd import EtcdError, EtcdServer


async def test_a_key_written_survives_a_kill_and_a_restart_on_the_same_port(etcd: EtcdServer) -> None:
    host, port = etcd.endpoint.split(":")
    async with aetcd.Client(host=host, port=int(port)) as client:
        await client.put(b"/healthplane/test", b"kept")
    await etcd.kill()
    assert not etcd.running
    await etcd.start()
    assert etcd.endpoint == f"{host}:{port}"
    async with aetcd.Client(host=host, port=int(port)) as client:
        got = await client.get(b"/healthplane/test")
    assert got is not None and got.value == b"kept"


async def test_a_port_already_taken_is_an_error_with_the_log(tmp_path: Path, etcd: EtcdServer) -> None:
    other = EtcdServer(tmp_path / "other")
    other.client_port, other.peer_port = etcd.client_port, free_port()
    with pytest.raises(EtcdError, match=r"exited with .* while starting"):
        await other.start(timeout=15)
    assert not other.running
