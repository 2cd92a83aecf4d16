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
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client.core import CounterMetricFamily, Metric

from controlplane.errors import ConfigError, ProtocolError

if TYPE_CHECKING:
    from controlplane.topology import _Field

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
        out: list[bytes | None] = []
        for name in ("cert", "key", "client_ca"):
            path: Path | None = getattr(self, name)
            if path is None:
                out.append(None)
                continue
            try:
                out.append(path.read_bytes())
            except OSError as exc:
                raise ConfigError(f"cannot read {path}: {exc.strerror}", path=f"{where}.tls.{name}") from None
        cert, key, ca = out
        assert cert is not None and key is not None
        return cert, key, ca


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


def parse_security(f: _Field) -> SecurityConfig:
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


def _tls(f: _Field, *, require_ca: bool, prober_names: bool = False) -> TlsFiles | None:
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


def certificate_names(auth_context: dict[str, list[bytes]]) -> list[str]:
    """The SAN and CN names of a gRPC peer's verified client certificate (empty without one)."""
    out: list[str] = []
    for key in ("x509_subject_alternative_name", "x509_common_name"):
        out.extend(v.decode(errors="replace") for v in auth_context.get(key, []))
    return out


def parse_token(f: _Field) -> str | None:
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


# --------------------------------------------------------------------------- the xDS port


def grpc_server_options(base: list[tuple[str, Any]], security: SecurityConfig) -> list[tuple[str, Any]]:
    """`base` with gRPC's own receive limit set above ours, so that ours answers first, naming the field."""
    limit = security.xds_max_message_bytes
    grpc_limit = min(MAX_MESSAGE_CEILING * 2, limit * 2 + 64 * 1024)
    return [(k, v) for k, v in base if k != "grpc.max_receive_message_length"] + [
        ("grpc.max_receive_message_length", grpc_limit)
    ]


def xds_limit_metrics(ads: Any) -> Iterator[Metric]:
    """Scrape-time counters of the streams the limits and the request checks ended."""
    ended = CounterMetricFamily(
        "healthplane_xds_streams_ended_by_server",
        "ADS streams the server ended with an error status (bad or oversized requests, limits), by code.",
        labels=["code"],
    )
    for code, n in sorted(ads.ended_with.items()):
        ended.add_metric([code], n)
    yield ended
    refused = CounterMetricFamily(
        "healthplane_xds_streams_refused_per_peer",
        "ADS streams refused because their peer held controlplane.xds.max_streams_per_peer already.",
    )
    refused.add_metric([], ads.peers.refused)
    yield refused


def configure_ads(ads: Any, security: SecurityConfig) -> None:
    """Apply the message and per-peer stream limits to an `AdsServer`."""
    ads.max_message_bytes = security.xds_max_message_bytes
    ads.peers.limit = security.xds_max_streams_per_peer


def bind_xds(server: grpc.aio.Server, host: str, port: int, security: SecurityConfig) -> int:
    """Add the xDS port, with TLS (mutual when `client_ca` is set) if configured; returns the bound port."""
    address = f"{host}:{port}"
    if security.xds_tls is None:
        bound: int = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, server_credentials(security.xds_tls, "controlplane.xds"))
    return bound


class RotatingCertificate:
    """The xDS port's certificate files, read again when they change (a renewed certificate is
    served from the next handshake, no restart). gRPC core calls `fetch` on each handshake."""

    def __init__(self, tls: TlsFiles, where: str) -> None:
        self.tls, self.where = tls, where
        self.reloads = 0
        self._stamp = tls.stamp()
        self.initial = self._configuration()

    def _configuration(self) -> Any:
        cert, key, ca = self.tls.read(self.where)
        # A cert and key that do not match (half-way through a rotation) would fail every
        # handshake: check the pair before serving it.
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.tls.cert, self.tls.key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the certificate and key: {exc}", path=f"{self.where}.tls") from None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self) -> Any:
        """A new configuration when the files changed and are a valid pair; None keeps the current one."""
        try:
            stamp = self.tls.stamp()
            if stamp == self._stamp:
                return None
            configuration = self._configuration()
        except (OSError, ConfigError) as exc:
            # Mid-rotation or broken: keep serving the last good certificate, try again next handshake.
            log.warning("%s.tls: keeping the current certificate: %s", self.where, exc)
            return None
        self._stamp = stamp
        self.reloads += 1
        log.info("%s.tls: serving the renewed certificate %s", self.where, self.tls.cert)
        return configuration


def server_credentials(tls: TlsFiles, where: str) -> grpc.ServerCredentials:
    rotating = RotatingCertificate(tls, where)
    return grpc.dynamic_ssl_server_credentials(
        rotating.initial, rotating.fetch, require_client_authentication=tls.client_ca is not None
    )


