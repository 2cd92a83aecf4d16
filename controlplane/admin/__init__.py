"""What operators see and change over HTTP (aiohttp): snapshots, endpoints, nodes, topology, faults, events,
status, metrics and propagation. The admin API sees the control plane through `admin.http.ControlPlaneView`.
"""
