"""Admin routes for how the control plane is doing: the status page (`/status`, HTML, CSV or
JSON as nginx's check_status), the probes `/healthz` and `/readyz`, and `/metrics`."""

from __future__ import annotations

from aiohttp import web

from controlplane.admin.http import (
    MAX_REFRESH,
    ControlPlaneView,
    control_plane,
    error_response,
    json_response,
    query_int,
)
from controlplane.admin.routes.endpoints import filtered_rows
from controlplane.admin.views import status_csv, status_html, status_json, status_rows
from controlplane.observe.metrics import CONTENT_TYPE
from controlplane.topology.model import Topology


def has_health_checks(topology: Topology) -> bool:
    """Whether any endpoint of `topology` has a health check (something for a prober to do)."""
    return any(ep.health_check is not None for c in topology.clusters for ep in c.endpoints)


def readiness(cp: ControlPlaneView) -> list[str]:
    """Why the control plane is not ready yet (empty: ready).

    Ready once the first full snapshot exists and, when a prober is configured, its first full
    state has arrived: the embedded prober has checked every endpoint once, or (with
    `serve --no-prober`, or without an embedded prober once any remote prober has connected) a
    connected remote prober free of a staleness alarm has sent its full state. A topology without
    health checks waits for no prober: nothing to check.
    """
    waiting: list[str] = []
    if cp.cache.current() is None:
        waiting.append("no snapshot yet")
    local = cp.local_prober
    if local is not None and not local.running:
        waiting.append("embedded prober not started yet")
    elif local is not None and (unchecked := local.unchecked()):
        waiting.append(f"embedded prober: {unchecked} endpoints not checked yet")
    # Remote probers count only where they are the source of health (no embedded prober, or
    # `serve --no-prober`), and then one current prober is enough: anyone who can open the
    # prober link (without mTLS, anyone reaching the xDS port) must not hold readiness hostage
    # by saying hello and leaving (issue 19). Their staleness alarms stay visible in /alarms.
    # A topology without health checks waits for no prober: nothing to check (issue 18).
    if local is not None and not cp.expect_remote_prober:
        return waiting
    remote = list(cp.prober_link.probers.values())
    if not remote and not cp.expect_remote_prober:
        return waiting
    stale = cp.admission.alarms.active("prober_stale")
    stale_ids = {a.subject for a in stale}
    if not any(r.connected and r.full_state_at is not None and r.prober_id not in stale_ids for r in remote):
        full_state = any(r.connected and r.full_state_at is not None for r in remote)
        if not full_state and has_health_checks(cp.topology):
            waiting.append("no connected remote prober has sent its full state")
        waiting.extend(f"alarm {a.id}: {a.message}" for a in stale)  # issue 7a
    return waiting


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    cp = control_plane(request)
    waiting = readiness(cp)
    if waiting:
        return web.json_response({"status": "not ready", "waiting_for": waiting}, status=503)
    # Serving, but not saving what it serves (issue 19): ready, and says so.
    degraded = [f"alarm {a.id}: {a.message}" for a in cp.admission.alarms.active("persistence")]
    degraded += cp.store.problems()  # etcd unreachable (issue 17): serving the last state
    if degraded:
        return json_response({"status": "degraded", "degraded": degraded, "version": cp.snapshot.version})
    return json_response({"status": "ready", "version": cp.snapshot.version})


async def metrics(request: web.Request) -> web.Response:
    cp = control_plane(request)
    return web.Response(body=cp.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})


async def status_page(request: web.Request) -> web.Response:
    fmt = request.query.get("format", "html").lower()
    if fmt not in ("html", "csv", "json"):
        return error_response(400, "format must be html, csv or json", "format")
    refresh = query_int(request, "refresh", default=5, low=0, high=MAX_REFRESH)
    rows = filtered_rows(request)
    if isinstance(rows, web.Response):
        return rows
    flat = status_rows(rows)
    version = control_plane(request).snapshot.version
    if fmt == "json":
        return json_response(status_json(flat, version))
    if fmt == "csv":
        return web.Response(text=status_csv(flat), content_type="text/csv")
    return web.Response(text=status_html(flat, version=version, refresh=refresh), content_type="text/html")
