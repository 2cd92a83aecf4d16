"""What the prober hands downstream: verdicts and probe events, through a small sink interface.

The prober calls its `ProberSink` from one delivery task, in order. A slow sink delays delivery
but never the checks. `QueueSink` turns the calls into an `asyncio.Queue` for consumers that
prefer `async for`. `NullSink` is a no-op base: subclass it and override only what you need.
`JsonLinesLog` appends every probe event to a file, one JSON object per line.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from controlplane.health.store import Verdict
from prober.state import Transition

__all__ = ["JsonLinesLog", "NullSink", "ProbeEvent", "ProberSink", "QueueSink"]


@dataclass(frozen=True, slots=True)
class ProbeEvent(Transition):
    """A status change of one endpoint as the prober records it: a Transition, with provenance."""

    source: str = ""
    check: str = ""  # "http", "tcp" or "grpc"
    latency: float | None = None  # seconds, of the check that caused the change

    @classmethod
    def from_transition(cls, t: Transition, *, source: str, check: str, latency: float | None = None) -> ProbeEvent:
        return cls(t.cluster, t.endpoint, t.old, t.new, t.reason, t.counters, t.time, source, check, latency)

    def verdict(self) -> Verdict:
        """The verdict this event implies, for the control plane's HealthStore."""
        return Verdict(self.cluster, self.endpoint, self.new, self.reason, self.time, self.source)

    def to_json(self) -> dict[str, Any]:
        return {
            "time": self.time,
            "cluster": self.cluster,
            "endpoint": self.endpoint,
            "old": self.old.name,
            "new": self.new.name,
            "reason": self.reason,
            "counters": self.counters.to_json(),
            "source": self.source,
            "check": self.check,
            "latency_ms": None if self.latency is None else round(self.latency * 1000, 3),
        }


class ProberSink(Protocol):
    """Where verdicts and probe events go. Exceptions are logged and do not stop the prober."""

    async def on_verdict(self, verdict: Verdict) -> None: ...

    async def on_event(self, event: ProbeEvent) -> None: ...


class NullSink:
    """A sink that drops everything; subclass it to handle only verdicts or only events."""

    async def on_verdict(self, verdict: Verdict) -> None:
        return None

    async def on_event(self, event: ProbeEvent) -> None:
        return None


class QueueSink:
    """A sink that puts verdicts and events, in order, into `queue` (unbounded by default)."""

    def __init__(self, maxsize: int = 0) -> None:
        self.queue: asyncio.Queue[Verdict | ProbeEvent] = asyncio.Queue(maxsize)

    async def on_verdict(self, verdict: Verdict) -> None:
        await self.queue.put(verdict)

    async def on_event(self, event: ProbeEvent) -> None:
        await self.queue.put(event)

    async def __aiter__(self) -> AsyncIterator[Verdict | ProbeEvent]:
        while True:
            yield await self.queue.get()


class JsonLinesLog:
    """Appends probe events to a file as JSON lines; opened on first write, flushed per line."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._file: IO[str] | None = None

    def write(self, event: ProbeEvent) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8", buffering=1)
        self._file.write(json.dumps(event.to_json(), separators=(",", ":")) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
