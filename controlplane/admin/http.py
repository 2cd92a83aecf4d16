"""What every admin API handler shares: the app key of the ControlPlane, JSON answers, 4xx errors.

Errors are `{"error": "...", "field": "..."}` with a 4xx status, so a client always learns what
was wrong and where.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from controlplane.app import ControlPlane

CP_KEY: web.AppKey[ControlPlane] = web.AppKey("controlplane")


def control_plane(request: web.Request) -> ControlPlane:
    """The ControlPlane an admin request is for."""
    return request.app[CP_KEY]


def error_response(status: int, message: str, field: str = "") -> web.Response:
    """A JSON error naming the problem and, where there is one, the field."""
    body: dict[str, Any] = {"error": message}
    if field:
        body["field"] = field
    return web.json_response(body, status=status)


def json_response(data: Any) -> web.Response:
    """A compact JSON answer."""
    # Compact: with `indent` the json module falls back to its pure-Python encoder, 3.5x slower on
    # the 10,000-row answers the views give (bench/admin.py); pipe through `jq` to read.
    return web.json_response(data, dumps=compact_json)


def compact_json(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"))
