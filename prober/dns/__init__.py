"""A `--controlplane NAME:PORT` whose name resolves to several addresses (a headless Service:
one per ready replica): one prober link per address, kept in step with DNS.

addresses  which addresses to link to, with a grace period for answers that flap (pure)
watch      resolving every few seconds off the event loop, with an injectable resolver
"""

from __future__ import annotations

from prober.dns.addresses import AddressChange, ResolvedAddresses, link_target
from prober.dns.watch import Resolver, getaddrinfo_resolver, watch_name

__all__ = [
    "AddressChange",
    "ResolvedAddresses",
    "Resolver",
    "getaddrinfo_resolver",
    "link_target",
    "watch_name",
]
