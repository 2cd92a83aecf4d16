"""Admin routes for the event log: `/events` (recent, oldest first) and `/events/stream` (the same
live, as server-sent events, replaying what a reconnecting client missed)."""

from __future__ import annotations

import asyncio
import json
import time

from aiohttp import web

from controlplane.admin.http import MAX_LIMIT, control_plane, json_response, query_int, whole_number
from controlplane.events import Event

SSE_KEEPALIVE = 15.0  # a comment line this often keeps proxies from closing a quiet stream
SSE_POLL = 0.5  # how often a quiet stream looks whether its client or the server is going away
CLOSING: web.AppKey[asyncio.Event] = web.AppKey("closing")


async def events(request: web.Request) -> web.Response:
    cp = control_plane(request)
    limit = query_int(request, "limit", default=100, low=1, high=MAX_LIMIT)
    kind = request.query.get("kind")
    return json_response({"events": [e.to_json() for e in cp.events.recent(limit, kind)]})


def _since(request: web.Request) -> int:
    """The last event id the client has: the Last-Event-ID header, else `?since=`, else 0."""
    header = request.headers.get("Last-Event-ID")
    if header:
        return whole_number(header, "Last-Event-ID", low=0, field="since")
    return query_int(request, "since", default=0, low=0)


def _sse(event: Event) -> bytes:
    data = json.dumps(event.to_json(), separators=(",", ":"), default=str)
    return f"id: {event.id}\nevent: {event.kind}\ndata: {data}\n\n".encode()


async def events_stream(request: web.Request) -> web.StreamResponse:
    """Server-sent events: everything after Last-Event-ID (or ?since=), then new events as they happen."""
    cp = control_plane(request)
    kind = request.query.get("kind") or None
    since = _since(request)
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


async def close_streams(app: web.Application) -> None:
    """on_shutdown: let every open event stream end its answer."""
    app[CLOSING].set()
