"""cli: stage package (docstring to write)."""
