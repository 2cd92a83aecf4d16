"""The operator admin API (aiohttp): the app, its middlewares, the one route table, and `start_admin`.

Reads answer JSON. Changes answer JSON too, and errors are 4xx JSON bodies naming the
problem: `{"error": "...", "field": "..."}`. Changes need `Authorization: Bearer TOKEN` when a
token is set (environment variable HEALTHPLANE_ADMIN_TOKEN). The handlers live in one module
per resource; `ROUTES` below is every path the API answers, and `/openapi.json` documents
exactly these (a test holds the two together).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from controlplane.admin.auth import guard
from controlplane.admin.conns import KEEPALIVE_TIMEOUT, ConnectionLimits, LimitedSite
from controlplane.admin.http import CP_KEY, ControlPlaneView, error_response, json_response
from controlplane.admin.openapi import document
from controlplane.admin.routes import (
    endpoints,
    events,
    faults,
    nodes,
    propagation,
    replicas,
    snapshots,
    status,
    topology,
)
from controlplane.admin.tls import ADMIN_CERT_POLL, AdminCertificate

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

CERTIFICATE_KEY: web.AppKey[AdminCertificate] = web.AppKey("admin_certificate")
LIMITS_KEY: web.AppKey[ConnectionLimits] = web.AppKey("admin_connection_limits")


async def openapi(request: web.Request) -> web.Response:
    return json_response(document())


# Every route the admin API answers: (method, path, handler). GET routes answer HEAD too.
ROUTES: tuple[tuple[str, str, Handler], ...] = (
    # probes and measurements
    ("GET", "/healthz", status.healthz),
    ("GET", "/readyz", status.readyz),
    ("GET", "/metrics", status.metrics),
    ("GET", "/status", status.status_page),
    ("GET", "/openapi.json", openapi),
    # what is served
    ("GET", "/snapshot", snapshots.snapshot),
    ("GET", "/snapshots", snapshots.snapshots),
    ("GET", "/snapshots/{version}", snapshots.snapshot_version),
    ("GET", "/snapshots/{a}/diff/{b}", snapshots.snapshot_diff_view),
    # endpoints and their overrides
    ("GET", "/endpoints", endpoints.endpoints),
    ("POST", "/endpoints/{cluster}/{endpoint}/override", endpoints.override),
    # who is served
    ("GET", "/nodes", nodes.nodes),
    ("GET", "/nodes/{node_id}", nodes.node),
    # the replicas sharing this one's store, and whether they serve the same EDS (issue 17)
    ("GET", "/replicas", replicas.replicas),
    # the topology
    ("PUT", "/topology", topology.put_topology),
    ("POST", "/topology/reload", topology.reload_topology),
    # where verdicts come from, and what went wrong
    ("GET", "/probers", faults.probers),
    ("DELETE", "/probers/{id}", faults.forget_prober),
    ("GET", "/alarms", faults.alarms),
    ("POST", "/alarms/{id}/accept", faults.accept_alarm),
    ("GET", "/nacks", faults.nacks),
    # the event log
    ("GET", "/events", events.events),
    ("GET", "/events/stream", events.events_stream),
    # propagation
    ("GET", "/versions", propagation.versions),
    ("GET", "/versions/{version}", propagation.version),
    ("GET", "/propagation", propagation.propagation_page),
)


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.content_type != "application/json":
            return error_response(exc.status, exc.reason)
        raise


def create_admin_app(cp: ControlPlaneView) -> web.Application:
    limit = cp.topology.controlplane.security.admin_max_request_bytes
    app = web.Application(middlewares=[_errors, guard], client_max_size=limit)
    app[CP_KEY] = cp
    app[events.CLOSING] = asyncio.Event()
    app.on_shutdown.append(events.close_streams)
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    return app


async def start_admin(cp: ControlPlaneView, address: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve the admin API; returns the runner and the bound port."""
    tls = cp.topology.controlplane.security.admin_tls
    app = create_admin_app(cp)
    ssl_context = None
    if tls is not None:
        certificate = AdminCertificate(tls)
        ssl_context = certificate.context
        app[CERTIFICATE_KEY] = certificate

        async def watch_certificate(app: web.Application) -> AsyncIterator[None]:
            async def poll() -> None:
                while True:
                    await asyncio.sleep(ADMIN_CERT_POLL)  # a timer: file renewals come with no event
                    certificate.check()

            task = asyncio.create_task(poll())
            yield
            task.cancel()
            # Not `suppress(CancelledError)`: a cancel of the cleanup itself still propagates.
            (outcome,) = await asyncio.gather(task, return_exceptions=True)
            if isinstance(outcome, Exception):
                raise outcome

        app.cleanup_ctx.append(watch_certificate)
    # Connection cap, header deadline and a short keep-alive (admin/conns.py, issue 19).
    limits = ConnectionLimits()
    app[LIMITS_KEY] = limits
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=KEEPALIVE_TIMEOUT)
    await runner.setup()
    site = LimitedSite(runner, address, port, ssl_context=ssl_context, limits=limits)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    bound = port
    for addr in runner.addresses:
        bound = addr[1]
        break
    return runner, bound
