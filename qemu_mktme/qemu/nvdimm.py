"""Guest NVDIMMs on stock QEMU: ``-machine nvdimm=on``, one ``memory-backend-file`` and one
``-device nvdimm`` per module, the memory slots ``-m`` must then announce.

The backend is shared with QEMU (``share=on``) so that the host model maps it like guest RAM:
it is the module's **CPU view**, plaintext as the caches see it. Under MKTME the live layer
(:mod:`qemu_mktme.live.nvdimm`) gives a memfd of its own (``path=/proc/PID/fd/N``) and keeps
what the module holds at rest (ciphertext) in the media image, which QEMU never sees; without a
``path`` the driver makes a private file (0600, in the RAM directory, removed on teardown).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

NVDIMM_ALIGN = 2 << 20


@dataclass(frozen=True)
class NvdimmBackend:
    """One guest NVDIMM of ``size`` bytes (whole 2 MiB). ``path``: a plain, unencrypted NVDIMM on
    that file, which QEMU reads and writes itself (stock QEMU's NVDIMM, the benchmark's baseline);
    None: a private backend file that the driver creates and removes."""

    size: int
    path: Path | None = None

    def __post_init__(self) -> None:
        if self.size <= 0 or self.size % NVDIMM_ALIGN:
            raise ValueError(f"an NVDIMM's size must be a positive multiple of 2 MiB, got {self.size:#x}")


def backend_id(index: int) -> str:
    return f"nv{index}"


def memory_option(memory: int, nvdimms: tuple[NvdimmBackend, ...]) -> str:
    """``-m``'s value: RAM, plus one slot per NVDIMM and the maximum that leaves room for them."""
    if not nvdimms:
        return f"{memory >> 20}M"
    total = memory + sum(n.size for n in nvdimms)
    return f"{memory >> 20}M,slots={len(nvdimms)},maxmem={total >> 20}M"


def nvdimm_args(nvdimms: tuple[NvdimmBackend, ...], paths: list[Path]) -> list[str]:
    """The ``-object``/``-device`` pairs for ``nvdimms`` backed by the files ``paths``."""
    argv: list[str] = []
    for i, (nv, path) in enumerate(zip(nvdimms, paths, strict=True)):
        argv += ["-object", f"memory-backend-file,id={backend_id(i)},size={nv.size},share=on,mem-path={path}",
                 "-device", f"nvdimm,memdev={backend_id(i)},id=nvdimm{i}"]
    return argv
