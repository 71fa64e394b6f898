"""The TCG plugin shim: its C source (``mktme_shim.c``) and how it is built for the installed QEMU."""

from .build import abi_for, build_shim, phys_mode_for, source_path

__all__ = ["abi_for", "build_shim", "phys_mode_for", "source_path"]
