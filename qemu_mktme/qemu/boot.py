"""What a machine boots: QEMU's direct kernel boot (``-kernel``, ``-initrd``, ``-append``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BootSpec:
    """What QEMU's direct kernel boot needs: ``-kernel``, ``-initrd``, ``-append``."""

    kernel: Path
    initrd: Path | None = None
    append: str = ""
    min_memory: int = 0
    image: str | None = None
