"""Resolving a control plane's name every few seconds, off the event loop.

`watch_name` resolves NAME with `resolver` (by default `loop.getaddrinfo`, which runs the system
resolver in the loop's thread pool: the event loop never blocks on DNS), applies each answer to a
`ResolvedAddresses` and hands what changed, as link targets, to `on_change`. A resolution that
fails (no such name, no answer, a resolver error) or answers nothing keeps every link as it is
and logs a warning naming the name: a DNS outage must not unlink a prober from every replica.
The resolver is the seam the tests use: real links on 127.0.0.x, with the answer they choose.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Iterable

from prober.dns.addresses import AddressChange, ResolvedAddresses, link_target

__all__ = ["Resolver", "getaddrinfo_resolver", "watch_name"]

log = logging.getLogger("healthplane.prober.dns")

# (name, port) -> the IP addresses the name resolves to now.
Resolver = Callable[[str, int], Awaitable[Iterable[str]]]


async def getaddrinfo_resolver(name: str, port: int) -> list[str]:
    """Every address `name` resolves to (A and AAAA), by the system resolver in a worker thread."""
    infos = await asyncio.get_running_loop().getaddrinfo(name, port, type=socket.SOCK_STREAM)
    return sorted({str(sockaddr[0]) for *_, sockaddr in infos})


async def watch_name(
    name: str,
    port: int,
    on_change: Callable[[AddressChange], Awaitable[None]],
    *,
    resolver: Resolver | None = None,
    interval: float = 5.0,
    grace: float = 15.0,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Resolve `name` now and every `interval` seconds until cancelled; `on_change` gets the link
    targets (`ADDRESS:PORT`) to open and to close."""
    resolve = resolver or getaddrinfo_resolver
    addresses = ResolvedAddresses(grace)
    while True:
        try:
            answer = sorted(set(await resolve(name, port)))
            for address in answer:
                link_target(address, port)  # an answer that is not an IP address is a failed one
        except (OSError, ValueError) as exc:  # socket.gaierror is an OSError
            log.warning(
                "resolving control plane %s:%d failed (%s): keeping its %d links",
                name,
                port,
                exc,
                len(addresses.current),
            )
        else:
            if not answer:
                log.warning(
                    "control plane %s:%d resolved to no address: keeping its %d links",
                    name,
                    port,
                    len(addresses.current),
                )
            else:
                change = addresses.update(answer, clock())
                if change:
                    log.info(
                        "control plane %s:%d resolves to %s (new: %s; gone: %s)",
                        name,
                        port,
                        ", ".join(answer),
                        ", ".join(change.added) or "none",
                        ", ".join(change.removed) or "none",
                    )
                    await on_change(
                        AddressChange(
                            added=tuple(link_target(a, port) for a in change.added),
                            removed=tuple(link_target(a, port) for a in change.removed),
                        )
                    )
        await asyncio.sleep(interval)
