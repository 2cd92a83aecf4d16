"""Admin routes for the connected Envoys: `/nodes` (and the recently disconnected) and `/nodes/{node_id}`,
each with its propagation lag."""

from __future__ import annotations

from aiohttp import web

from controlplane.admin.http import control_plane, error_response, json_response
from controlplane.admin.routes.propagation import node_lag
from controlplane.observe.nodes import node_view


async def nodes(request: web.Request) -> web.Response:
    cp = control_plane(request)
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
    cp = control_plane(request)
    stream = cp.nodes.get(request.match_info["node_id"])
    if stream is None:
        return error_response(404, f"no connected node {request.match_info['node_id']!r}", "node_id")
    return json_response({**node_view(stream, cp.snapshot), "lag": node_lag(cp, stream.node_key)})
