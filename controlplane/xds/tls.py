"""TLS on the xDS port: gRPC server options and credentials, a certificate re-read when it is renewed
(`RotatingCertificate`), the prober's channel credentials, and the names of a verified client certificate.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any

import grpc

from controlplane.errors import ConfigError
from controlplane.topology.security import MAX_MESSAGE_CEILING, SecurityConfig, TlsFiles, read_pem

log = logging.getLogger("healthplane.security")


def certificate_names(auth_context: dict[str, list[bytes]]) -> list[str]:
    """The SAN and CN names of a gRPC peer's verified client certificate (empty without one)."""
    out: list[str] = []
    for key in ("x509_subject_alternative_name", "x509_common_name"):
        out.extend(v.decode(errors="replace") for v in auth_context.get(key, []))
    return out


# Who called, as an xDS worker's relay passes it on to the main process (controlplane.xds.workers.relay).
PEER_METADATA = "x-healthplane-peer"
NAMES_METADATA = "x-healthplane-cert-names"


def _relayed(context: Any, key: str) -> str | None:
    if not (context.peer() or "").startswith("unix:"):
        return None
    for k, v in context.invocation_metadata() or ():
        if k == key and isinstance(v, str):
            return v
    return None


def caller_peer(context: Any) -> str:
    """The caller's address: `context.peer()`, or the one a worker's relay passed on."""
    relayed = _relayed(context, PEER_METADATA)
    return relayed if relayed is not None else (context.peer() or "")


def caller_certificate_names(context: Any) -> list[str]:
    """The names of the caller's verified client certificate, as seen where it connected."""
    relayed = _relayed(context, NAMES_METADATA)
    if relayed is not None:
        return [n for n in relayed.split(",") if n]
    return certificate_names(context.auth_context())


# --------------------------------------------------------------------------- the xDS port


def grpc_server_options(base: list[tuple[str, Any]], security: SecurityConfig) -> list[tuple[str, Any]]:
    """`base` with gRPC's own receive limit set above ours, so that ours answers first, naming the field."""
    limit = security.xds_max_message_bytes
    grpc_limit = min(MAX_MESSAGE_CEILING * 2, limit * 2 + 64 * 1024)
    return [(k, v) for k, v in base if k != "grpc.max_receive_message_length"] + [
        ("grpc.max_receive_message_length", grpc_limit)
    ]


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

    return grpc.ssl_channel_credentials(
        root_certificates=None if ca is None else read_pem(ca, "--tls-ca"),
        private_key=None if key is None else read_pem(key, "--tls-key"),
        certificate_chain=None if cert is None else read_pem(cert, "--tls-cert"),
    )
