"""The memory controller's address decoding: host physical address -> DRAM cell.

A DIMM tells the memory controller its geometry through its SPD chip. **BadRAM** (De
Meulemeester et al., IEEE S&P 2025) rewrites the SPD so that the module declares one more
address bit than it has: the controller drives that bit, the DIMM ignores it, and two host
physical addresses that differ only in that bit reach **one DRAM cell**. **Battering RAM** (IEEE
S&P 2026) gets the same effect from an interposer that switches the alias on *after* boot, so a
boot-time check of the memory configuration sees nothing.

Model: :class:`DimmMap` holds the alias bit ``B`` (``None``: no alias, the decoding is the
identity). While the alias is on, ``cell(hpa) = hpa & ~(1 << B)``: the lower half is where the
cells are; an address with bit ``B`` set is a *ghost* that reaches the cell below it. The memory
controller still computes the tweak, the MAC and every check from the address it was given;
only the storage is shared (:mod:`.memory` does that). Written by hand: there is no library for
a DRAM address map.

:func:`probe_aliases` is what AMD's fix for BadRAM does at boot (the BIOS writes a marker through
one address and looks for it at every address that differs in one bit).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..arch.addresses import PAGE_SHIFT
from ..errors import MktmeError


class DimmAliasError(MktmeError):
    """The DIMM map cannot be set as asked (bad bit, an attached view in the ghost half), or the
    BIOS's alias probe found an alias at boot."""


@dataclass(frozen=True)
class DimmMap:
    """The address decoding of the installed DIMMs: ``alias_bit`` is ignored by the DIMM."""

    alias_bit: int | None = None

    @property
    def mask(self) -> int:
        """The alias bit as a mask (0 when there is no alias): the hot path tests only this."""
        return 0 if self.alias_bit is None else 1 << self.alias_bit

    def cell(self, hpa: int) -> int:
        """The DRAM cell address that ``hpa`` reaches."""
        return hpa & ~self.mask

    def alias_of(self, hpa: int) -> int:
        """The other address reaching ``hpa``'s cell (``DimmAliasError`` without an alias)."""
        if self.alias_bit is None:
            raise DimmAliasError("the DIMM map has no alias bit")
        return hpa ^ self.mask

    def pieces(self, hpa: int, nbytes: int) -> list[tuple[int, int, int]]:
        """[(address, cell, nbytes)] covering [hpa, hpa + nbytes), cut where the cell mapping
        jumps (every ``2**alias_bit`` bytes)."""
        if self.alias_bit is None:
            return [(hpa, hpa, nbytes)]
        step = 1 << self.alias_bit
        out, pos, end = [], hpa, hpa + nbytes
        while pos < end:
            n = min(end, (pos // step + 1) * step) - pos
            out.append((pos, self.cell(pos), n))
            pos += n
        return out


def check_alias_bit(bit: int | None, space_bits: int) -> None:
    """``DimmAliasError`` unless ``bit`` is a page-or-above address bit inside the physical space."""
    if bit is None:
        return
    if not isinstance(bit, int) or not PAGE_SHIFT <= bit < space_bits:
        raise DimmAliasError(f"the DIMM alias bit must be in {PAGE_SHIFT}..{space_bits - 1} "
                             f"(a page-or-above bit of the {space_bits}-bit physical space), got {bit!r}")


def probe_aliases(read: Callable[[int, int], bytes], write: Callable[[int, bytes], None], space_bits: int,
                  base: int = 0) -> list[int]:
    """The BIOS's boot-time alias check (AMD's mitigation for BadRAM): for each address bit from
    the page bit up, write a marker through ``base`` and a different one through ``base`` with
    that bit set, then read ``base`` back: a changed marker means both addresses reach one cell.
    ``read``/``write`` are the raw DRAM accesses; what was there is put back. Returns the bits
    that alias."""
    found = []
    for bit in range(PAGE_SHIFT, space_bits):
        other = base | 1 << bit
        saved_base, saved_other = read(base, 64), read(other, 64)
        write(base, b"\xa5" * 64)
        write(other, b"\x5a" * 64)
        if read(base, 64) != b"\xa5" * 64:
            found.append(bit)
        write(other, saved_other)
        write(base, saved_base)
    return found


__all__ = ["DimmAliasError", "DimmMap", "check_alias_bit", "probe_aliases"]
