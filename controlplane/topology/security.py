"""Limits and TLS for the control plane's ports: what the topology's `controlplane` section asks for.

    controlplane:
      xds:   {tls: {cert, key, client_ca}, max_message_bytes, max_streams_per_peer}
      admin: {tls: {cert, key, client_ca}, read_token, max_request_bytes}

`parse_security` validates those fields (as part of `parse_topology`, with the same field paths
in its errors); `SecurityConfig` is the result. The rest turns it into gRPC server options,
credentials and an `ssl.SSLContext`, and keeps the per-peer stream count. The xDS port reads its
certificate files again when they change (`RotatingCertificate`), the admin port polls for them
(`AdminCertificate`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from controlplane.errors import ConfigError

if TYPE_CHECKING:
    from controlplane.topology.fields import Field

log = logging.getLogger("healthplane.security")

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
MAX_MESSAGE_CEILING = 256 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """A certificate chain and key to serve with; `client_ca` set: clients must present a cert it signed."""

    cert: Path
    key: Path
    client_ca: Path | None = None
    # xDS only: the names (certificate SAN DNS or CN) that may open the prober link; empty: any
    # client the CA signed. Without it an Envoy's certificate could report verdicts too.
    prober_names: tuple[str, ...] = ()

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None

    def stamp(self) -> tuple[int, ...]:
        """The files' modification times: when they change, a renewal is there to load."""
        return tuple(p.stat().st_mtime_ns for p in (self.cert, self.key, self.client_ca) if p is not None)

    def read(self, where: str) -> tuple[bytes, bytes, bytes | None]:
        """(cert, key, client_ca) bytes; ConfigError naming the field of a file that cannot be read."""
        cert = read_pem(self.cert, f"{where}.tls.cert")
        key = read_pem(self.key, f"{where}.tls.key")
        ca = None if self.client_ca is None else read_pem(self.client_ca, f"{where}.tls.client_ca")
        return cert, key, ca


def read_pem(path: str | Path, field: str) -> bytes:
    """The bytes of a PEM file; ConfigError naming `field` (a topology path or a flag) if it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}", path=field) from None


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    """Limits and TLS of the xDS and admin ports (issue 7)."""

    xds_tls: TlsFiles | None = None
    # Largest DiscoveryRequest accepted, bytes; bigger: RESOURCE_EXHAUSTED. gRPC's own limit is twice this.
    xds_max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # ADS streams one peer address may hold open at once; 0: no limit. Beyond: RESOURCE_EXHAUSTED.
    xds_max_streams_per_peer: int = 0
    admin_tls: TlsFiles | None = None
    # Bearer token every read needs too (changes accept it as well only if it equals `admin.token`).
    admin_read_token: str | None = field(default=None, repr=False)
    # Largest admin request body, bytes; bigger: 413 naming this field.
    admin_max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES


XDS_KEYS = frozenset({"tls", "max_message_bytes", "max_streams_per_peer"})
ADMIN_KEYS = frozenset({"tls", "read_token", "max_request_bytes"})


# --------------------------------------------------------------------------- parsing


def parse_security(f: Field) -> SecurityConfig:
    """The limits and TLS fields of a `controlplane` section (`f`), validated."""
    d = SecurityConfig()
    if f.missing:
        return d
    xds, admin = f.child("xds"), f.child("admin")
    xds_present, admin_present = isinstance(xds.value, dict), isinstance(admin.value, dict)
    return SecurityConfig(
        xds_tls=_tls(xds.child("tls"), require_ca=False, prober_names=True) if xds_present else None,
        xds_max_message_bytes=xds.child("max_message_bytes").integer(
            default=d.xds_max_message_bytes, lo=1024, hi=MAX_MESSAGE_CEILING
        )
        if xds_present
        else d.xds_max_message_bytes,
        xds_max_streams_per_peer=xds.child("max_streams_per_peer").integer(default=0, lo=0, hi=1_000_000)
        if xds_present
        else 0,
        admin_tls=_tls(admin.child("tls"), require_ca=False) if admin_present else None,
        admin_read_token=parse_token(admin.child("read_token")) if admin_present else None,
        admin_max_request_bytes=admin.child("max_request_bytes").integer(
            default=d.admin_max_request_bytes, lo=1024, hi=MAX_MESSAGE_CEILING
        )
        if admin_present
        else d.admin_max_request_bytes,
    )


def _tls(f: Field, *, require_ca: bool, prober_names: bool = False) -> TlsFiles | None:
    if f.missing:
        return None
    f.mapping({"cert", "key", "client_ca", "prober_names"} if prober_names else {"cert", "key", "client_ca"})
    base = Path(f.source).parent if f.source and Path(f.source).is_file() else Path.cwd()
    paths: dict[str, Path | None] = {}
    for name in ("cert", "key", "client_ca"):
        child = f.child(name)
        if child.missing and (name != "client_ca" or require_ca):
            raise child.error("is required (a PEM file path)")
        if child.missing:
            paths[name] = None
            continue
        path = base / child.string()
        if not path.is_file():
            raise child.error(f"no such file: {path}")
        paths[name] = path
    cert, key = paths["cert"], paths["key"]
    assert cert is not None and key is not None
    names: list[str] = []
    nf = f.child("prober_names")
    if not nf.missing:
        if not isinstance(nf.value, list) or not nf.value:
            raise nf.error("must be a non-empty list of certificate names")
        names = [nf.child(i).string() for i in range(len(nf.value))]
        if paths["client_ca"] is None:
            raise nf.error("needs client_ca: a prober is known by the client certificate it presents")
    return TlsFiles(cert=cert, key=key, client_ca=paths["client_ca"], prober_names=tuple(names))


def parse_token(f: Field) -> str | None:
    """An admin bearer token (`admin.token`, `admin.read_token`): 8 characters or more, no spaces."""
    if f.missing:
        return None
    token = f.string()
    if len(token) < 8 or any(c.isspace() for c in token):
        raise f.error("must be at least 8 characters without spaces")
    return token


def restart_only_change(old: SecurityConfig, new: SecurityConfig) -> str | None:
    """The field path of a setting that differs and only applies at start (None: none does)."""
    for attr, path in (
        ("xds_tls", "controlplane.xds.tls"),
        ("xds_max_message_bytes", "controlplane.xds.max_message_bytes"),
        ("xds_max_streams_per_peer", "controlplane.xds.max_streams_per_peer"),
        ("admin_tls", "controlplane.admin.tls"),
        ("admin_max_request_bytes", "controlplane.admin.max_request_bytes"),
    ):
        if getattr(old, attr) != getattr(new, attr):
            return path
    return None
