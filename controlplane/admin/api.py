"""The admin API's inspection and change routes beyond the first ones in `controlplane.admin.app`.

Snapshot history and diffs, `/endpoints` with filters, the status page (`/status`, HTML, CSV or
JSON), live events as server-sent events, `PUT /topology`, and `/openapi.json`. The data comes
from pure functions in `controlplane.admin.views`; these handlers only choose inputs and encode.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

from controlplane.admin.auth import authorize_change
from controlplane.admin.http import ControlPlaneView, control_plane, error_response, json_response
from controlplane.admin.views import (
    CheckLookup,
    endpoint_rows,
    parse_status_filter,
    snapshot_detail,
    snapshot_diff,
    snapshot_summary,
    status_csv,
    status_html,
    status_json,
    status_rows,
)
from controlplane.errors import ConfigError
from controlplane.events import Event
from controlplane.health.checks import CheckInfo
from controlplane.topology.model import restart_only_changes
from controlplane.topology.parse import parse_topology, parse_topology_text

SOURCE = "admin API"
WHO_HEADER = "X-Healthplane-Who"
SSE_KEEPALIVE = 15.0  # a comment line this often keeps proxies from closing a quiet stream
SSE_POLL = 0.5  # how often a quiet stream looks whether its client or the server is going away
CLOSING: web.AppKey[asyncio.Event] = web.AppKey("closing")


def who(request: web.Request, body: Any = None) -> str:
    """Who makes a change: the X-Healthplane-Who header, else the body's "who", else the peer address."""
    named = request.headers.get(WHO_HEADER, "").strip()
    if not named and isinstance(body, dict) and isinstance(body.get("who"), str):
        named = body["who"].strip()
    peer = request.remote or "unknown"
    return f"{named[:100]} ({peer})" if named else peer


# --------------------------------------------------------------------------- check details


def check_lookup(cp: ControlPlaneView) -> CheckLookup:
    """A function (cluster, endpoint) -> CheckInfo | None from the local prober or remote probers."""
    local = cp.local_prober
    remote: dict[tuple[str, str], CheckInfo] = cp.prober_link.checks

    def lookup(cluster: str, endpoint: str) -> CheckInfo | None:
        if local is not None:
            info = local.check_info(cluster, endpoint)
            if info is not None:
                return info
        return remote.get((cluster, endpoint))

    return lookup


def _rows(request: web.Request) -> list[dict[str, Any]] | web.Response:
    cp = control_plane(request)
    try:
        status = parse_status_filter(request.query.get("status"))
    except ValueError as exc:
        return error_response(400, str(exc), "status")
    cluster = request.query.get("cluster") or None
    if cluster is not None and cp.snapshot.topology.cluster(cluster) is None:
        return error_response(404, f"no cluster named {cluster!r}", "cluster")
    return endpoint_rows(cp.snapshot, cp.health.effective, check_lookup(cp), cluster=cluster, status=status)


