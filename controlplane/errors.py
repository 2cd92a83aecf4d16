"""Errors raised by healthplane, one type per domain: the whole tree.

    HealthplaneError
    ├── ConfigError          a topology or option is invalid; names the file and the field path
    ├── ProtocolError        a peer sent something the xDS protocol does not allow  (INVALID_ARGUMENT)
    │   └── LimitExceeded    a peer went over a configured limit                    (RESOURCE_EXHAUSTED)
    ├── AdminError           the CLI could not reach the admin API, or it answered an error
    ├── StoreUnavailable     the shared store (etcd) cannot take a change now        (admin API: 503)
    ├── LabError             the lab could not start or stop cleanly (a process, a namespace, a port)
    └── EnvoyError           an Envoy process the lab runs (also a RuntimeError)
        ├── EnvoyNotFound    no `envoy` binary next to the interpreter nor on PATH
        ├── EnvoyStartError  Envoy exited, or never answered on its admin port, while starting
        ├── EnvoyTimeout     a wait on Envoy ran past its deadline (also a TimeoutError)
        └── EnvoyAdminError  Envoy's admin API answered a non-2xx status

They are turned into messages at the edges: the CLI prints them, the admin API answers
4xx JSON, the gRPC server maps them to a status code (`xds.limits.status_code`).

Outside the tree on purpose: `lab.run.Interrupted` (a signal stopped a command: control
flow, not an error) and `prober.http1.HttpProtocolError` (a probed endpoint's bad HTTP answer:
a ValueError the prober turns into a failed check, never raised to an operator).
"""

from __future__ import annotations

__all__ = [
    "AdminError",
    "ConfigError",
    "EnvoyAdminError",
    "EnvoyError",
    "EnvoyNotFound",
    "EnvoyStartError",
    "EnvoyTimeout",
    "HealthplaneError",
    "LabError",
    "LimitExceeded",
    "ProtocolError",
    "StoreUnavailable",
]


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


class ConfigErrors(ConfigError):
    """Every error of one document, each naming its field; `path` is the first's, `message` lists them all."""

    def __init__(self, errors: list[ConfigError], *, limit: int = 50) -> None:
        self.errors = errors
        first = errors[0]
        rest = [str(ConfigError(e.message, path=e.path)) for e in errors[1:limit]]
        more = len(errors) - limit
        message = first.message
        if rest:
            message += f"; and {len(errors) - 1} more: " + "; ".join(rest) + (f"; ... {more} more" if more > 0 else "")
        super().__init__(message, path=first.path, source=first.source)


class ProtocolError(HealthplaneError):
    """A DiscoveryRequest or stream that breaks the xDS protocol."""


class LimitExceeded(ProtocolError):
    """A peer went over a configured limit; answered with RESOURCE_EXHAUSTED."""


class AdminError(HealthplaneError):
    """The admin API could not be reached, or answered an error."""


class StoreUnavailable(HealthplaneError):
    """The shared store (etcd) cannot take a change now: nothing was changed; the last state is served."""


class LabError(HealthplaneError):
    """The lab could not start or stop cleanly (a process, a namespace, a port)."""


class EnvoyError(HealthplaneError, RuntimeError):
    """Base of the errors lab/envoyproc.py raises about an Envoy process."""


class EnvoyNotFound(EnvoyError):
    """No `envoy` binary next to the Python interpreter nor on PATH."""


class EnvoyStartError(EnvoyError):
    """Envoy exited, or never answered on its admin port, while starting."""


class EnvoyTimeout(EnvoyError, TimeoutError):
    """A wait on Envoy (or on a polled condition) ran past its deadline."""


class EnvoyAdminError(EnvoyError):
    """The admin API answered with a non-2xx status."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        self.status = status
        self.body = body
        super().__init__(f"admin {method} {path} answered {status}: {body.strip()[:500]}")
