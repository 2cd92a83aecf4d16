"""HOST:PORT values ([IPv6]:PORT too): the one parser for flags, admin paths and Envoy's output."""

from __future__ import annotations

import ipaddress

from controlplane.errors import ConfigError


def is_ip(host: str) -> bool:
    """Whether `host` is an IPv4 or IPv6 address (not a name to resolve)."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def split_host_port(text: str, *, lowest_port: int = 0) -> tuple[str, int] | None:
    """(host, port) from HOST:PORT or [IPv6]:PORT with the port in lowest_port..65535; None otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()) or not lowest_port <= int(port) < 65536:
        return None
    return host.strip("[]"), int(port)


def host_port(text: str, flag: str, *, lowest_port: int = 1) -> tuple[str, int]:
    """A HOST:PORT command-line value ([IPv6]:PORT too); ConfigError naming `flag` otherwise."""
    parsed = split_host_port(text, lowest_port=lowest_port)
    if parsed is None:
        raise ConfigError("must be HOST:PORT", path=flag)
    return parsed
