"""The topology: clusters, endpoints, listeners, health-check policy and the control plane's own settings,
parsed and validated from YAML into frozen dataclasses. Configuration only: no runtime state.
"""
