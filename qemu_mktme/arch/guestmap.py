"""A guest's physical memory map: which guest-physical ranges are which bytes of its RAM block.

QEMU keeps a VM's RAM in one linear backend, but guest-physical addresses are not linear (q35
splits RAM below 4 GiB and continues at 4 GiB). Every layer that turns a GPA into a backend
offset (the QEMU driver's mapping, the host model's HPA math, the tracer) uses this one map.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import AddressError
from .addresses import GPA


@dataclass(frozen=True)
class GuestRange:
    """Guest-physical [gpa, gpa + size) is backend [offset, offset + size)."""

    gpa: int
    size: int
    offset: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


class GuestMap:
    """GPA <-> backend offset over sorted, non-overlapping :class:`GuestRange`\\ s."""

    def __init__(self, ranges: Iterable[GuestRange], *, name: str = "") -> None:
        self.ranges = tuple(sorted(ranges, key=lambda r: r.gpa))
        self._starts = [r.gpa for r in self.ranges]
        self._who = f"{name}: " if name else ""

    def offset_of(self, gpa: GPA | int, nbytes: int = 1) -> int:
        """Backend offset of ``[gpa, gpa + nbytes)``; ``AddressError`` unless it is all in one range."""
        r = self.range_of(gpa, nbytes)
        return r.offset + (gpa - r.gpa)

    def range_of(self, gpa: GPA | int, nbytes: int = 1) -> GuestRange:
        """The range holding all of ``[gpa, gpa + nbytes)`` (``AddressError`` if none)."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0:
            r = self.ranges[i]
            if gpa + max(nbytes, 1) <= r.end:
                return r
            if gpa < r.end:
                raise AddressError(f"{self._who}GPA range {gpa:#x}+{nbytes:#x} runs past the end of RAM at "
                                   f"{r.end:#x}", address=gpa, nbytes=nbytes)
        raise AddressError(f"{self._who}GPA {gpa:#x} is not guest RAM (RAM: {self.describe()})",
                           address=gpa, nbytes=nbytes)

    def gpa_of(self, offset: int) -> GPA:
        """The guest-physical address at which backend ``offset`` appears (``AddressError`` if none)."""
        gpa = self.gpa_at(offset)
        if gpa is None:
            raise AddressError(f"{self._who}backend offset {offset:#x} is not mapped into the guest", address=offset)
        return gpa

    def gpa_at(self, offset: int) -> GPA | None:
        """Like :meth:`gpa_of`, ``None`` where backend ``offset`` has no GPA (e.g. RAM under a hole)."""
        for r in self.ranges:
            if r.offset <= offset < r.offset + r.size:
                return GPA(r.gpa + offset - r.offset)
        return None

    def describe(self) -> str:
        return ", ".join(f"{r.gpa:#x}-{r.end - 1:#x}" for r in self.ranges)
