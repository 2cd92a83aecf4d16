"""admin: stage package (docstring to write)."""
