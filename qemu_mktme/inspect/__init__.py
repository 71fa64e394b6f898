"""inspect layer (see the package docstring)."""
