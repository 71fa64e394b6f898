"""Pure page walks: a table of levels, a ``read_qword`` callable, a typed outcome.

The three formats (IA-32e paging, EPT, VT-d second level) walk the same way: index a table with
9 bits of the input address, read the 8-byte entry through the KeyID the parent entry carried,
stop at a leaf. Each format module describes its levels with :class:`Level`; :func:`walk` does
the rest and returns a :class:`Translation` or a :class:`WalkFault` (never raises for what the
tables contain, since a bad table is data, not a bug).

``read_qword(phys_addr)`` receives the entry's physical address *with* the KeyID of the table in
its upper bits, exactly as the hardware issues it; pass ``platform.memory.read_qword``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

from .addresses import HPA, KeyID, KeyIdLayout, PhysAddr
from .bitfield import BitLayout, Bits
from .entry import entry_address, entry_keyid

ReadQword = Callable[[int], int]


class FaultKind(Enum):
    NOT_PRESENT = "not present"  # #PF (P=0), EPT violation, DMA remapping fault
    RESERVED_BIT = "reserved bit set"  # #PF with RSVD=1, or VT-d reserved-field fault
    MISCONFIGURED = "misconfigured"  # EPT misconfiguration: reserved bits, W without R, bad memory type
    BAD_ADDRESS = "address out of range"  # non-canonical linear address, input above the walk width


@dataclass(frozen=True)
class VisitedEntry:
    """One entry read during a walk: its level name, where it was read, what it held."""

    level: str
    phys_addr: PhysAddr
    entry: Bits

    @property
    def raw(self) -> int:
        return self.entry.raw


@dataclass(frozen=True)
class Translation:
    """A successful walk: ``hpa`` (no KeyID bits) and the leaf's ``keyid``."""

    input_address: int
    hpa: HPA
    keyid: KeyID
    page_size: int
    entries: tuple[VisitedEntry, ...]
    layout: KeyIdLayout

    @property
    def phys_addr(self) -> PhysAddr:
        """The physical address the CPU issues: HPA with the KeyID in its upper bits."""
        return self.layout.compose(self.hpa, self.keyid)

    @property
    def leaf(self) -> VisitedEntry:
        return self.entries[-1]


@dataclass(frozen=True)
class WalkFault:
    """A walk that stopped: ``kind`` at ``level`` (the entries read so far, the faulting one last)."""

    kind: FaultKind
    level: str
    input_address: int
    entries: tuple[VisitedEntry, ...]
    detail: str = ""

    def __str__(self) -> str:
        extra = f" ({self.detail})" if self.detail else ""
        return f"{self.kind.value} at {self.level} for {self.input_address:#x}{extra}"


@dataclass(frozen=True)
class Level:
    """One level of a walk.

    ``table_layout(raw)`` picks the layout for the entry (non-leaf, or leaf when its PS bit says
    so); ``leaf_size`` is the page size mapped when that layout is a leaf (``None`` for a
    non-leaf layout). ``check(bits)`` returns a fault for a present entry, or ``None``.
    """

    name: str
    shift: int
    layout_for: Callable[[int], tuple[BitLayout, int | None]]


def walk(
    read_qword: ReadQword,
    root_hpa: int,
    root_keyid: int,
    address: int,
    levels: Sequence[Level],
    layout: KeyIdLayout,
    present: Callable[[Bits], bool],
    check: Callable[[Bits, int | None], tuple[FaultKind, str] | None],
) -> Translation | WalkFault:
    """Walk ``levels`` from the table at ``root_hpa`` / ``root_keyid`` for ``address``."""
    visited: list[VisitedEntry] = []
    table, keyid = root_hpa, root_keyid
    for level in levels:
        index = (address >> level.shift) & 0x1FF
        pa = layout.compose(HPA(table | index * 8), KeyID(keyid))
        raw = read_qword(pa)
        lay, leaf_size = level.layout_for(raw)
        bits = lay.decode(raw)
        visited.append(VisitedEntry(level.name, pa, bits))
        if not present(bits):
            return WalkFault(FaultKind.NOT_PRESENT, level.name, address, tuple(visited))
        problem = check(bits, leaf_size)
        if problem is not None:
            return WalkFault(problem[0], level.name, address, tuple(visited), problem[1])
        table, keyid = entry_address(lay, raw), entry_keyid(lay, raw)
        if leaf_size is not None:
            hpa = HPA(table | (address & (leaf_size - 1)))
            return Translation(address, hpa, KeyID(keyid), leaf_size, tuple(visited), layout)
    raise AssertionError("a level table must end with a leaf level")  # pragma: no cover


def reserved_check(bits: Bits) -> tuple[FaultKind, str] | None:
    if bits.reserved:
        return FaultKind.RESERVED_BIT, f"reserved bits {bits.reserved:#x}"
    return None
