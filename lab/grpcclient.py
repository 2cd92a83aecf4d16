"""A proxyless gRPC client: dials `xds:///NAME` through grpcio's own xDS client and prints who answered.

    GRPC_XDS_BOOTSTRAP=grpc-bootstrap.json python -m lab.grpcclient --target greeter --rate 10

One JSON line per call on stdout: `{"t": ..., "target": "greeter", "channel": 0, "method": "Who", "server": "g1"}`
or, for a failed call, `"error": "UNAVAILABLE", "detail": "..."`. The bootstrap is read once
per process (at the first xds: channel), so tests and benchmarks run this as a subprocess; all
the channels of one process share one xDS client, hence one ADS stream and one node.
`--method Hello` (repeatable) calls other methods of the demo service too, each in its own loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from lab.grpcdemo import CLIENT_METADATA, DEMO_SERVICE

__all__ = ["Call", "ClientProcess", "main"]


def _identity(data: bytes) -> bytes:
    return data


async def _call_loop(
    channel: grpc.aio.Channel,
    target: str,
    index: int,
    method: str,
    client: str,
    interval: float,
    log: bool,
    stop: asyncio.Event,
) -> None:
    path = f"/{DEMO_SERVICE}/{method}"
    who = channel.unary_unary(path, request_serializer=_identity, response_deserializer=_identity)
    metadata = ((CLIENT_METADATA, f"{client}/{target}/{index}"),)
    next_at = time.monotonic()
    while not stop.is_set():
        record: dict[str, object] = {"target": target, "channel": index, "method": method}
        try:
            answer = await who(b"", timeout=2.0, metadata=metadata)
            record["server"] = answer.decode()
        except grpc.aio.AioRpcError as exc:
            record["error"] = exc.code().name
            record["detail"] = exc.details() or ""
        record["t"] = time.time()
        if log:
            sys.stdout.write(json.dumps(record) + "\n")
            sys.stdout.flush()
        next_at += interval
        delay = next_at - time.monotonic()
        if delay < 0:
            next_at = time.monotonic()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(delay, 0))


async def _run(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    client = args.name or f"pid{os.getpid()}"
    # --plain: dial the targets as given (a host:port, e.g. an Envoy listener), not over xDS.
    dial = (lambda t: t) if args.plain else (lambda t: f"xds:///{t}")
    channels = [grpc.aio.insecure_channel(dial(t)) for t in args.target for _ in range(args.channels)]
    interval = 1.0 / args.rate if args.rate > 0 else 0.0
    methods = args.method or ["Who"]
    tasks = [
        asyncio.create_task(
            _call_loop(channels[i * args.channels + c], t, c, m, client, interval, not args.quiet, stop)
        )
        for i, t in enumerate(args.target)
        for c in range(args.channels)
        for m in methods
    ]
    if args.duration:
        loop.call_later(args.duration, stop.set)
    await stop.wait()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close()


@dataclass(frozen=True, slots=True)
class Call:
    """One call as the client process reported it."""

    t: float
    target: str
    channel: int
    server: str | None
    error: str | None = None
    detail: str = ""
    method: str = "Who"


class ClientProcess:
    """`python -m lab.grpcclient` as a subprocess, its calls collected as they are printed."""

    def __init__(
        self,
        bootstrap: str | Path | None,
        targets: Sequence[str],
        *,
        rate: float = 20.0,
        channels: int = 1,
        name: str | None = None,
        quiet: bool = False,
        plain: bool = False,
        methods: Sequence[str] = (),
    ) -> None:
        self.bootstrap = None if bootstrap is None else str(bootstrap)
        self.plain = plain
        self.methods = tuple(methods)
        self.targets = tuple(targets)
        self.rate = rate
        self.channels = channels
        self.name = name
        self.quiet = quiet
        self.calls: list[Call] = []
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        argv = [sys.executable, "-m", "lab.grpcclient", "--rate", str(self.rate), "--channels", str(self.channels)]
        for target in self.targets:
            argv += ["--target", target]
        for method in self.methods:
            argv += ["--method", method]
        if self.name:
            argv += ["--name", self.name]
        if self.quiet:
            argv.append("--quiet")
        if self.plain:
            argv.append("--plain")
        env = dict(os.environ)
        if self.bootstrap is not None:
            env["GRPC_XDS_BOOTSTRAP"] = self.bootstrap
        self._proc = await asyncio.create_subprocess_exec(
            *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        self._reader = asyncio.create_task(self._read(self._proc))

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for line in proc.stdout:
            with contextlib.suppress(ValueError, KeyError):
                d = json.loads(line)
                self.calls.append(
                    Call(
                        d["t"],
                        d["target"],
                        d["channel"],
                        d.get("server"),
                        d.get("error"),
                        d.get("detail", ""),
                        d.get("method", "Who"),
                    )
                )

    def since(self, t: float, target: str | None = None) -> list[Call]:
        return [c for c in self.calls if c.t >= t and (target is None or c.target == target)]

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._reader is not None:
            # Not `suppress(CancelledError)`: a cancel of this close itself still propagates.
            (outcome,) = await asyncio.gather(self._reader, return_exceptions=True)
            if isinstance(outcome, Exception):
                raise outcome


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.grpcclient", description=__doc__.splitlines()[0])
    parser.add_argument("--target", action="append", required=True, help="service NAME to dial as xds:///NAME")
    parser.add_argument("--bootstrap", help="the gRPC xDS bootstrap file (default: $GRPC_XDS_BOOTSTRAP)")
    parser.add_argument("--rate", type=float, default=10.0, help="calls per second per channel (0: back to back)")
    parser.add_argument("--channels", type=int, default=1, help="channels per target")
    parser.add_argument(
        "--method", action="append", help=f"a method of {DEMO_SERVICE} to call (repeatable; default: Who)"
    )
    parser.add_argument("--name", help=f"how this client names itself to servers ({CLIENT_METADATA})")
    parser.add_argument("--duration", type=float, default=0.0, help="stop after this many seconds (0: on SIGTERM)")
    parser.add_argument("--quiet", action="store_true", help="do not print a line per call")
    parser.add_argument("--plain", action="store_true", help="dial each target as given (HOST:PORT), not xds:///")
    args = parser.parse_args(argv)
    if args.bootstrap:
        os.environ["GRPC_XDS_BOOTSTRAP"] = args.bootstrap
    if not args.plain and not os.environ.get("GRPC_XDS_BOOTSTRAP"):
        parser.error("give --bootstrap or set GRPC_XDS_BOOTSTRAP (see `healthplane bootstrap --grpc`)")
    asyncio.run(_run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
