"""Run a real etcd server on 127.0.0.1 for the tests, the benchmarks and the lab.

    async with EtcdServer(tmp_path / "etcd") as etcd:
        store = {"etcd": {"endpoints": [etcd.endpoint]}}
        ...
        await etcd.kill()       # SIGKILL, as a crash would
        await etcd.start()      # back on the same ports with the same data
        etcd.pause()            # SIGSTOP, as a hung host would (etcd.resume() ends it)

    async with EtcdCluster(tmp_path / "etcd", size=3) as cluster:
        store = {"etcd": {"endpoints": cluster.endpoints}}
        await cluster.members[0].kill()   # one member lost: the other two keep the quorum

The binary is Debian's `etcd-server` package (`apt-get install etcd-server`; `.ci/run` installs
it). Client and peer ports are ephemeral, chosen at the first start and kept across restarts so
that clients reconnect to the same address; the data directory survives a kill, as a real
member's disk does.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

import aiohttp

from controlplane.errors import LabError
from lab.envoyproc import free_port, with_parent_death_signal

__all__ = ["EtcdCluster", "EtcdError", "EtcdNotFound", "EtcdServer", "EtcdServerTls", "find_etcd"]

_POLL_INTERVAL = 0.05
_TAIL_BYTES = 16 * 1024


class EtcdError(LabError):
    """An etcd server of the lab's did not start, or did not stop, as asked."""


class EtcdNotFound(EtcdError):
    """No `etcd` binary on PATH (Debian's etcd-server package provides it)."""


def find_etcd() -> str:
    """Path of the etcd binary; EtcdNotFound naming the package when there is none."""
    found = shutil.which("etcd") or ("/usr/bin/etcd" if Path("/usr/bin/etcd").is_file() else None)
    if found is None:
        raise EtcdNotFound("no etcd binary on PATH; install Debian's etcd-server package (apt-get install etcd-server)")
    return found


@dataclass(frozen=True)
class EtcdServerTls:
    """Serve clients over TLS with `cert`/`key`, requiring a client certificate signed by `ca`
    (etcd's --client-cert-auth); `client_cert`/`client_key` are what the lab polls /health with."""

    cert: Path
    key: Path
    ca: Path
    client_cert: Path
    client_key: Path


class _Started:
    """`async with`: start() on entry, stop() on exit."""

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()


