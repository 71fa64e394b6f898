"""qemu layer (see the package docstring)."""
