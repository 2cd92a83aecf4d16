"""The prober's file descriptors: raise the soft limit, and size the keep-alive pool to fit it.

A keep-alive checker holds one socket per endpoint. Past the limit on open files, every new
connection would fail with EMFILE, and the checks with it. Instead:

- at start the soft RLIMIT_NOFILE is raised to the hard one (`raise_open_files_limit`), as
  Envoy's and nginx's docs tell operators to do by hand;
- the pool of idle keep-alive connections is bounded (`pool_budget`): what the limit leaves
  after the descriptors already open, one per check in flight (a connect per check needs
  one), and a reserve for everything else (the control-plane link, logs, metrics, gRPC);
- when the endpoints need more connections than that, the prober says so at start and on
  every topology change that crosses the line (`pool_message`). The endpoints that fit keep
  their connections; the others connect for each check, which costs more CPU but fails no check.

The planning functions are pure; `descriptors_in_use` and `raise_open_files_limit` read and
change the process.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterable
from dataclasses import dataclass

from prober.state import Target

__all__ = [
    "RESERVE",
    "OpenFiles",
    "descriptors_in_use",
    "keepalive_connections",
    "pool_budget",
    "pool_message",
    "raise_open_files_limit",
]

# Descriptors kept for everything but the checks: the link to the control plane and its gRPC
# threads, the event log, the metrics server, the epoll, Python's own.
RESERVE = 64


@dataclass(frozen=True, slots=True)
class OpenFiles:
    """RLIMIT_NOFILE before and after `raise_open_files_limit`."""

    before: int
    soft: int
    hard: int  # -1: unlimited

    @property
    def raised(self) -> bool:
        return self.soft > self.before


def raise_open_files_limit() -> OpenFiles:
    """Raise the soft limit on open files to the hard one (as far as the kernel allows)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before = soft
    # An unlimited hard limit still has the kernel's nr_open ceiling; 1 << 20 is its default.
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass  # kept as it was; the pool is sized to what we have
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return OpenFiles(before=before, soft=soft, hard=hard)


def descriptors_in_use() -> int:
    """Descriptors this process has open now (Linux /proc; 0 where it cannot tell)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # minus the one listdir itself opened
    except OSError:
        return 0


def pool_budget(limit: int, *, in_use: int, max_concurrency: int, reserve: int = RESERVE) -> int:
    """How many idle keep-alive connections fit under `limit` open files (never below 0)."""
    if limit < 0 or limit == resource.RLIM_INFINITY:
        limit = 1 << 20
    return max(0, limit - in_use - max_concurrency - reserve)


def keepalive_connections(targets: Iterable[Target]) -> int:
    """Connections a keep-alive pool would hold for `targets`: one per (address, check port)."""
    return len(
        {
            (t.address, t.check_port)
            for t in targets
            if t.health_check.kind == "http"
            and t.health_check.http is not None
            and t.health_check.http.keepalive
            and not t.health_check.http.https
        }
    )


def pool_message(needed: int, budget: int, limit: int) -> str | None:
    """What to tell the operator when `needed` keep-alive connections do not fit; None when they do."""
    if needed <= budget:
        return None
    return (
        f"{needed} keep-alive endpoints need {needed} sockets but the open-files limit is {limit}: "
        f"{budget} keep their connection, the other {needed - budget} connect for every check "
        f"(more CPU per check, no failed checks). Raise the hard limit (ulimit -Hn, LimitNOFILE=) "
        f"or split the prober (--processes) to keep them all."
    )
