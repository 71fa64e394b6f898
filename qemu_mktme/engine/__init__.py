"""engine layer (see the package docstring)."""
