"""What the fleet sees and when: node records, NACK groups, propagation per node and version, Prometheus
metrics and charts. Fed by the ADS streams' callbacks; it never changes what is served.
"""
