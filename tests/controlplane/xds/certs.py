"""Test certificates made with the `openssl` command: a CA, a server cert for 127.0.0.1, client certs."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # signed by another CA: a client the control plane must refuse
    rogue_key: Path
    prober_cert: Path  # signed by the CA, named prober.internal: the one allowed on the prober link
    prober_key: Path


def _run(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def _signed(directory: Path, name: str, ca: Path, ca_key: Path, subject: str, ext: str) -> tuple[Path, Path]:
    key, csr, cert, extfile = (directory / f"{name}{s}" for s in (".key", ".csr", ".pem", ".ext"))
    extfile.write_text(ext)
    _run("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", subject)
    _run(
        "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
        "-out", cert, "-days", "2", "-sha256", "-extfile", extfile,
    )  # fmt: skip
    return cert, key


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _run(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert, "-days", "2",
        "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def make_certs(directory: Path) -> Certs:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make test certificates")
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _ca(directory, "test-ca")
    rogue_ca, rogue_ca_key = _ca(directory, "rogue-ca")
    server = _signed(
        directory, "server", ca, ca_key, "/CN=healthplane",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )  # fmt: skip
    client = _signed(directory, "client", ca, ca_key, "/CN=envoy", "extendedKeyUsage=clientAuth\n")
    rogue = _signed(directory, "rogue", rogue_ca, rogue_ca_key, "/CN=rogue", "extendedKeyUsage=clientAuth\n")
    prober = _signed(
        directory, "prober", ca, ca_key, "/CN=prober-1",
        "subjectAltName=DNS:prober.internal\nextendedKeyUsage=clientAuth\n",
    )  # fmt: skip
    return Certs(ca, *server, *client, *rogue, *prober)
