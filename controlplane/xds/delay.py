"""The modelled delay at run time: seconds to hold a node's responses, drawn from the topology's
propagation rules (topology/propagation.py) once per push, from one seeded RNG.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # topology imports this module, and stream imports topology
    from controlplane.xds.stream import StreamState
from controlplane.topology.propagation import DelayRule, PropagationConfig


class DelayModel:
    """Draws each node's modelled delay from the first rule that fits it."""

    def __init__(self, config: PropagationConfig) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self._rule: dict[tuple[str, str, str], DelayRule | None] = {}

    def rule_for(self, node: str, cluster: str, zone: str) -> DelayRule | None:
        key = (node, cluster, zone)
        if key not in self._rule:
            if len(self._rule) > 100_000:
                self._rule.clear()
            self._rule[key] = next((r for r in self.config.delays if r.matches(node, cluster, zone)), None)
        return self._rule[key]

    def delay(self, node: str, cluster: str = "", zone: str = "") -> float:
        """Seconds to wait before sending this node a response (0.0: none)."""
        if not self.config.delays:
            return 0.0
        rule = self.rule_for(node, cluster, zone)
        return 0.0 if rule is None else rule.distribution.sample(self.rng)


class ModelledDelay:
    """The server's delay hook: follows the served topology's propagation config as it changes."""

    def __init__(self, config: Callable[[], PropagationConfig]) -> None:
        self._config = config
        self.model = DelayModel(config())

    def __call__(self, stream: StreamState) -> float:
        config = self._config()
        if config is not self.model.config:
            if config != self.model.config:
                self.model = DelayModel(config)
            else:
                self.model.config = config
        return self.model.delay(stream.node_id or "", stream.node_cluster, stream.node_zone)
