"""snapshots: stage package (docstring to write)."""
