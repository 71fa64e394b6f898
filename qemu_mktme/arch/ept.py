"""EPT (extended page tables) with KeyIDs: EPTP, every level's entry layout, and the walk.

SDM vol. 3C §29.3.2 (tables 29-1..29-7 in recent editions: EPTP, EPT PML5E/PML4E, PDPTE
mapping 1 GiB / referencing a PD, PDE mapping 2 MiB / referencing a PT, PTE), with the address
field split into frame and KeyID as the KVM MKTME patches do (``pfn | keyid << (M - k)``,
mktme.md §5). A present EPT entry is one with any of R/W/X set; reserved bits, write-without-
read and the memory types 2, 3, 7 in a leaf are EPT misconfigurations.
"""

from __future__ import annotations

from enum import IntEnum
from functools import cache

from .addresses import KeyIdLayout
from .bitfield import BitLayout, Bits
from .entry import address_rows, entry_address, entry_keyid, make_entry
from .paging import PAGE_SIZE_1G, PAGE_SIZE_2M, PAGE_SIZE_4K
from .walk import FaultKind, Level, ReadQword, Translation, WalkFault, walk

__all__ = [
    "MemoryType",
    "entry_address",
    "entry_keyid",
    "ept_pde_2m_layout",
    "ept_pde_layout",
    "ept_pdpte_1g_layout",
    "ept_pdpte_layout",
    "ept_pml4e_layout",
    "ept_pml5e_layout",
    "ept_pte_layout",
    "eptp_layout",
    "make_entry",
    "make_eptp",
    "walk_ept",
]


class MemoryType(IntEnum):
    """EPTP / EPT leaf memory types (SDM §29.3.7)."""

    UC = 0
    WC = 1
    WT = 4
    WP = 5
    WB = 6


@cache
def eptp_layout(layout: KeyIdLayout) -> BitLayout:
    # SDM table 25-9 / "Extended-Page-Table Pointer (EPTP)"
    return BitLayout("EPTP", [
        ("memory_type", 2, 0), ("page_walk_length", 5, 3), ("ad_enable", 6, 6),
        ("sss_enforce", 7, 7), ("reserved_11_8", 11, 8),
        *address_rows(layout, 12, reserved_top=63),
    ])


def make_eptp(layout: KeyIdLayout, pml_hpa: int, keyid: int = 0, *, levels: int = 4,
              memory_type: MemoryType = MemoryType.WB, ad_enable: bool = False) -> int:
    """The EPTP for a PML4 (``levels=4``) or PML5 (``levels=5``) table at ``pml_hpa``."""
    if levels not in (4, 5):
        raise ValueError(f"levels must be 4 or 5, got {levels}")
    return make_entry(eptp_layout(layout), pml_hpa, keyid, memory_type=int(memory_type),
                      page_walk_length=levels - 1, ad_enable=int(ad_enable))


_RWX = [("r", 0, 0), ("w", 1, 1), ("x", 2, 2)]


def _upper(name: str, layout: KeyIdLayout, ps_reserved: bool) -> BitLayout:
    return BitLayout(name, [
        *_RWX, ("reserved_6_3", 6, 3), ("reserved_ps" if ps_reserved else "ps", 7, 7),
        ("a", 8, 8), ("ignored_9", 9, 9), ("xu", 10, 10), ("ignored_11", 11, 11),
        *address_rows(layout, 12), ("ignored_63_52", 63, 52),
    ])


def _leaf(name: str, layout: KeyIdLayout, low: int) -> BitLayout:
    mid = [("ignored_7", 7, 7)] if low == 12 else [("ps", 7, 7)]
    return BitLayout(name, [
        *_RWX, ("memory_type", 5, 3), ("ipat", 6, 6), *mid, ("a", 8, 8), ("d", 9, 9),
        ("xu", 10, 10), ("ignored_11", 11, 11), ("reserved_low", low - 1, 12),
        *address_rows(layout, low), ("ignored_56_52", 56, 52), ("vgp", 57, 57), ("pwa", 58, 58),
        ("ignored_59", 59, 59), ("sss", 60, 60), ("spp", 61, 61), ("ignored_62", 62, 62),
        ("suppress_ve", 63, 63),
    ])


