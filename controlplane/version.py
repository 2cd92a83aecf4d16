"""The installed healthplane's version, for `healthplane --version` and `healthplane_build_info`."""

from __future__ import annotations

from importlib import metadata


def version() -> str:
    """The version of the installed `healthplane` distribution ("unknown" when run from a bare tree)."""
    try:
        return metadata.version("healthplane")
    except metadata.PackageNotFoundError:
        return "unknown"
