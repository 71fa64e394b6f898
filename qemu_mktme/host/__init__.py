"""host layer (see the package docstring)."""
