"""Real `healthplane serve` processes: one (`ServeProcess`) or several serving one topology (`Replicas`).

    async with Replicas(document, tmp_path, count=3) as replicas:
        bootstrap = make_bootstrap(..., xds=replicas.xds_addresses)
        ...
        index = await replicas.serving("front-1")   # which replica holds the node's stream
        await replicas[index].kill()                 # SIGKILL, as a crash would

Ports may be 0: each process prints the ports it bound (`healthplane: xDS on HOST:PORT, admin
on http://HOST:PORT, version V`) and that line is read back, so nothing races for a port.
Each replica gets its own copy of the document (ports, `data_dir`) and its own embedded
prober unless `no_prober`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import re
import signal
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp
import yaml

from controlplane.errors import LabError
from lab.envoyproc import with_parent_death_signal

__all__ = ["Replicas", "ServeError", "ServeProcess"]

_BANNER = re.compile(r"xDS on (\S+):(\d+), admin on http://(\S+):(\d+), version (\S+)")
_TAIL_BYTES = 16 * 1024


class ServeError(LabError):
    """A `healthplane serve` of the lab's did not start, or did not answer, as expected."""


class ServeProcess:
    """One `python -m controlplane serve --config FILE` child: start(), kill(), stop(), admin reads."""

    def __init__(
        self,
        config: Path,
        *,
        name: str = "serve",
        no_prober: bool = False,
        log_level: str = "warning",
        log_format: str | None = None,
        serve_args: Sequence[str] = (),
    ) -> None:
        self.config = Path(config)
        self.name = name
        self.no_prober = no_prober
        self.log_level = log_level
        self.log_format = log_format  # --log-format (text or json); None: the default
        self.serve_args = list(serve_args)  # more options of `serve` (--workers 2, say)
        self.xds_port = 0
        self.admin_port = 0
        self.first_version = ""
        self._proc: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None
        self._drain: asyncio.Future[bytes] | None = None

    @property
    def log_path(self) -> Path:
        """The process's stderr (its log), beside the config file."""
        return self.config.with_suffix(".log")

    @property
    def xds_address(self) -> str:
        return f"127.0.0.1:{self.xds_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise ServeError(f"{self.name}: not started")
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self, timeout: float = 30) -> None:  # noqa: ASYNC109 - startup deadline
        """Start the process and return once it printed the ports it bound (the same ones again on a restart)."""
        if self.running:
            raise ServeError(f"{self.name}: already running (pid {self.pid})")
        if self.xds_port:
            self._pin_ports()  # a restart comes back where the clients' bootstraps point
        argv = [sys.executable, "-m", "controlplane", "--log-level", self.log_level]
        if self.log_format is not None:
            argv += ["--log-format", self.log_format]
        argv += ["serve", "--config", str(self.config)]
        if self.no_prober:
            argv.append("--no-prober")
        argv += self.serve_args
        with self.log_path.open("ab") as log:
            self._proc = await asyncio.create_subprocess_exec(
                *with_parent_death_signal(argv),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        try:
            await asyncio.wait_for(self._read_banner(), timeout)
        except TimeoutError:
            await self.kill()
            raise ServeError(f"{self.name}: no start line within {timeout}s\n{self.log_tail()}") from None

    def _pin_ports(self) -> None:
        document = yaml.safe_load(self.config.read_text())
        cp = document.setdefault("controlplane", {})
        cp["xds"] = {**(cp.get("xds") or {}), "port": self.xds_port}
        cp["admin"] = {**(cp.get("admin") or {}), "port": self.admin_port}
        self.config.write_text(yaml.safe_dump(document, sort_keys=False))

    async def _read_banner(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        while line := await self._proc.stdout.readline():
            match = _BANNER.search(line.decode(errors="replace"))
            if match:
                self.xds_port, self.admin_port, self.first_version = int(match[2]), int(match[4]), match[5]
                # Nothing else is printed on stdout; drain it so a chatty child never blocks on a full pipe.
                self._drain = asyncio.ensure_future(self._proc.stdout.read())
                return
        await self._proc.wait()
        raise ServeError(f"{self.name} exited with code {self._proc.returncode} while starting\n{self.log_tail()}")

    async def wait_ready(self, timeout: float = 30) -> None:  # noqa: ASYNC109 - polls /readyz
        """Wait until `/readyz` answers 200 (first snapshot built and, with a prober, its first full state)."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while True:
            if not self.running:
                raise ServeError(f"{self.name} exited with code {self.returncode}\n{self.log_tail()}")
            try:
                status, body = await self.get("/readyz")
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = repr(exc)
            else:
                if status == 200:
                    return
                last = str(body)
            if time.monotonic() >= deadline:
                raise ServeError(f"{self.name} not ready after {timeout}s: {last}")
            await asyncio.sleep(0.05)

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.returncode

    async def kill(self) -> None:
        """SIGKILL, as a crash: nothing is flushed, every stream drops at once."""
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGKILL)
            await self._proc.wait()

    async def stop(self, grace: float = 10) -> None:
        """SIGTERM (a clean shutdown), SIGKILL after `grace` seconds."""
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self._proc.wait(), grace)
            except TimeoutError:
                await self.kill()

    async def aclose(self) -> None:
        """Stop the process (if running) and close the admin session; safe to call twice."""
        await self.kill()
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def get(self, path: str) -> tuple[int, Any]:
        """GET an admin path: (status, JSON body)."""
        return await self.request("GET", path)

    async def request(self, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
        if self._session is None:
            raise ServeError(f"{self.name}: not started")
        async with self._session.request(method, self.admin_url + path, **kwargs) as response:
            return response.status, await response.json()

    async def node(self, node_id: str) -> dict[str, Any] | None:
        """The node's `/nodes` row if it is connected here, else None."""
        status, body = await self.get("/nodes")
        if status != 200:
            raise ServeError(f"{self.name}: GET /nodes answered {status}: {body}")
        return next((n for n in body["nodes"] if n["id"] == node_id), None)

    def log_tail(self, n: int = 30) -> str:
        try:
            with self.log_path.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - _TAIL_BYTES))
                lines = f.read().decode(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return f"--- {self.name} log tail ---\n" + "\n".join(lines[-n:])

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def replica_document(document: Mapping[str, Any], directory: Path) -> dict[str, Any]:
    """The document one replica serves: the same topology, its own ports (0 unless given), data_dir and store name."""
    doc = copy.deepcopy(dict(document))
    cp = dict(doc.get("controlplane") or {})
    cp["xds"] = {**(cp.get("xds") or {}), "port": (cp.get("xds") or {}).get("port", 0)}
    cp["admin"] = {**(cp.get("admin") or {}), "port": (cp.get("admin") or {}).get("port", 0)}
    cp["data_dir"] = str(directory / "data")
    if isinstance(cp.get("store"), Mapping) and "replica_id" not in cp["store"]:
        # A shared store names each replica; its default (HOSTNAME:XDS_PORT) is one name for all on one host.
        cp["store"] = {**cp["store"], "replica_id": directory.name}
    doc["controlplane"] = cp
    return doc


class Replicas:
    """`count` `healthplane serve` processes serving one topology document; an async context manager."""

    def __init__(
        self,
        document: Mapping[str, Any],
        directory: Path,
        *,
        count: int = 3,
        no_prober: bool = False,
        log_level: str = "warning",
    ) -> None:
        if count < 1:
            raise ServeError(f"replicas: count must be at least 1, not {count}")
        self.directory = Path(directory)
        self.processes: list[ServeProcess] = []
        for i in range(count):
            home = self.directory / f"replica-{i}"
            home.mkdir(parents=True, exist_ok=True)
            config = home / "topology.yaml"
            config.write_text(yaml.safe_dump(replica_document(document, home), sort_keys=False))
            self.processes.append(ServeProcess(config, name=f"replica-{i}", no_prober=no_prober, log_level=log_level))

    def __getitem__(self, index: int) -> ServeProcess:
        return self.processes[index]

    def __iter__(self) -> Iterator[ServeProcess]:
        return iter(self.processes)

    def __len__(self) -> int:
        return len(self.processes)

    @property
    def xds_addresses(self) -> list[str]:
        """HOST:PORT of every replica's xDS server, in order (as `bootstrap --xds` takes them)."""
        return [p.xds_address for p in self.processes]

    @property
    def alive(self) -> list[ServeProcess]:
        return [p for p in self.processes if p.running]

    async def start(self, *, ready: bool = True, timeout: float = 30) -> None:  # noqa: ASYNC109
        """Start every replica (concurrently); with `ready`, wait for each one's `/readyz`."""
        await asyncio.gather(*(p.start(timeout) for p in self.processes))
        if ready:
            await asyncio.gather(*(p.wait_ready(timeout) for p in self.processes))

    async def serving(self, node_id: str) -> int | None:
        """Index of the live replica holding a stream of `node_id` (the first, if several)."""
        for i, p in enumerate(self.processes):
            if p.running and await p.node(node_id) is not None:
                return i
        return None

    async def aclose(self) -> None:
        await asyncio.gather(*(p.aclose() for p in self.processes), return_exceptions=True)

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
