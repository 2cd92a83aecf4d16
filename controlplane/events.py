"""A bounded log of what happened: health changes, overrides, NACKs, topology edits."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

log = logging.getLogger("healthplane.events")


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    time: float
    kind: str  # "health", "override", "nack", "topology", "topology_rejected", "node", ...
    message: str
    fields: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "time": self.time, "kind": self.kind, "message": self.message, **self.fields}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, logger, message, an event's fields, an exception
    (`--log-format json`; here, beside the events it carries, for every process that logs them)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        event = getattr(record, "event", None)  # controlplane.events logs each event with extra={"event": ...}
        if event is not None:
            out["event"] = event
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class EventSink(Protocol):
    """Where a stage records what happened (the control plane's `EventLog`)."""

    def record(self, kind: str, message: str, **fields: Any) -> Event: ...


class EventLog:
    """The last `capacity` events, newest last, with listeners for live streaming."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._events: deque[Event] = deque(maxlen=capacity)
        self._ids = itertools.count(1)
        self._listeners: list[Callable[[Event], None]] = []
        self._unlogged = 0

    def record(self, kind: str, message: str, **fields: Any) -> Event:
        event = Event(next(self._ids), time.time(), kind, message, fields)
        self._events.append(event)
        if not self._unlogged:
            log.info("%s: %s", kind, message, extra={"event": event.to_json()})
        for listener in list(self._listeners):
            listener(event)
        return event

    @contextlib.contextmanager
    def unlogged(self) -> Iterator[None]:
        """Events recorded inside are kept and streamed but not logged one by one (a shutdown's
        thousands of disconnects: the caller logs one line for them)."""
        self._unlogged += 1
        try:
            yield
        finally:
            self._unlogged -= 1

    def listen(self, listener: Callable[[Event], None]) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def __iter__(self) -> Iterator[Event]:
        return iter(self._events)

    def recent(self, limit: int = 100, kind: str | None = None) -> list[Event]:
        picked = [e for e in self._events if kind is None or e.kind == kind]
        return picked[-limit:]
