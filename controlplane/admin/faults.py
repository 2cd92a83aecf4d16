"""Admin routes for faults (issue 7, part A): alarms, accepting a held mass failure, NACK groups.

- `GET /alarms`: active and recently resolved alarms.
- `POST /alarms/{id}/accept`: apply the failures a mass_failure alarm held (bearer token).
- `GET /nacks`: NACKs grouped by rejected version, with the change that made the version.
- `DELETE /probers/{id}`: forget a disconnected prober for good (bearer token).
"""

from __future__ import annotations

import json

from aiohttp import web

from controlplane.admin.api import who
from controlplane.admin.auth import authorize_change
from controlplane.admin.http import CP_KEY, error_response, json_response
from controlplane.errors import ConfigError


async def alarms(request: web.Request) -> web.Response:
    faults = request.app[CP_KEY].admission
    return json_response(
        {
            "active": [a.to_json() for a in faults.alarms.active()],
            "alarms": [a.to_json() for a in faults.alarms.all()],
            "held": {c: sorted(vs) for c, vs in sorted(faults.guard.held.items())},
        }
    )


async def accept_alarm(request: web.Request) -> web.Response:
    if (denied := authorize_change(request)) is not None:
        return denied
    cp = request.app[CP_KEY]
    text = request.match_info["id"]
    if not (text.isascii() and text.isdigit()):
        return error_response(400, "alarm id must be an integer", "id")
    body = None
    if request.can_read_body:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error_response(400, 'body must be JSON such as {"who": "alice"}, or empty', "body")
    try:
        alarm, snapshot = cp.accept_alarm(int(text), who=who(request, body))
    except ConfigError as exc:
        status = 404 if cp.admission.alarms.get(int(text)) is None else 409
        return error_response(status, exc.message, exc.path)
    return json_response(
        {"alarm": alarm.to_json(), "version": (snapshot or cp.snapshot).version, "changed": snapshot is not None}
    )


async def forget_prober(request: web.Request) -> web.Response:
    if (denied := authorize_change(request)) is not None:
        return denied
    cp = request.app[CP_KEY]
    prober_id = request.match_info["id"]
    try:
        snapshot = cp.forget_prober(prober_id, who=who(request))
    except ConfigError as exc:
        link = cp.prober_link
        known = link is not None and prober_id in link.probers
        return error_response(409 if known else 404, exc.message, exc.path)
    return json_response(
        {"forgotten": prober_id, "version": (snapshot or cp.snapshot).version, "changed": snapshot is not None}
    )


async def nacks(request: web.Request) -> web.Response:
    cp = request.app[CP_KEY]
    return json_response({"version": cp.snapshot.version, "rejected": cp.nacks.to_json()})


def add_fault_routes(app: web.Application) -> None:
    app.router.add_get("/alarms", alarms)
    app.router.add_post("/alarms/{id}/accept", accept_alarm)
    app.router.add_get("/nacks", nacks)
    app.router.add_delete("/probers/{id}", forget_prober)
