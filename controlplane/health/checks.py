"""What a prober reports about one endpoint's checks, beside its verdict: policy, counters, last result.

The embedded prober and remote probers (through the link) both report it; the admin API shows it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class CheckInfo:
    """What the prober knows about one endpoint's checks: the policy, counters and last result."""

    check: str  # "http", "tcp" or "grpc"
    rise: int  # healthy_threshold
    fall: int  # unhealthy_threshold
    successes: int
    http_failures: int
    tcp_failures: int
    timeouts: int
    checks: int  # results observed since the policy was last set
    last_result: str | None  # "success", "http_failure", "tcp_failure", "timeout"; None before the first
    last_reason: str
    last_time: float | None  # wall clock, seconds
    last_latency: float | None  # seconds
    prober: str

    @property
    def failures(self) -> int:
        """The failure counter closest to its threshold (what nginx shows as the fall count)."""
        return max(self.http_failures, self.tcp_failures, self.timeouts)

    def to_json(self) -> dict[str, Any]:
        return {
            "check_type": self.check,
            "prober": self.prober,
            "rise": self.rise,
            "fall": self.fall,
            "counters": {
                "successes": self.successes,
                "http_failures": self.http_failures,
                "tcp_failures": self.tcp_failures,
                "timeouts": self.timeouts,
            },
            "checks": self.checks,
            "last_check": None
            if self.last_result is None
            else {
                "result": self.last_result,
                "reason": self.last_reason,
                "time": self.last_time,
                "latency_ms": None if self.last_latency is None else round(self.last_latency * 1000, 3),
            },
        }
