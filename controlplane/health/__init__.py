"""health: stage package (docstring to write)."""
