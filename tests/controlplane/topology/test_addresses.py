"""The one HOST:PORT parser (controlplane/topology/addresses.py)."""

from __future__ import annotations

import pytest

from controlplane.errors import ConfigError
from controlplane.topology.addresses import host_port, split_host_port


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("[::1]:18000", ("::1", 18000)),
        ("localhost:0", ("localhost", 0)),
        ("h:65535", ("h", 65535)),
        ("h:65536", None),
        (":80", None),
        ("h:", None),
        ("h", None),
        ("h:8x", None),
        ("h:٣", None),  # a digit, but not an ASCII one
    ],
)
def test_split_host_port(text: str, expected: tuple[str, int] | None) -> None:
    assert split_host_port(text) == expected


def test_host_port_names_the_flag() -> None:
    assert host_port("[::1]:9", "--xds") == ("::1", 9)
    with pytest.raises(ConfigError) as caught:
        host_port("h:0", "--xds")
    assert caught.value.path == "--xds" and str(caught.value) == "--xds: must be HOST:PORT"
    assert host_port("h:0", "--metrics", lowest_port=0) == ("h", 0)