def readiness(cp: ControlPlaneView) -> list[str]:
    """Why the control plane is not ready yet (empty: ready).

    Ready once the first full snapshot exists and, when a prober is configured, its first full
    state has arrived: the embedded prober has checked every endpoint once, or (with
    `serve --no-prober`, or without an embedded prober once any remote prober has connected) a
    connected remote prober free of a staleness alarm has sent its full state.
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
    if local is not None and not cp.expect_remote_prober:
        return waiting
    remote = list(cp.prober_link.probers.values())
    if not remote and not cp.expect_remote_prober:
        return waiting
    stale = cp.admission.alarms.active("prober_stale")
    stale_ids = {a.subject for a in stale}
    if not any(r.connected and r.full_state_at is not None and r.prober_id not in stale_ids for r in remote):
        if not any(r.connected and r.full_state_at is not None for r in remote):
            waiting.append("no connected remote prober has sent its full state")
        waiting.extend(f"alarm {a.id}: {a.message}" for a in stale)  # issue 7a
    return waiting


# --------------------------------------------------------------------------- reads


async def endpoints(request: web.Request) -> web.Response:
    rows = _rows(request)
    if isinstance(rows, web.Response):
        return rows
    return json_response({"version": control_plane(request).snapshot.version, "endpoints": rows})


async def status_page(request: web.Request) -> web.Response:
    fmt = request.query.get("format", "html").lower()
    if fmt not in ("html", "csv", "json"):
        return error_response(400, "format must be html, csv or json", "format")
    try:
        refresh = int(request.query.get("refresh", "5"))
    except ValueError:
        return error_response(400, "refresh must be a whole number of seconds", "refresh")
    if not 0 <= refresh <= 3600:
        return error_response(400, "refresh must be 0..3600 seconds", "refresh")
    rows = _rows(request)
    if isinstance(rows, web.Response):
        return rows
    flat = status_rows(rows)
    version = control_plane(request).snapshot.version
    if fmt == "json":
        return json_response(status_json(flat, version))
    if fmt == "csv":
        return web.Response(text=status_csv(flat), content_type="text/csv")
    return web.Response(text=status_html(flat, version=version, refresh=refresh), content_type="text/html")


async def snapshots(request: web.Request) -> web.Response:
    cp = control_plane(request)
    try:
        limit = int(request.query.get("limit", str(cp.cache.history_limit)))
    except ValueError:
        return error_response(400, "limit must be an integer", "limit")
    history = cp.cache.history[-max(1, limit) :]
    return json_response(
        {
            "current": cp.snapshot.version,
            "kept": cp.cache.history_limit,
            "snapshots": [snapshot_summary(s) for s in reversed(history)],
        }
    )


def _find(cp: ControlPlaneView, version: str, field: str) -> Any:
    snap = cp.cache.find(version)
    if snap is None:
        return error_response(404, f"no snapshot {version!r} (only the last {cp.cache.history_limit} are kept)", field)
    return snap


async def snapshot_version(request: web.Request) -> web.Response:
    cp = control_plane(request)
    snap = _find(cp, request.match_info["version"], "version")
    if isinstance(snap, web.Response):
        return snap
    return json_response(snapshot_detail(snap))


async def snapshot_diff_view(request: web.Request) -> web.Response:
    cp = control_plane(request)
    old = _find(cp, request.match_info["a"], "a")
    if isinstance(old, web.Response):
        return old
    new = _find(cp, request.match_info["b"], "b")
    if isinstance(new, web.Response):
        return new
    return json_response(snapshot_diff(old, new))


def _event_filter(request: web.Request) -> tuple[str | None, int]:
    kind = request.query.get("kind") or None
    last = request.headers.get("Last-Event-ID") or request.query.get("since") or "0"
    try:
        return kind, int(last)
    except ValueError:
        raise web.HTTPBadRequest(reason="Last-Event-ID / since must be an event id") from None


def _sse(event: Event) -> bytes:
    data = json.dumps(event.to_json(), separators=(",", ":"), default=str)
    return f"id: {event.id}\nevent: {event.kind}\ndata: {data}\n\n".encode()


async def events_stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: everything after Last-Event-ID (or ?since=), then new events as they happen."""
    cp = control_plane(request)
    try:
        kind, since = _event_filter(request)
    except web.HTTPBadRequest:
        return error_response(400, "Last-Event-ID (or ?since=) must be an event id", "since")
    queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=10_000)
    dropped = False

    def listener(event: Event) -> None:
        nonlocal dropped
        if kind is None or event.kind == kind:
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                dropped = True

    cancel = cp.events.listen(listener)
    try:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        await response.write(b": healthplane events\n\n")
        if since:
            for event in list(cp.events):
                if event.id > since and (kind is None or event.kind == kind):
                    await response.write(_sse(event))
                    since = event.id
        quiet_since = time.monotonic()
        while not dropped and not request.app[CLOSING].is_set():
            transport = request.transport
            if transport is None or transport.is_closing():
                break  # the client went away
            try:
                async with asyncio.timeout(SSE_POLL):
                    event = await queue.get()
            except TimeoutError:
                if time.monotonic() - quiet_since >= SSE_KEEPALIVE:
                    await response.write(b": keepalive\n\n")
                    quiet_since = time.monotonic()
                continue
            if event.id > since:
                await response.write(_sse(event))
                quiet_since = time.monotonic()
        # A reader too slow for 10,000 events is cut off; it reconnects with Last-Event-ID.
        return response
    finally:
        cancel()


# --------------------------------------------------------------------------- changes


async def put_topology(request: web.Request) -> web.Response:
    """Serve a whole new topology, validated exactly as the file is; nothing changes on any error."""
    if (denied := authorize_change(request)) is not None:
        return denied
    cp = control_plane(request)
    raw = await request.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return error_response(400, "body must be UTF-8 JSON or YAML", "body")
    if not text.strip():
        return error_response(400, "body must be a topology document (JSON or YAML)", "body")
    try:
        if request.content_type == "application/json":
            try:
                document = json.loads(text)
            except json.JSONDecodeError as exc:
                return error_response(400, f"invalid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}", "body")
            except (ValueError, RecursionError) as exc:  # an integer past 4,300 digits, nesting past the stack
                return error_response(400, f"invalid JSON: {exc}", "body")
            topology = parse_topology(document, source=SOURCE)
        else:
            topology = parse_topology_text(text, source=SOURCE)
    except ConfigError as exc:
        by = who(request)
        cp.events.record(
            "topology_rejected", f"PUT /topology by {by} rejected: {exc}", error=str(exc), who=by, what="PUT /topology"
        )
        return error_response(400, exc.message, exc.path or "body")
    if changed := restart_only_changes(cp.topology.controlplane, topology.controlplane):
        fixed = changed[0]
        return error_response(
            400, f"{fixed} cannot change while running (restart the control plane to apply it)", fixed
        )
    by = who(request)
    snap = cp.update_topology(topology, detail=f"PUT /topology by {by}", who=by)
    return json_response(
        {
            "version": (snap or cp.snapshot).version,
            "clusters": len(topology.clusters),
            "endpoints": sum(len(c.endpoints) for c in topology.clusters),
            "listeners": len(topology.listeners),
        }
    )


async def openapi(request: web.Request) -> web.Response:
    from controlplane.admin.openapi import document

    return json_response(document())


async def _closing(app: web.Application) -> None:
    app[CLOSING].set()


def add_routes(app: web.Application) -> None:
    app[CLOSING] = asyncio.Event()
    app.on_shutdown.append(_closing)
    app.router.add_get("/endpoints", endpoints)
    app.router.add_get("/status", status_page)
    app.router.add_get("/snapshots", snapshots)
    app.router.add_get("/snapshots/{version}", snapshot_version)
    app.router.add_get("/snapshots/{a}/diff/{b}", snapshot_diff_view)
    app.router.add_get("/events/stream", events_stream)
    app.router.add_put("/topology", put_topology)
    app.router.add_get("/openapi.json", openapi)
