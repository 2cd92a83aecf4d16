"""topology: stage package (docstring to write)."""
