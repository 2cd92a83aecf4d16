"""Operator state shared by replicas (issue 17): the `OperatorStore` seam (changes.py), the local
store (today's behaviour) and etcd (etcd.py: `connect(settings)`, `EtcdStore`), with the pure
key layout, encoding and watch/reload logic in sync.py and the fleet/local split in fleet.py.
"""
