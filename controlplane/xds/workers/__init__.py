"""xDS worker processes (`healthplane serve --workers N`): N processes share the xDS port
(SO_REUSEPORT) and serve the ADS streams; the main process keeps everything there is one of.

- `wire.py` (pure): a snapshot as the bytes handed to a worker (once per snapshot, only what
  changed), and the per-stream records a worker sends back.
- `mirror.py` (pure): the main process's copy of every worker's streams, fed by those records
  and reported through the ordinary `StreamCallbacks`, so the node registry, propagation,
  metrics, NACK groups, CSDS and the watchdog see worker streams as in-process ones.
- `channel.py`: framed messages over the main<->worker socket.
- `worker.py`: the worker process (`python -m controlplane.xds.workers.worker FD`).
- `relay.py`: the other services of the xDS port (prober link, access logs, CSDS), relayed as
  raw bytes from a worker to the main process's private Unix-domain socket.
- `pool.py`: the main process's side: start, feed, watch and replace the workers.
"""
