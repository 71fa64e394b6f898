"""arch layer (see the package docstring)."""
