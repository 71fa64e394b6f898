"""Build the TCG plugin shim for the installed QEMU with the system gcc, into the cache.

No distribution ships QEMU's plugin header, so ``mktme_shim.c`` declares the ABI itself and is
compiled here, once per (source sha256, compiler flags, plugin API variant), into
``$QEMU_MKTME_CACHE/shim/<key>/mktme_shim.so`` (:func:`qemu_mktme.compiled.compile_library`).

Plugin API variants (QEMU's ``QEMU_PLUGIN_VERSION``), chosen from ``qemu-system-x86_64 --version``:

======  ==============  =========================================================
 ABI     QEMU            what differs for the shim
======  ==============  =========================================================
 1       7.2 .. 8.2      ``qemu_plugin_insn_data`` returns a pointer
 2       9.0             the loader requires version >= 2
 3       9.1 .. 10.x     ``qemu_plugin_insn_data`` copies into a caller's buffer
======  ==============  =========================================================

``qemu_plugin_hwaddr_phys_addr`` also changed meaning in 8.2: before, it returns the RAMBlock
address (``ram_addr``: the guest-RAM backend offset for our RAM, not the GPA above 4 GiB); from
8.2 on, the guest-physical address. :func:`phys_mode_for` tells the shim which.
"""

from __future__ import annotations

import hashlib
import shutil
from importlib import resources
from pathlib import Path

from ...compiled import CompileFailed, cache_root, compile_library
from ...errors import ShimError
from ...qemu.binary import QemuBinary, find_qemu

SOURCE_NAME = "mktme_shim.c"
LIBRARY_NAME = "mktme_shim.so"
CFLAGS = ("-O2", "-std=gnu11", "-shared", "-fPIC", "-fvisibility=hidden", "-fno-plt", "-pthread",
          "-Wall", "-Wextra", "-Werror")
SUPPORTED = "QEMU 7.2 to 10.x (plugin API 1 to 5)"


def abi_for(version: tuple[int, int, int]) -> int:
    """The shim variant for a QEMU version; ``ShimError`` naming it when there is none."""
    major, minor = version[0], version[1]
    if (major, minor) < (7, 2):
        raise ShimError(f"QEMU {'.'.join(map(str, version))} is too old for the shim: it needs "
                        f"{SUPPORTED}")
    if major <= 8:
        return 1
    if (major, minor) == (9, 0):
        return 2
    if major <= 10:
        return 3
    raise ShimError(f"QEMU {'.'.join(map(str, version))} is newer than the shim knows: it supports "
                    f"{SUPPORTED}; its plugin API may have changed")


def phys_mode_for(version: tuple[int, int, int]) -> str:
    """What ``qemu_plugin_hwaddr_phys_addr`` returns on this QEMU: ``ramaddr`` or ``gpa``."""
    return "ramaddr" if tuple(version[:2]) < (8, 2) else "gpa"


def source_path() -> Path:
    """The shim's C source, shipped as package data."""
    return Path(str(resources.files(__package__).joinpath(SOURCE_NAME)))


def build_shim(qemu: QemuBinary | None = None, *, abi: int | None = None, source: Path | None = None,
               cache: Path | None = None, cc: str | None = None) -> Path:
    """Path of the shim library for ``qemu`` (default: the QEMU ``find_qemu()`` finds), built if needed.

    ``abi`` forces a variant (tests build the wrong one on purpose). Raises ``ShimError`` for an
    unsupported QEMU version, a missing compiler, or a compile error (with gcc's output).
    """
    if abi is None:
        abi = abi_for((qemu or find_qemu()).version)
    elif abi not in (1, 2, 3):
        raise ValueError(f"abi must be 1, 2 or 3, got {abi!r}")
    src = source or source_path()
    try:
        text = src.read_bytes()
    except OSError as err:
        raise ShimError(f"cannot read the shim source {src}: {err.strerror}") from err
    flags = (*CFLAGS, f"-DMKTME_PLUGIN_ABI={abi}")
    key = hashlib.sha256(text + b"\0" + " ".join(flags).encode()).hexdigest()[:24]
    library = (cache or cache_root()) / "shim" / f"{key}-abi{abi}" / LIBRARY_NAME
    if library.is_file():               # built already: no compiler needed (a service's minimal PATH),
        return library                  # as compiled.build_cached does for the other two C parts
    compiler = cc or shutil.which("gcc")
    if compiler is None:
        raise ShimError("gcc not found: it builds the TCG plugin shim (apt-get install gcc)")
    try:
        return compile_library(library, compiler, src, flags)
    except CompileFailed as err:
        raise ShimError(f"building the shim ({src.name}, plugin API {abi}) failed:\n{err.output[-3000:]}") from None
