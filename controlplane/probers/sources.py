"""Where verdicts come from besides the link: a prober running in this process.

The control plane does not import `prober/`: `prober.embedded` attaches an object of this shape
(`ControlPlane.local_prober`), which the process starts and stops and the admin API reads.
"""

from __future__ import annotations

from typing import Protocol

from controlplane.health.checks import CheckInfo
from controlplane.topology.model import Topology


class LocalProber(Protocol):
    """A prober in this process: its verdicts go straight to the control plane."""

    @property
    def source(self) -> str:
        """The verdicts' source, e.g. `prober:embedded`."""
        ...

    @property
    def running(self) -> bool: ...

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    def update_topology(self, topology: Topology) -> object: ...

    def check_info(self, cluster: str, endpoint: str) -> CheckInfo | None:
        """What the prober knows about one endpoint's checks (None: not checked by it)."""
        ...

    def unchecked(self) -> int:
        """Endpoints not checked once yet (readiness waits for 0)."""
        ...
