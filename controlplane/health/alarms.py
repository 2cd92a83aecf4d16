"""Alarms: conditions the control plane will not guess its way out of, shown until they clear.

An alarm is raised once per (kind, subject) while its condition holds and resolved when it
clears, or accepted by an operator where that means something (a held mass failure). Each
raise, resolve and accept is an event; active alarms are a metric and, for stale probers, a
reason in `/readyz`.

Kinds: `prober_stale` (subject: prober id), `mass_failure` (subject: cluster).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

from controlplane.events import EventSink


@dataclass(slots=True)
class Alarm:
    id: int
    kind: str
    subject: str
    message: str
    raised_at: float
    resolved_at: float | None = None
    resolution: str = ""  # "cleared", "accepted by alice", ...

    @property
    def active(self) -> bool:
        return self.resolved_at is None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "subject": self.subject,
            "message": self.message,
            "active": self.active,
            "raised_at": self.raised_at,
            "resolved_at": self.resolved_at,
            "resolution": self.resolution,
        }


class Alarms:
    """Active alarms by (kind, subject), and the last `keep` resolved ones."""

    def __init__(self, events: EventSink, keep: int = 100) -> None:
        self.events = events
        self.keep = keep
        self._ids = itertools.count(1)
        self._active: dict[tuple[str, str], Alarm] = {}
        self._resolved: list[Alarm] = []

    def raise_(self, kind: str, subject: str, message: str, **fields: Any) -> Alarm:
        """Raise (or, if already active, update the message of) the alarm for (kind, subject)."""
        alarm = self._active.get((kind, subject))
        if alarm is not None:
            alarm.message = message
            return alarm
        alarm = Alarm(next(self._ids), kind, subject, message, time.time())
        self._active[(kind, subject)] = alarm
        self.events.record("alarm", f"alarm {alarm.id} raised: {message}", alarm=alarm.id, alarm_kind=kind, **fields)
        return alarm

    def resolve(self, kind: str, subject: str, resolution: str = "cleared") -> Alarm | None:
        alarm = self._active.pop((kind, subject), None)
        if alarm is None:
            return None
        alarm.resolved_at = time.time()
        alarm.resolution = resolution
        self._resolved.append(alarm)
        del self._resolved[: -self.keep]
        self.events.record("alarm", f"alarm {alarm.id} {resolution}: {alarm.message}", alarm=alarm.id, alarm_kind=kind)
        return alarm

    def get(self, alarm_id: int) -> Alarm | None:
        for alarm in self.all():
            if alarm.id == alarm_id:
                return alarm
        return None

    def active(self, kind: str | None = None) -> list[Alarm]:
        return [a for a in self._active.values() if kind is None or a.kind == kind]

    def all(self) -> list[Alarm]:
        return sorted([*self._active.values(), *self._resolved], key=lambda a: a.id)
