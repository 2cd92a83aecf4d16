"""Several control planes at once: real `healthplane serve` processes for tests and benchmarks."""

from lab.replicas.serve import Replicas, ServeError, ServeProcess

__all__ = ["Replicas", "ServeError", "ServeProcess"]
