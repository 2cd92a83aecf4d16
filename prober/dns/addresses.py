"""Which resolved addresses a name's links go to (pure).

A name is resolved every few seconds. An address that appears is linked at once; one that is
missing from an answer is kept until it has been missing for `grace` seconds: DNS answers flap
(a resolver that answered from a partial cache, a pod briefly out of the endpoints), and closing a
link moves that prober's share at the replica, so a single missing answer must not do it. An
address that comes back within the grace period is simply kept.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["AddressChange", "ResolvedAddresses", "link_target"]


def link_target(address: str, port: int) -> str:
    """The gRPC target of one resolved address: `10.0.0.5:18000`, `[fd00::5]:18000`."""
    return (
        f"[{address}]:{port}" if ipaddress.ip_address(address.partition("%")[0]).version == 6 else f"{address}:{port}"
    )


@dataclass(frozen=True)
class AddressChange:
    """What one answer changes: addresses to link to and addresses to unlink, each sorted."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


@dataclass
class ResolvedAddresses:
    """The addresses a name's links go to, from the answers so far."""

    grace: float
    _missing_since: dict[str, float | None] = field(default_factory=dict)  # None: in the last answer

    def __post_init__(self) -> None:
        if self.grace < 0:
            raise ValueError(f"grace must be >= 0, got {self.grace}")

    @property
    def current(self) -> tuple[str, ...]:
        """Every address linked: those in the last answer and those missing for less than `grace`."""
        return tuple(sorted(self._missing_since))

    def missing(self) -> dict[str, float]:
        """The linked addresses absent from the last answer, with when each went missing."""
        return {a: t for a, t in self._missing_since.items() if t is not None}

    def update(self, answer: Iterable[str], now: float) -> AddressChange:
        """Apply one successful, non-empty answer received at `now` (monotonic seconds). A failed or
        empty resolution is not an answer: the caller keeps every link and does not call this."""
        seen = set(answer)
        if not seen:
            raise ValueError("an empty answer is not an answer: keep the links (see ResolvedAddresses.update)")
        added = sorted(seen - self._missing_since.keys())
        removed = []
        for address, since in list(self._missing_since.items()):
            if address in seen:
                self._missing_since[address] = None
            elif since is None:
                self._missing_since[address] = now
            elif now - since >= self.grace:
                del self._missing_since[address]
                removed.append(address)
        for address in added:
            self._missing_since[address] = None
        return AddressChange(added=tuple(added), removed=tuple(sorted(removed)))
