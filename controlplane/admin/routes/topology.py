"""Admin routes that change the topology: `PUT /topology` (a whole new document) and
`POST /topology/reload` (re-read the file). Both need the change token; nothing changes on any error."""

from __future__ import annotations

import json

from aiohttp import web

from controlplane.admin.auth import authorize_change
from controlplane.admin.http import control_plane, error_response, json_response, who
from controlplane.errors import ConfigError, StoreUnavailable
from controlplane.store.changes import TopologyChange
from controlplane.store.fleet import ignored_local_keys
from controlplane.topology.model import restart_only_changes
from controlplane.topology.parse import parse_topology, parse_topology_text

SOURCE = "admin API"


async def reload_topology(request: web.Request) -> web.Response:
    if (denied := authorize_change(request)) is not None:
        return denied
    cp = control_plane(request)
    try:
        snap = cp.reload(who=who(request))
    except ConfigError as exc:
        return error_response(400, str(exc), exc.path)
    return json_response({"version": (snap or cp.snapshot).version})


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
    shared = cp.store.shared
    # With a shared store only the fleet's part is written; each replica keeps its own settings.
    if not shared and (changed := restart_only_changes(cp.topology.controlplane, topology.controlplane)):
        fixed = changed[0]
        return error_response(
            400, f"{fixed} cannot change while running (restart the control plane to apply it)", fixed
        )
    by = who(request)
    try:
        snap = await cp.store.submit(TopologyChange(topology, by, f"PUT /topology by {by}"))
    except ConfigError as exc:
        return error_response(400, str(exc), exc.path or "body")
    except StoreUnavailable as exc:
        return error_response(503, str(exc), "store")
    answer = {
        "version": (snap or cp.snapshot).version,
        "clusters": len(topology.clusters),
        "endpoints": sum(len(c.endpoints) for c in topology.clusters),
        "listeners": len(topology.listeners),
    }
    if shared:
        answer["local_settings_not_shared"] = ignored_local_keys(topology.document)
    return json_response(answer)
