"""Where published snapshots live: the current one, the recent history, and who to wake.

`SnapshotCache` is the one seam between the stage that builds snapshots and every reader of
them (ADS streams, the prober link, CSDS, the admin API): readers see it through the narrow
`SnapshotSource` and `SnapshotHistory` protocols, never through the control plane.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Protocol

from controlplane.snapshots.snapshot import Cause, Snapshot, find_snapshot

DEFAULT_HISTORY = 100


class SnapshotSource(Protocol):
    """What the server serves: the current snapshot and change notification."""

    def current(self) -> Snapshot | None: ...

    def subscribe(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Call `wake` on every new snapshot until the returned cancel function is called."""
        ...


class SnapshotHistory(Protocol):
    """The recent snapshots, oldest first, and lookups by version."""

    def recent(self) -> Sequence[Snapshot]: ...

    def find(self, version: str) -> Snapshot | None: ...


class SnapshotCache:
    """The current snapshot, the last `history_limit` published, and the streams to wake."""

    def __init__(self, history_limit: int = DEFAULT_HISTORY) -> None:
        self._snapshot: Snapshot | None = None
        self._wakers: dict[int, Callable[[], None]] = {}
        self._ids = itertools.count()
        self.history: list[Snapshot] = []
        self.history_limit = history_limit

    def current(self) -> Snapshot | None:
        return self._snapshot

    def publish(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot
        self.history.append(snapshot)
        del self.history[: -self.history_limit]
        for wake in list(self._wakers.values()):
            wake()

    def subscribe(self, wake: Callable[[], None]) -> Callable[[], None]:
        key = next(self._ids)
        self._wakers[key] = wake
        return lambda: self._wakers.pop(key, None) and None

    @property
    def watchers(self) -> int:
        return len(self._wakers)

    def recent(self) -> Sequence[Snapshot]:
        """The snapshots kept, oldest first; the current one is always the last."""
        return self.history

    def find(self, version: str) -> Snapshot | None:
        """The snapshot of `version` if it is still kept (newest first: recent versions are found first)."""
        return find_snapshot(reversed(self.history), version)

    def cause_of(self, version: str) -> Cause | None:
        """Why `version` was published, while it is kept."""
        snapshot = self.find(version)
        return None if snapshot is None else snapshot.cause
