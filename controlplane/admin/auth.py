"""The admin API's read token and request-size limit, as one aiohttp middleware.

With `controlplane.admin.read_token` set, every request but the probes (`/healthz`, `/readyz`,
which a kubelet or load balancer calls without credentials) needs `Authorization: Bearer` with
the read token or the change token (`admin.token`). Changes keep needing the change token when
one is set (checked by the change routes); without one, the read token guards them as well.
A body over `controlplane.admin.max_request_bytes` is answered 413 naming that field.
"""

from __future__ import annotations

import asyncio
import hmac
import os
from typing import Any

from aiohttp import web

from controlplane.admin.conns import BODY_TIMEOUT
from controlplane.admin.http import ControlPlaneView, control_plane, error_response

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
READS = frozenset({"GET", "HEAD", "OPTIONS"})
TOKEN_ENV = "HEALTHPLANE_ADMIN_TOKEN"


def _bearer(request: web.Request) -> str:
    given = request.headers.get("Authorization", "")
    return given[7:] if given.startswith("Bearer ") else ""


def _matches(given: str, token: str | None) -> bool:
    # Header text may carry any byte (aiohttp keeps undecodable ones as surrogates): compare the
    # bytes as sent, and a token that cannot be encoded at all matches nothing (not a 500).
    try:
        sent = given.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return bool(token) and hmac.compare_digest(sent, (token or "").encode())


def change_token(cp: ControlPlaneView) -> str:
    """The bearer token changes need: `controlplane.admin.token`, else $HEALTHPLANE_ADMIN_TOKEN ("": none)."""
    return cp.topology.controlplane.admin_token or os.environ.get(TOKEN_ENV, "")


def authorize_change(request: web.Request) -> web.Response | None:
    """None when the request may change something; else the 401 to answer (called by the change routes)."""
    token = change_token(control_plane(request))
    if token and not _matches(_bearer(request), token):
        return error_response(401, "this change needs Authorization: Bearer <token>")
    return None


@web.middleware
async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
    """The read token and the request-size limit (the topology is read per request)."""
    cp = control_plane(request)
    config = cp.topology.controlplane
    read_token = config.security.admin_read_token
    if read_token and request.path not in OPEN_PATHS:
        given = _bearer(request)
        token = change_token(cp)
        if request.method in READS:
            if not (_matches(given, read_token) or _matches(given, token)):
                return error_response(401, "reading needs Authorization: Bearer <read token>", "Authorization")
        elif not token and not _matches(given, read_token):
            return error_response(401, "this change needs Authorization: Bearer <token>", "Authorization")
    try:
        if request.body_exists and request.can_read_body:
            # Read here under a deadline (the handler gets it cached): a half-sent body is dropped.
            try:
                await asyncio.wait_for(request.read(), BODY_TIMEOUT)
            except TimeoutError:
                late = error_response(408, f"request body not received within {BODY_TIMEOUT:g}s", "body")
                late.force_close()  # the rest of that body is not waited for
                return late
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPRequestEntityTooLarge:
        limit = config.security.admin_max_request_bytes
        return error_response(
            413,
            f"request body is over controlplane.admin.max_request_bytes ({limit})",
            "controlplane.admin.max_request_bytes",
        )
