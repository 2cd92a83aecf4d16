"""Where verdicts come from: the prober link (remote probers over gRPC), their staleness, and the shape
of a prober running in this process.
"""
