"""`GET /replicas` (issue 17): every replica sharing this one's store, its version and the digest of
the EDS content it serves, and whether they all agree. Without a store: this replica alone."""

from __future__ import annotations

from aiohttp import web

from controlplane.admin.http import control_plane, json_response
from controlplane.store.replicas import replicas_view


async def replicas(request: web.Request) -> web.Response:
    cp = control_plane(request)
    store = cp.store
    return json_response(
        replicas_view(
            store.replicas(),
            cp.replica_record(),
            store="etcd" if store.shared else "local",
            problems=store.problems(),
        )
    )
