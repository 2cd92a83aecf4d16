"""The operator admin API (aiohttp): snapshots, nodes, endpoint health, overrides, events.

Reads answer JSON. Changes answer JSON too, and errors are 4xx JSON bodies naming the
problem: `{"error": "...", "field": "..."}`. Changes need `Authorization: Bearer TOKEN` when a
token is set (environment variable HEALTHPLANE_ADMIN_TOKEN).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from aiohttp import web

from controlplane.admin.api import add_routes, readiness
from controlplane.admin.api import who as who_of
from controlplane.admin.auth import authorize_change, guard
from controlplane.admin.faults import add_fault_routes
from controlplane.admin.http import CP_KEY, ControlPlaneView, error_response, json_response
from controlplane.admin.propagation import add_propagation_routes, node_lag
from controlplane.errors import ConfigError
from controlplane.health.store import HealthStatus
from controlplane.observe.metrics import CONTENT_TYPE
from controlplane.observe.nodes import node_view
from controlplane.snapshots import resources as rs

if TYPE_CHECKING:
    from controlplane.admin.tls import AdminCertificate

CERTIFICATE_KEY: web.AppKey[AdminCertificate] = web.AppKey("admin_certificate")


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.content_type != "application/json":
            return error_response(exc.status, exc.reason)
        raise


def _split_endpoint(text: str) -> tuple[str, int] | None:
    host, sep, port = text.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()):
        return None
    return host.strip("[]"), int(port)


async def snapshot(request: web.Request) -> web.Response:
    cp = request.app[CP_KEY]
    snap = cp.snapshot
    now = time.time()
    clusters = []
    # One pass over the served endpoints (a scan per endpoint took 1.5 s at 10,000: bench/admin.py).
    served_status = {(v.cluster, v.address, v.port): v.status for v in snap.endpoints}
    for cluster in snap.topology.clusters:
        endpoints = []
        for ep in cluster.endpoints:
            h = cp.health.effective(cluster.name, ep.key)
            served = served_status.get((cluster.name, ep.address, ep.port), HealthStatus.UNKNOWN)
            endpoints.append(
                {
                    "address": ep.address,
                    "port": ep.port,
                    "zone": ep.zone,
                    "weight": ep.weight,
                    "status": served.name,
                    "reason": h.reason,
                    "source": h.source,
                    "since": h.since or None,
                    "verdict_age_s": round(now - h.verdict.time, 3) if h.verdict else None,
                    "override": h.override.status.name if h.override else None,
                }
            )
        clusters.append(
            {
                "name": cluster.name,
                "version": snap.resources[rs.ENDPOINT][cluster.name].version,
                "endpoints": endpoints,
            }
        )
    return json_response(
        {
            "version": snap.version,
            "created": snap.created,
            "probers": _probers(cp),
            "cause": {"kind": snap.cause.kind, "detail": snap.cause.detail, "time": snap.cause.time},
            "type_versions": {rs.SHORT_NAMES[t]: v for t, v in snap.type_versions.items()},
            "clusters": clusters,
            "listeners": [
                {
                    "name": ln.name,
                    "address": ln.address,
                    "port": ln.port,
                    "nodes": ln.nodes,
                    "version": snap.resources[rs.LISTENER][ln.name].version,
                }
                for ln in snap.topology.listeners
            ],
        }
    )


def _probers(cp: ControlPlaneView) -> dict[str, Any]:
    """Where verdicts come from now: the embedded prober, connected probers, or nobody."""
    remote = [r.to_json() for r in cp.prober_link.probers.values()]
    local = cp.local_prober
    connected = (local is not None and local.running) or any(r["connected"] for r in remote)
    return {
        "embedded": local is not None,
        "remote": remote,
        "connected": connected,
        "note": "" if connected else "no prober connected: the last verdicts are kept as they were",
    }


async def probers(request: web.Request) -> web.Response:
    return json_response(_probers(request.app[CP_KEY]))


async def nodes(request: web.Request) -> web.Response:
    cp = request.app[CP_KEY]
    snap = cp.snapshot
    return json_response(
        {
            "version": snap.version,
            "nodes": [
                {**node_view(s, snap), "lag": node_lag(cp, s.node_key)}
                for s in sorted(cp.nodes.streams(), key=lambda s: s.node_key)
            ],
            "disconnected": [{"id": n, "since": t} for n, t in sorted(cp.nodes.disconnected.items())],
        }
    )


async def node(request: web.Request) -> web.Response:
    cp = request.app[CP_KEY]
    stream = cp.nodes.get(request.match_info["node_id"])
    if stream is None:
        return error_response(404, f"no connected node {request.match_info['node_id']!r}", "node_id")
    return json_response({**node_view(stream, cp.snapshot), "lag": node_lag(cp, stream.node_key)})


async def override(request: web.Request) -> web.Response:
    if (denied := authorize_change(request)) is not None:
        return denied
    cp = request.app[CP_KEY]
    cluster = request.match_info["cluster"]
    parsed = _split_endpoint(request.match_info["endpoint"])
    if parsed is None:
        return error_response(400, "endpoint must be ADDRESS:PORT", "endpoint")
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return error_response(400, 'body must be JSON such as {"status": "UNHEALTHY"}', "body")
    if not isinstance(body, dict) or not isinstance(body.get("status"), str):
        return error_response(400, 'body needs "status": HEALTHY, UNHEALTHY, DRAINING, DEGRADED or auto', "status")
    text = body["status"]
    status: HealthStatus | None
    if text.lower() == "auto":
        status = None
    else:
        try:
            status = HealthStatus.parse(text)
        except ValueError as exc:
            return error_response(400, f"{exc}, or auto", "status")
    who = who_of(request, body)
    endpoint = f"{parsed[0]}:{parsed[1]}"
    try:
        snap = cp.set_override(cluster, endpoint, status, who=who)
    except ConfigError as exc:
        return error_response(404, exc.message, exc.path)
    h = cp.health.effective(cluster, endpoint)
    return json_response(
        {
            "cluster": cluster,
            "endpoint": endpoint,
            "status": h.status.name,
            "override": h.override.status.name if h.override else None,
            "version": (snap or cp.snapshot).version,
            "changed": snap is not None,
        }
    )


async def reload_topology(request: web.Request) -> web.Response:
    if (denied := authorize_change(request)) is not None:
        return denied
    cp = request.app[CP_KEY]
    try:
        snap = cp.reload(who=who_of(request))
    except ConfigError as exc:
        return error_response(400, str(exc), exc.path)
    return json_response({"version": (snap or cp.snapshot).version})


async def events(request: web.Request) -> web.Response:
    cp = request.app[CP_KEY]
    try:
        limit = int(request.query.get("limit", "100"))
    except ValueError:
        return error_response(400, "limit must be an integer", "limit")
    kind = request.query.get("kind")
    return json_response({"events": [e.to_json() for e in cp.events.recent(max(1, min(limit, 10_000)), kind)]})


async def metrics(request: web.Request) -> web.Response:
    cp = request.app[CP_KEY]
    return web.Response(body=cp.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    cp = request.app[CP_KEY]
    waiting = readiness(cp)
    if waiting:
        return web.json_response({"status": "not ready", "waiting_for": waiting}, status=503)
    return json_response({"status": "ready", "version": cp.snapshot.version})


def create_admin_app(cp: ControlPlaneView) -> web.Application:
    limit = cp.topology.controlplane.security.admin_max_request_bytes
    app = web.Application(middlewares=[_errors, guard], client_max_size=limit)
    app[CP_KEY] = cp
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/snapshot", snapshot)
    app.router.add_get("/nodes", nodes)
    app.router.add_get("/probers", probers)
    app.router.add_get("/nodes/{node_id}", node)
    app.router.add_get("/events", events)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/endpoints/{cluster}/{endpoint}/override", override)
    app.router.add_post("/topology/reload", reload_topology)
    add_routes(app)
    add_fault_routes(app)
    add_propagation_routes(app)
    return app


async def start_admin(cp: ControlPlaneView, address: str, port: int) -> tuple[web.AppRunner, int]:
    """Serve the admin API; returns the runner and the bound port."""
    from controlplane.admin.tls import ADMIN_CERT_POLL, AdminCertificate

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
            with contextlib.suppress(asyncio.CancelledError):
                await task

        app.cleanup_ctx.append(watch_certificate)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, address, port, ssl_context=ssl_context)
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
