"""xds: stage package (docstring to write)."""
