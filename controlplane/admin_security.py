"""The admin API's read token and request-size limit, as one aiohttp middleware.

With `controlplane.admin.read_token` set, every request but the probes (`/healthz`, `/readyz`,
which a kubelet or load balancer calls without credentials) needs `Authorization: Bearer` with
the read token or the change token (`admin.token`). Changes keep needing the change token when
one is set (checked by the change routes); without one, the read token guards them as well.
A body over `controlplane.admin.max_request_bytes` is answered 413 naming that field.
"""

from __future__ import annotations

import hmac
import os
from typing import TYPE_CHECKING, Any

from aiohttp import web

from controlplane.admin_http import error_response

if TYPE_CHECKING:
    from controlplane.app import ControlPlane

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
READS = frozenset({"GET", "HEAD", "OPTIONS"})
TOKEN_ENV = "HEALTHPLANE_ADMIN_TOKEN"


def _bearer(request: web.Request) -> str:
    given = request.headers.get("Authorization", "")
    return given[7:] if given.startswith("Bearer ") else ""


def _matches(given: str, token: str | None) -> bool:
    return bool(token) and hmac.compare_digest(given.encode(), (token or "").encode())


def guard(cp_of: Any) -> Any:
    """The middleware; `cp_of(request)` returns the ControlPlane (its topology is read per request)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        cp: ControlPlane = cp_of(request)
        config = cp.topology.controlplane
        read_token = config.security.admin_read_token
        change_token = config.admin_token or os.environ.get(TOKEN_ENV, "")
        if read_token and request.path not in OPEN_PATHS:
            given = _bearer(request)
            if request.method in READS:
                if not (_matches(given, read_token) or _matches(given, change_token)):
                    return error_response(401, "reading needs Authorization: Bearer <read token>", "Authorization")
            elif not change_token and not _matches(given, read_token):
                return error_response(401, "this change needs Authorization: Bearer <token>", "Authorization")
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except web.HTTPRequestEntityTooLarge:
            limit = config.security.admin_max_request_bytes
            return error_response(
                413,
                f"request body is over controlplane.admin.max_request_bytes ({limit})",
                "controlplane.admin.max_request_bytes",
            )

    return middleware
