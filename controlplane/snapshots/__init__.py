"""Snapshots: immutable, versioned sets of Envoy resources built from the topology and the health, each
resource encoded once per version; the cache publishes them and keeps the recent history.
"""
