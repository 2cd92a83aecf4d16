"""Errors raised by healthplane, one type per domain.

    HealthplaneError
    ├── ConfigError      a topology or option is invalid; names the file and the field path
    └── ProtocolError    a peer sent something the xDS protocol does not allow

They are turned into messages at the edges: the CLI prints them, the admin API answers
4xx JSON, the gRPC server maps them to a status code.
"""

from __future__ import annotations


class HealthplaneError(Exception):
    """Base of every error healthplane raises on purpose."""


class ConfigError(HealthplaneError):
    """Invalid configuration: `source` is the file (or "admin API"), `path` the field path."""

    def __init__(self, message: str, *, path: str = "", source: str = "") -> None:
        self.message = message
        self.path = path
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ": ".join(p for p in (self.source, self.path) if p)
        return f"{where}: {self.message}" if where else self.message


class ProtocolError(HealthplaneError):
    """A DiscoveryRequest or stream that breaks the xDS protocol."""