class EtcdServer(_Started):
    """One etcd member: start(), kill(), stop(); an async context manager. Alone, it is a
    single-member cluster; `EtcdCluster` gives several members one `initial_cluster`."""

    def __init__(self, data_dir: Path, *, name: str = "healthplane-test", tls: EtcdServerTls | None = None) -> None:
        self.name = name
        self.tls = tls
        self.data_dir = Path(data_dir)
        self.client_port = 0
        self.peer_port = 0
        self.initial_cluster = ""  # etcd's --initial-cluster; empty: this member alone
        self._proc: asyncio.subprocess.Process | None = None

    @property
    def endpoint(self) -> str:
        """HOST:PORT of the client URL, as `controlplane.store.etcd.endpoints` takes it."""
        return f"127.0.0.1:{self.client_port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self, timeout: float = 30) -> None:  # noqa: ASYNC109 - startup deadline
        """Start etcd (again, after kill() or stop(), on the same ports) and wait until it is healthy."""
        if self.running:
            raise EtcdError(f"etcd {self.name}: already running (pid {self._proc.pid if self._proc else '?'})")
        binary = find_etcd()
        if not self.client_port:
            self.client_port = free_port()
            self.peer_port = free_port()
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        client_url = f"{'https' if self.tls else 'http'}://127.0.0.1:{self.client_port}"
        peer_url = f"http://127.0.0.1:{self.peer_port}"
        args = [
            binary,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", self.initial_cluster or f"{self.name}={peer_url}",
            "--initial-cluster-state", "new",
            "--log-level", "warn",
            "--logger", "zap",
        ]  # fmt: skip
        if self.tls is not None:
            args += [
                "--cert-file", str(self.tls.cert), "--key-file", str(self.tls.key),
                "--trusted-ca-file", str(self.tls.ca), "--client-cert-auth",
            ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self._proc = await asyncio.create_subprocess_exec(
                *with_parent_death_signal(args),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        try:
            await self._wait_healthy(client_url, timeout)
        except BaseException:
            await self.kill()
            raise

    async def _wait_healthy(self, client_url: str, limit: float) -> None:
        deadline = time.monotonic() + limit
        connector = None
        if self.tls is not None:
            context = ssl.create_default_context(cafile=str(self.tls.ca))
            context.load_cert_chain(self.tls.client_cert, self.tls.client_key)
            connector = aiohttp.TCPConnector(ssl=context)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1), connector=connector) as session:
            while True:
                if self._proc is not None and self._proc.returncode is not None:
                    raise EtcdError(
                        f"etcd {self.name} exited with {self._proc.returncode} while starting; "
                        f"its log ({self.log_path}) ends:\n{self.log_tail()}"
                    )
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError, AttributeError):
                    if await self._answers_as_us(session, client_url):
                        return
                if time.monotonic() >= deadline:
                    raise EtcdError(
                        f"etcd {self.name} did not become healthy on {client_url} within {limit}s; "
                        f"its log ends:\n{self.log_tail()}"
                    )
                await asyncio.sleep(_POLL_INTERVAL)

    async def _answers_as_us(self, session: aiohttp.ClientSession, client_url: str) -> bool:
        """Healthy, and the member answering is this one (not another etcd already on the port)."""
        async with session.get(f"{client_url}/health") as response:
            health = await response.json(content_type=None)
            if response.status != 200 or str(health.get("health")) != "true":
                return False
        async with session.post(f"{client_url}/v3/cluster/member/list", json={}) as response:
            members = (await response.json(content_type=None)).get("members", [])
        peer_url = f"http://127.0.0.1:{self.peer_port}"
        return any(m.get("name") == self.name and peer_url in m.get("peerURLs", []) for m in members)

    def pause(self) -> None:
        """SIGSTOP, as a hung host: connections stay open and nothing answers (resume() ends it)."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after pause()."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.send_signal(signal.SIGCONT)

    async def kill(self) -> None:
        """SIGKILL, as a crash or a lost host would; the data directory stays."""
        await self._end(signal.SIGKILL)

    async def stop(self) -> None:
        """SIGTERM and wait; the data directory stays."""
        await self._end(signal.SIGTERM)

    async def _end(self, sig: signal.Signals) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
            proc.send_signal(signal.SIGCONT)  # a paused etcd acts on SIGTERM only once it runs again
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    def log_tail(self) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(0, 2)
                size = log.tell()
                log.seek(max(0, size - _TAIL_BYTES))
                return log.read().decode("utf-8", "replace")
        except OSError:
            return "(no log)"


class EtcdCluster(_Started):
    """`size` etcd members on 127.0.0.1, one cluster: each its own process, ports and data
    directory, started together (a new cluster's members wait for each other's votes)."""

    def __init__(self, base: Path, *, size: int = 3, name: str = "healthplane-test") -> None:
        if size < 1:
            raise EtcdError(f"an etcd cluster needs at least one member, not {size}")
        self.members = [EtcdServer(Path(base) / f"member{i}", name=f"{name}-{i}") for i in range(size)]
        for member in self.members:
            member.client_port, member.peer_port = free_port(), free_port()
        initial = ",".join(f"{m.name}=http://127.0.0.1:{m.peer_port}" for m in self.members)
        for member in self.members:
            member.initial_cluster = initial

    @property
    def endpoints(self) -> list[str]:
        """Every member's HOST:PORT, as `controlplane.store.etcd.endpoints` takes them."""
        return [m.endpoint for m in self.members]

    async def start(self, timeout: float = 30) -> None:  # noqa: ASYNC109 - startup deadline
        try:
            await asyncio.gather(*(m.start(timeout) for m in self.members if not m.running))
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        await asyncio.gather(*(m.stop() for m in self.members))
