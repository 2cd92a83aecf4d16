"""Several control planes at once: real `healthplane serve` processes, and simulated nodes that move between them."""

from lab.replicas.failover import FailoverFleet, FailoverNode
from lab.replicas.serve import Replicas, ServeError, ServeProcess

__all__ = ["FailoverFleet", "FailoverNode", "Replicas", "ServeError", "ServeProcess"]
