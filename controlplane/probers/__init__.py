"""probers: stage package (docstring to write)."""
