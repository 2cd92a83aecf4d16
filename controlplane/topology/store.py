"""Where replicas share operator state: the `controlplane.store` section (issue 17).

    controlplane:
      store:
        replica_id: cp-1                    # default: HOSTNAME:XDS_PORT
        etcd:
          endpoints: ["10.0.0.1:2379", "10.0.0.2:2379"]
          prefix: /healthplane              # every key lives under it
          timeout: 5s                       # per request, and to connect
          tls: {ca: ca.pem, cert: client.pem, key: client-key.pem}
          username: healthplane
          password_file: /run/secrets/etcd  # or password: ...

`parse_store` validates it as part of `parse_topology` (same field paths in its errors). It is
read at start only, like `data_dir`: it names where the rest of the truth lives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from controlplane.topology.addresses import split_host_port

if TYPE_CHECKING:
    from controlplane.topology.fields import Field

_PREFIX = re.compile(r"/[A-Za-z0-9_.\-/]{0,200}")
_REPLICA_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,200}")


@dataclass(frozen=True, slots=True)
class EtcdTls:
    """TLS to etcd, as etcdctl's --cacert, --cert and --key: `ca` alone verifies the server only."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True, slots=True)
class EtcdSettings:
    """How to reach etcd: endpoints (tried in order), the key prefix, TLS and authentication."""

    endpoints: tuple[tuple[str, int], ...]
    prefix: str = "/healthplane"
    timeout: float = 5.0
    tls: EtcdTls | None = None
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    password_file: Path | None = None

    def read_password(self) -> str | None:
        """The password, from `password` or read from `password_file` now (a rotated secret is picked up)."""
        if self.password_file is None:
            return self.password
        return self.password_file.read_text(encoding="utf-8").strip()


@dataclass(frozen=True, slots=True)
class StoreConfig:
    """`controlplane.store`: the shared store and this replica's name in it."""

    etcd: EtcdSettings
    replica_id: str | None = None


def parse_store(f: Field) -> StoreConfig | None:
    """The `controlplane.store` section (`f`), validated; None when absent (the local file and SQLite)."""
    if f.missing:
        return None
    f.mapping({"etcd", "replica_id"})
    replica = f.child("replica_id")
    return StoreConfig(
        etcd=_etcd(f.child("etcd")),
        replica_id=None if replica.missing else replica.string(pattern=_REPLICA_ID),
    )


def _etcd(f: Field) -> EtcdSettings:
    if f.missing:
        raise f.error("is required (the only store there is): {endpoints: [HOST:PORT, ...]}")
    f.mapping({"endpoints", "prefix", "timeout", "tls", "username", "password", "password_file"})
    endpoints: list[tuple[str, int]] = []
    for item in f.child("endpoints").items():
        text = item.string()
        for scheme in ("http://", "https://"):  # as etcdctl's --endpoints takes them
            text = text.removeprefix(scheme)
        parsed = split_host_port(text)
        if parsed is None or not 0 < parsed[1] < 65536:
            raise item.error(f"{item.value!r} is not HOST:PORT (such as 127.0.0.1:2379)")
        endpoints.append(parsed)
    if not endpoints:
        raise f.child("endpoints").error("must list at least one HOST:PORT")
    prefix = f.child("prefix").string(default="/healthplane", pattern=_PREFIX).rstrip("/")
    if not prefix:
        raise f.child("prefix").error("must not be / alone: give the fleet a prefix of its own, such as /healthplane")
    username = f.child("username").opt_str()
    password = f.child("password").opt_str()
    password_file = _file(f.child("password_file"))
    if password is not None and password_file is not None:
        raise f.child("password").error("give password or password_file, not both")
    if username is not None and password is None and password_file is None:
        raise f.child("username").error("needs password or password_file")
    if username is None and (password is not None or password_file is not None):
        which = "password" if password is not None else "password_file"
        raise f.child(which).error("needs username")
    if password_file is not None:
        try:
            password_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise f.child("password_file").error(f"cannot read {password_file}: {exc}") from None
    return EtcdSettings(
        endpoints=tuple(endpoints),
        prefix=prefix,
        timeout=f.child("timeout").duration(default=5.0, positive=True),
        tls=_tls(f.child("tls")),
        username=username,
        password=password,
        password_file=password_file,
    )


def _file(f: Field) -> Path | None:
    if f.missing:
        return None
    base = Path(f.source).parent if f.source and Path(f.source).is_file() else Path.cwd()
    path = base / f.string()
    if not path.is_file():
        raise f.error(f"no such file: {path}")
    return path


def _tls(f: Field) -> EtcdTls | None:
    if f.missing:
        return None
    if f.value is True or f.value == {}:
        return EtcdTls()  # TLS with the system's roots, no client certificate
    f.mapping({"ca", "cert", "key"})
    tls = EtcdTls(ca=_file(f.child("ca")), cert=_file(f.child("cert")), key=_file(f.child("key")))
    if (tls.cert is None) != (tls.key is None):
        missing = "key" if tls.key is None else "cert"
        raise f.child(missing).error(f"is required with {'cert' if missing == 'key' else 'key'}")
    return tls
