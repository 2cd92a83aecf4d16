"""Admin routes for where verdicts come from and what went wrong: probers, alarms, NACK groups.

- `GET /probers`: the embedded prober and remote probers.
- `DELETE /probers/{id}`: forget a disconnected prober for good (bearer token).
- `GET /alarms`: active and recently resolved alarms.
- `POST /alarms/{id}/accept`: apply the failures a mass_failure alarm held (bearer token).
- `GET /nacks`: NACKs grouped by rejected version, with the change that made the version.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from controlplane.admin.auth import authorize_change
from controlplane.admin.http import ControlPlaneView, control_plane, error_response, json_response, who, whole_number
from controlplane.errors import ConfigError, StoreUnavailable
from controlplane.probers.link import ProberRecord
from controlplane.probers.ownership import Members
from controlplane.store.changes import AcceptChange, ForgetChange


def prober_summary(cp: ControlPlaneView) -> dict[str, Any]:
    """Where verdicts come from now: the embedded prober, connected probers, or nobody; and, when
    probers share the endpoints (issue 17), who shares them and how many each owns."""
    link = cp.prober_link
    ownership = link.ownership
    shares = ownership.counts(cp.topology) if ownership.members else {}
    remote = [link.record_json(r, shares) for r in link.probers.values()]
    local = cp.local_prober
    connected = (local is not None and local.running) or any(r["connected"] for r in remote)
    return {
        "embedded": local is not None,
        "remote": remote,
        "connected": connected,
        "note": "" if connected else "no prober connected: the last verdicts are kept as they were",
        "shards": {"replicas": cp.topology.probers.replicas, "members": list(ownership.members)},
        "membership": members_view(link.members, link.probers, shares),
    }


def members_view(members: Members, records: Mapping[str, ProberRecord], shares: Mapping[str, int]) -> dict[str, Any]:
    """Where the member list comes from (etcd or this replica's links, and why), and with etcd
    the replicas holding each member's link and the members not linked here: their shares'
    verdicts reach this replica only through a link of their own."""
    out: dict[str, Any] = {"source": members.source, "reason": members.reason}
    if members.source == "etcd":
        out["holders"] = {p: list(r) for p, r in members.holders.items()}
        unlinked = [p for p in members.ids if p not in records or not records[p].connected]
        out["not_linked_here"] = unlinked
        if unlinked:
            owned = sum(shares.get(p, 0) for p in unlinked)
            out["note"] = (
                f"{', '.join(unlinked)} share the endpoints (registered in etcd by another replica) but have "
                f"no link to this replica: the {owned} endpoints they check keep their last verdicts here "
                "(link every prober to every replica: healthplane prober --controlplane A --controlplane B ...)"
            )
    return out


async def probers(request: web.Request) -> web.Response:
    return json_response(prober_summary(control_plane(request)))


async def forget_prober(request: web.Request) -> web.Response:
    if (denied := authorize_change(request)) is not None:
        return denied
    cp = control_plane(request)
    prober_id = request.match_info["id"]
    try:
        snapshot = await cp.store.submit(ForgetChange(prober_id, who(request)))
    except ConfigError as exc:
        link = cp.prober_link
        known = link is not None and prober_id in link.probers
        return error_response(409 if known else 404, exc.message, exc.path)
    except StoreUnavailable as exc:
        return error_response(503, str(exc), "store")
    return json_response(
        {"forgotten": prober_id, "version": (snapshot or cp.snapshot).version, "changed": snapshot is not None}
    )


async def alarms(request: web.Request) -> web.Response:
    faults = control_plane(request).admission
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
    cp = control_plane(request)
    alarm_id = whole_number(request.match_info["id"], "alarm id", low=0, field="id")
    body = None
    # body_exists, not can_read_body: the admin guard has read the body already (under its deadline).
    if request.body_exists:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error_response(400, 'body must be JSON such as {"who": "alice"}, or empty', "body")
    try:
        # Checked here (the alarm's id is this replica's); applied by cluster wherever it is held.
        alarm = cp.admission.acceptable(alarm_id)
        snapshot = await cp.store.submit(AcceptChange(alarm.subject, who(request, body)))
    except ConfigError as exc:
        status = 404 if cp.admission.alarms.get(alarm_id) is None else 409
        return error_response(status, exc.message, exc.path)
    except StoreUnavailable as exc:
        return error_response(503, str(exc), "store")
    return json_response(
        {"alarm": alarm.to_json(), "version": (snapshot or cp.snapshot).version, "changed": snapshot is not None}
    )


async def nacks(request: web.Request) -> web.Response:
    cp = control_plane(request)
    return json_response({"version": cp.snapshot.version, "rejected": cp.nacks.to_json()})