def channel_credentials(
    ca: str | Path | None, cert: str | Path | None = None, key: str | Path | None = None
) -> grpc.ChannelCredentials:
    """Client credentials for the prober link: trust `ca`, and present `cert`/`key` for mutual TLS."""
    if (cert is None) != (key is None):
        raise ConfigError("a client certificate needs both --tls-cert and --tls-key", path="--tls-cert")

    def read(path: str | Path | None, flag: str) -> bytes | None:
        if path is None:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}", path=flag) from None

    return grpc.ssl_channel_credentials(
        root_certificates=read(ca, "--tls-ca"),
        private_key=read(key, "--tls-key"),
        certificate_chain=read(cert, "--tls-cert"),
    )


class LimitExceeded(ProtocolError):
    """A peer went over a configured limit; answered with RESOURCE_EXHAUSTED."""


def status_code(error: ProtocolError) -> grpc.StatusCode:
    return grpc.StatusCode.RESOURCE_EXHAUSTED if isinstance(error, LimitExceeded) else grpc.StatusCode.INVALID_ARGUMENT


def peer_host(peer: str) -> str:
    """The address part of a gRPC peer string (`ipv4:1.2.3.4:5678`, `ipv6:[::1]:5678`)."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host, _, _port = rest.rpartition(":")
        return host.strip("[]")
    return peer


class PeerStreams:
    """Open ADS streams per peer address, against `controlplane.xds.max_streams_per_peer`."""

    def __init__(self, limit: int = 0) -> None:
        self.limit = limit
        self.open: dict[str, int] = {}
        self.refused = 0

    def acquire(self, peer: str) -> str:
        """Count one more stream for `peer`; LimitExceeded when it already holds `limit`. Returns the key."""
        host = peer_host(peer)
        held = self.open.get(host, 0)
        if self.limit and held >= self.limit:
            self.refused += 1
            raise LimitExceeded(
                f"{host} already holds {held} ADS streams: controlplane.xds.max_streams_per_peer is {self.limit}"
            )
        self.open[host] = held + 1
        return host

    def release(self, host: str) -> None:
        held = self.open.get(host, 0) - 1
        if held > 0:
            self.open[host] = held
        else:
            self.open.pop(host, None)


# --------------------------------------------------------------------------- the admin port


class AdminCertificate:
    """The admin API's SSLContext; `check` loads renewed certificate files into it (new
    connections get them; the admin app polls every `ADMIN_CERT_POLL` seconds)."""

    def __init__(self, tls: TlsFiles) -> None:
        self.tls = tls
        self.context = admin_ssl_context(tls)
        self.reloads = 0
        self._stamp = tls.stamp()

    def check(self) -> bool:
        """Load the files again if they changed and make a valid pair; True when they were loaded."""
        try:
            stamp = self.tls.stamp()
            if stamp == self._stamp:
                return False
            admin_ssl_context(self.tls)  # a fresh context first: a half-written rotation is not served
            self.context.load_cert_chain(self.tls.cert, self.tls.key)
            if self.tls.client_ca is not None:
                self.context.load_verify_locations(cafile=str(self.tls.client_ca))
        except (OSError, ssl.SSLError, ConfigError) as exc:
            log.warning("controlplane.admin.tls: keeping the current certificate: %s", exc)
            return False
        self._stamp = stamp
        self.reloads += 1
        log.info("controlplane.admin.tls: serving the renewed certificate %s", self.tls.cert)
        return True


ADMIN_CERT_POLL = 10.0


def admin_ssl_context(tls: TlsFiles) -> ssl.SSLContext:
    """A server-side SSLContext for the admin API; client certificates required when `client_ca` is set."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(tls.cert, tls.key)
        if tls.client_ca is not None:
            context.load_verify_locations(cafile=str(tls.client_ca))
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the certificate: {exc}", path="controlplane.admin.tls") from None
    return context


# --------------------------------------------------------------------------- DiscoveryRequests

MAX_RESOURCE_NAMES = 100_000
MAX_FIELD_BYTES = 4096


def parse_request(data: bytes, max_bytes: int) -> Any:
    """One DiscoveryRequest from the wire, within the limits; LimitExceeded or ProtocolError naming the field."""
    from envoy.service.discovery.v3 import discovery_pb2
    from google.protobuf.message import DecodeError

    if len(data) > max_bytes:
        raise LimitExceeded(
            f"DiscoveryRequest of {len(data)} bytes is over controlplane.xds.max_message_bytes ({max_bytes})"
        )
    try:
        request = discovery_pb2.DiscoveryRequest.FromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ProtocolError(f"DiscoveryRequest does not parse ({len(data)} bytes): {exc}") from None
    if len(request.resource_names) > MAX_RESOURCE_NAMES:
        raise LimitExceeded(
            f"resource_names lists {len(request.resource_names)} names, more than {MAX_RESOURCE_NAMES} allowed"
        )
    for name in ("type_url", "version_info", "response_nonce"):
        value: str = getattr(request, name)
        if len(value) > MAX_FIELD_BYTES:
            raise ProtocolError(f"{name} is {len(value)} characters long, more than {MAX_FIELD_BYTES} allowed")
    return request
