"""The demo app of the classic Envoy health-check demo, with probe counters for benchmarks.

    python -m lab.demoapp --host 127.0.0.1 --port 8080 --name demo-1

GET /livez and /readyz answer 200 `OK` until a POST stores another value; then 506 and 507.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from aiohttp import web

__all__ = ["DemoApp", "DemoState", "create_app", "main"]

HEALTHY = "OK"
# Status codes of the original demo: distinct, so a probe log shows which check failed.
LIVEZ_FAIL_STATUS = 506
READYZ_FAIL_STATUS = 507
HEALTH_PATHS = ("/livez", "/readyz")


@dataclass
class DemoState:
    """What the app serves and counts; shared by the handlers of one application."""

    name: str
    livez: str = HEALTHY
    readyz: str = HEALTHY
    host: str | None = None
    port: int | None = None
    served: int = 0
    health_checks: dict[str, int] = field(default_factory=lambda: dict.fromkeys(HEALTH_PATHS, 0))


STATE = web.AppKey("demoapp_state", DemoState)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _peer_ip(request: web.Request) -> str:
    # The socket peer, deliberately not X-Forwarded-For: behind Envoy it shows the proxy hop.
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return str(peer[0]) if peer else "unknown"


def _local_ip(request: web.Request) -> str:
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    return str(sock[0]) if sock else "unknown"


async def _root(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.served += 1
    return web.Response(
        text=(f"demoapp !! ClientIP: {_peer_ip(request)}, ServerName: {state.name}, ServerIP: {_local_ip(request)}\n")
    )


async def _hostname(request: web.Request) -> web.Response:
    return web.Response(text=f"ServerName: {request.app[STATE].name}\n")


def _health_getter(key: str, fail_status: int) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        state = request.app[STATE]
        state.health_checks[request.path] = state.health_checks.get(request.path, 0) + 1
        value: str = getattr(state, key)
        return web.Response(text=value, status=200 if value == HEALTHY else fail_status)

    return handler


def _health_setter(key: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        form = await request.post()
        value = form.get(key)
        if not isinstance(value, str) or not value:
            raise web.HTTPBadRequest(text=f"missing form field {key!r}: POST {key}=OK (healthy) or any other value\n")
        setattr(request.app[STATE], key, value)
        return web.Response(text=value)

    return handler


async def _configs(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(
        {
            "name": state.name,
            "host": state.host,
            "port": state.port,
            "livez": state.livez,
            "readyz": state.readyz,
            "served": state.served,
            "health_checks": dict(state.health_checks),
        }
    )


def create_app(name: str) -> web.Application:
    """The demo application; its DemoState is `app[STATE]`."""
    app = web.Application()
    app[STATE] = DemoState(name=name)
    app.router.add_get("/", _root)
    app.router.add_get("/hostname", _hostname)
    app.router.add_get("/livez", _health_getter("livez", LIVEZ_FAIL_STATUS))
    app.router.add_get("/readyz", _health_getter("readyz", READYZ_FAIL_STATUS))
    app.router.add_post("/livez", _health_setter("livez"))
    app.router.add_post("/readyz", _health_setter("readyz"))
    app.router.add_get("/configs", _configs)
    return app


class DemoApp:
    """A running demo app on a real socket: start() returns the bound port; async with."""

    def __init__(
        self,
        name: str | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        access_log: bool = False,
    ) -> None:
        self.app = create_app(name or socket.gethostname())
        self._host = host
        self._port = port
        self._access_log = access_log
        self._runner: web.AppRunner | None = None

    @property
    def state(self) -> DemoState:
        """Live state and counters (mutable: tests may flip livez/readyz directly)."""
        return self.app[STATE]

    @property
    def name(self) -> str:
        """The ServerName this app reports."""
        return self.state.name

    @property
    def host(self) -> str:
        """The address the app listens on."""
        return self.state.host or self._host

    @property
    def port(self) -> int:
        """The bound port; only known after start()."""
        if self.state.port is None:
            raise RuntimeError(f"demoapp {self.name} has not been started")
        return self.state.port

    @property
    def url(self) -> str:
        """`http://host:port` of the running app."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def served(self) -> int:
        """Requests served on `/`."""
        return self.state.served

    @property
    def health_checks(self) -> dict[str, int]:
        """GET requests received per health path (`/livez`, `/readyz`)."""
        return self.state.health_checks

    async def start(self, host: str | None = None, port: int | None = None) -> int:
        """Listen on host:port (port 0 picks a free one) and return the bound port.

        Allowed again after stop(), e.g. on the same port to play a restarted backend."""
        if self._runner is not None:
            raise RuntimeError(f"demoapp {self.name} already started")
        host = self._host if host is None else host
        port = self._port if port is None else port
        # access_log=None turns aiohttp's per-request log off; tests and benchmarks want quiet.
        runner = web.AppRunner(self.app) if self._access_log else web.AppRunner(self.app, access_log=None)
        await runner.setup()
        self._runner = runner
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await self.stop()
            raise
        bound: Any = runner.addresses[0]
        self.state.host, self.state.port = host, int(bound[1])
        return self.state.port

    async def stop(self) -> None:
        """Close the listener and open connections; safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    aclose = stop

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lab.demoapp", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (0: any free)")
    parser.add_argument("--name", default=None, help="ServerName to report (default: hostname)")
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with DemoApp(args.name, host=args.host, port=args.port, access_log=True) as app:
        # Printed so a script that asked for port 0 can learn the real one.
        print(f"demoapp {app.name} listening on {app.url}", flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `python -m lab.demoapp`."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
