"""Prober membership through etcd (issue 17): who shares the endpoints, the same list on every replica.

Each replica registers the sharing probers it holds a live link to (connected, taking a share,
heard within `prober_staleness`) as `{prefix}/probers/{prober}/{replica}`, under the replica's
own lease, and deletes the key when the link ends or goes silent. A prober is a member while any
replica holds such a key for it; every replica watches `{prefix}/probers/` and computes the owners
from that list (probers/ownership.py `choose_members`), so replicas whose links differ still
agree on who checks what.

Why the replica writes the key and not the prober: a prober needs no etcd address or credentials;
a member is always a prober some replica hears (one registered but linked nowhere would own a
share whose verdicts reach nobody); a prober that dies leaves at once (its link closes, its
replica deletes the key) rather than when a lease of its own runs out; and a replica that dies
takes its keys with its lease. One key per (prober, replica) so that replicas never overwrite
each other: a prober linked to three replicas stays a member while any of them still hears it.
Plain values here; the writes and the watch are in controlplane/store/etcd.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable

from controlplane.store.sync import Keys

__all__ = ["ProberRegistry", "encode_registration"]


def encode_registration(prober_id: str, replica_id: str, *, now: float | None = None) -> bytes:
    """The value of `{prefix}/probers/{prober}/{replica}`: who holds the link, since when."""
    data = {"prober": prober_id, "replica": replica_id, "since": time.time() if now is None else now}
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode()


class ProberRegistry:
    """The registrations this replica has seen in etcd (from its watch) and those it wrote."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self._held: dict[str, tuple[str, str]] = {}  # key -> (prober, replica), as etcd has it
        self.published: set[str] = set()  # prober ids this replica registered in this session

    def clear(self) -> None:
        """Forget what etcd held (before a full load)."""
        self._held.clear()

    def event(self, key: str, present: bool) -> bool:
        """A put (`present`) or delete of a key under `{prefix}/probers/`; True if the members (or
        the replicas holding them) changed.

        A key that is not `probers/{prober}/{replica}` (written by something else) is ignored.
        """
        parsed = self.keys.parse(key)
        if len(parsed) != 3 or parsed[0] != "probers":
            return False
        before = self.members()
        if present:
            self._held[key] = (parsed[1], parsed[2])
        else:
            self._held.pop(key, None)
        return self.members() != before

    def members(self) -> dict[str, tuple[str, ...]]:
        """Prober id -> the replicas holding its link (sorted)."""
        out: dict[str, set[str]] = {}
        for prober_id, replica_id in self._held.values():
            out.setdefault(prober_id, set()).add(replica_id)
        return {p: tuple(sorted(r)) for p, r in sorted(out.items())}

    def writes(
        self, replica_id: str, linked: Iterable[str], *, now: float | None = None
    ) -> list[tuple[str, bytes | None]]:
        """The puts and deletes that make this replica's registrations match `linked` (its live
        sharing probers now); the caller writes them, then sets `published` to `linked`.

        Keys of this replica's id that etcd still holds and `linked` lacks are deleted too: those
        of a previous session, or of this replica's previous run, whose lease has not run out yet.
        """
        want = set(linked)
        mine = {p for p, r in self._held.values() if r == replica_id}
        ops: list[tuple[str, bytes | None]] = [
            (self.keys.prober(p, replica_id), encode_registration(p, replica_id, now=now))
            for p in sorted(want - self.published)
        ]
        ops += [(self.keys.prober(p, replica_id), None) for p in sorted((self.published | mine) - want)]
        return ops
