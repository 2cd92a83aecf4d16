"""snapshots.cache: split from server.py (docstring to write)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Protocol

from controlplane.snapshots.snapshot import Snapshot

log = logging.getLogger("healthplane.xds")


class SnapshotSource(Protocol):
    """What the server serves: the current snapshot and change notification."""

    def current(self) -> Snapshot | None: ...

    def subscribe(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Call `wake` on every new snapshot until the returned cancel function is called."""
        ...


class SnapshotCache:
    """The current snapshot, and the streams to wake when a new one is published."""

    def __init__(self) -> None:
        self._snapshot: Snapshot | None = None
        self._wakers: dict[int, Callable[[], None]] = {}
        self._ids = itertools.count()

    def current(self) -> Snapshot | None:
        return self._snapshot

    def publish(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        for wake in list(self._wakers.values()):
            wake()

    def subscribe(self, wake: Callable[[], None]) -> Callable[[], None]:
        key = next(self._ids)
        self._wakers[key] = wake
        return lambda: self._wakers.pop(key, None) and None

    @property
    def watchers(self) -> int:
        return len(self._wakers)