@cache
def ept_pml5e_layout(layout: KeyIdLayout) -> BitLayout:
    return _upper("EPT_PML5E", layout, True)


@cache
def ept_pml4e_layout(layout: KeyIdLayout) -> BitLayout:
    return _upper("EPT_PML4E", layout, True)


@cache
def ept_pdpte_layout(layout: KeyIdLayout) -> BitLayout:
    return _upper("EPT_PDPTE", layout, False)


@cache
def ept_pdpte_1g_layout(layout: KeyIdLayout) -> BitLayout:
    return _leaf("EPT_PDPTE_1G", layout, 30)


@cache
def ept_pde_layout(layout: KeyIdLayout) -> BitLayout:
    return _upper("EPT_PDE", layout, False)


@cache
def ept_pde_2m_layout(layout: KeyIdLayout) -> BitLayout:
    return _leaf("EPT_PDE_2M", layout, 21)


@cache
def ept_pte_layout(layout: KeyIdLayout) -> BitLayout:
    return _leaf("EPT_PTE", layout, 12)


_PS = 1 << 7
_BAD_MEMORY_TYPES = {2, 3, 7}


def _present(bits: Bits) -> bool:
    return bool(bits.raw & 7)


def _checker(execute_only: bool):  # type: ignore[no-untyped-def]
    def check(bits: Bits, leaf_size: int | None) -> tuple[FaultKind, str] | None:
        if bits.reserved:
            return FaultKind.MISCONFIGURED, f"reserved bits {bits.reserved:#x}"
        if bits.w and not bits.r:
            return FaultKind.MISCONFIGURED, "write permission without read"
        if bits.x and not bits.r and not execute_only:
            return FaultKind.MISCONFIGURED, "execute-only not supported"
        if leaf_size is not None and bits.memory_type in _BAD_MEMORY_TYPES:
            return FaultKind.MISCONFIGURED, f"memory type {bits.memory_type}"
        return None
    return check


def walk_ept(
    read_qword: ReadQword,
    eptp: int,
    gpa: int,
    layout: KeyIdLayout,
    *,
    execute_only: bool = True,
) -> Translation | WalkFault:
    """Translate a guest-physical address through the EPT that ``eptp`` points at.

    Outcomes: a :class:`Translation` (``hpa`` and the leaf's ``keyid``), or a
    :class:`WalkFault`: NOT_PRESENT (EPT violation), MISCONFIGURED (EPT misconfiguration, also
    for an EPTP with reserved bits, an unsupported memory type or page-walk length), or
    BAD_ADDRESS for a GPA wider than the walk.
    """
    p = eptp_layout(layout).decode(eptp)
    if p.reserved or p.memory_type not in (MemoryType.UC, MemoryType.WB) or p.page_walk_length not in (3, 4):
        return WalkFault(FaultKind.MISCONFIGURED, "EPTP", gpa, (), f"invalid EPTP {eptp:#x}")
    levels = p.page_walk_length + 1
    if gpa < 0 or gpa >> (12 + 9 * levels):
        return WalkFault(FaultKind.BAD_ADDRESS, "EPTP", gpa, (), f"wider than a {levels}-level walk")
    table: list[Level] = []
    if levels == 5:
        table.append(Level("EPT_PML5E", 48, lambda raw: (ept_pml5e_layout(layout), None)))
    table += [
        Level("EPT_PML4E", 39, lambda raw: (ept_pml4e_layout(layout), None)),
        Level("EPT_PDPTE", 30, lambda raw: (ept_pdpte_1g_layout(layout), PAGE_SIZE_1G) if raw & _PS
              else (ept_pdpte_layout(layout), None)),
        Level("EPT_PDE", 21, lambda raw: (ept_pde_2m_layout(layout), PAGE_SIZE_2M) if raw & _PS
              else (ept_pde_layout(layout), None)),
        Level("EPT_PTE", 12, lambda raw: (ept_pte_layout(layout), PAGE_SIZE_4K)),
    ]
    return walk(read_qword, entry_address(p.layout, eptp), entry_keyid(p.layout, eptp), gpa,
                table, layout, _present, _checker(execute_only))
