"""observe: stage package (docstring to write)."""
