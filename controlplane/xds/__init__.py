"""xDS: how snapshots reach Envoys. The ADS server and per-stream bookkeeping (nonce, ACK/NACK,
subscriptions), limits, TLS, the modelled delay, the stuck-stream watchdog, CSDS and bootstraps.
"""
