"""The admin port's TLS: its SSLContext, and renewed certificate files loaded without a restart."""

from __future__ import annotations

import logging
import ssl

from controlplane.errors import ConfigError
from controlplane.topology.security import TlsFiles

log = logging.getLogger("healthplane.security")

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
