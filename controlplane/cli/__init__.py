"""The `healthplane` command: serve, validate, bootstrap, the admin commands, and the prober's and the
lab's commands (the only part of `controlplane` that imports `prober` and `lab`).
"""
