"""VT-d second-level paging entries with KeyIDs, and the second-level walk.

Intel VT-d spec rev 3.x §9.8 (SL-PML5E, SL-PML4E, SL-PDPE mapping 1 GiB / referencing an SL-PD,
SL-PDE mapping 2 MiB / referencing an SL-PT, SL-PTE). The host address width (HAW) is taken
equal to MAXPHYADDR, so bits 51:M are reserved. The MKTME VT-d patch ORs the KeyID into these
entries (mktme.md §5). An entry is present when R or W is set. The walk starts at the context
entry's second-level page-table pointer (SLPTPTR) with 3, 4 or 5 levels (AGAW 39/48/57 bits).
"""

from __future__ import annotations

from functools import cache

from .addresses import KeyIdLayout, PhysAddr
from .bitfield import BitLayout, Bits
from .entry import address_rows, entry_address, entry_keyid, make_entry
from .paging import PAGE_SIZE_1G, PAGE_SIZE_2M, PAGE_SIZE_4K
from .walk import (
    FaultKind,
    Level,
    ReadQword,
    Translation,
    WalkFault,
    reserved_check,
    walk,
)

__all__ = [
    "entry_address",
    "entry_keyid",
    "make_entry",
    "sl_pde_2m_layout",
    "sl_pde_layout",
    "sl_pdpe_1g_layout",
    "sl_pdpe_layout",
    "sl_pml4e_layout",
    "sl_pml5e_layout",
    "sl_pte_layout",
    "walk_vtd_second_level",
]


def _upper(name: str, layout: KeyIdLayout, ps_reserved: bool) -> BitLayout:
    return BitLayout(name, [
        ("r", 0, 0), ("w", 1, 1), ("x", 2, 2), ("ignored_6_3", 6, 3),
        ("reserved_ps" if ps_reserved else "ps", 7, 7), ("a", 8, 8), ("ignored_11_9", 11, 9),
        *address_rows(layout, 12), ("ignored_63_52", 63, 52),
    ])


def _leaf(name: str, layout: KeyIdLayout, low: int) -> BitLayout:
    mid = [("ignored_7", 7, 7)] if low == 12 else [("ps", 7, 7)]
    return BitLayout(name, [
        ("r", 0, 0), ("w", 1, 1), ("x", 2, 2), ("emt", 5, 3), ("ipat", 6, 6), *mid,
        ("a", 8, 8), ("d", 9, 9), ("ignored_10", 10, 10), ("snp", 11, 11),
        ("reserved_low", low - 1, 12), *address_rows(layout, low), ("ignored_61_52", 61, 52),
        ("tm", 62, 62), ("ignored_63", 63, 63),
    ])


@cache
def sl_pml5e_layout(layout: KeyIdLayout) -> BitLayout:
    return _upper("SL_PML5E", layout, True)


@cache
def sl_pml4e_layout(layout: KeyIdLayout) -> BitLayout:
    return _upper("SL_PML4E", layout, True)


@cache
def sl_pdpe_layout(layout: KeyIdLayout) -> BitLayout:
    return _upper("SL_PDPE", layout, False)


@cache
def sl_pdpe_1g_layout(layout: KeyIdLayout) -> BitLayout:
    return _leaf("SL_PDPE_1G", layout, 30)


@cache
def sl_pde_layout(layout: KeyIdLayout) -> BitLayout:
    return _upper("SL_PDE", layout, False)


@cache
def sl_pde_2m_layout(layout: KeyIdLayout) -> BitLayout:
    return _leaf("SL_PDE_2M", layout, 21)


@cache
def sl_pte_layout(layout: KeyIdLayout) -> BitLayout:
    return _leaf("SL_PTE", layout, 12)


_PS = 1 << 7


def _present(bits: Bits) -> bool:
    return bool(bits.raw & 3)


def walk_vtd_second_level(
    read_qword: ReadQword,
    slptptr: int,
    iova: int,
    layout: KeyIdLayout,
    *,
    levels: int = 4,
) -> Translation | WalkFault:
    """Translate a DMA address through second-level tables rooted at ``slptptr``.

    ``slptptr`` is the table's physical address as the context entry holds it (KeyID bits
    included). Outcomes: a :class:`Translation`, or a :class:`WalkFault` NOT_PRESENT (R = W = 0),
    RESERVED_BIT, or BAD_ADDRESS for an IOVA wider than the AGAW.
    """
    if levels not in (3, 4, 5):
        raise ValueError(f"levels must be 3, 4 or 5, got {levels}")
    if iova < 0 or iova >> (12 + 9 * levels):
        return WalkFault(FaultKind.BAD_ADDRESS, "SLPTPTR", iova, (), f"wider than a {levels}-level walk")
    hpa, keyid = layout.split(PhysAddr(slptptr & ~0xFFF))
    table: list[Level] = []
    if levels == 5:
        table.append(Level("SL_PML5E", 48, lambda raw: (sl_pml5e_layout(layout), None)))
    if levels >= 4:
        table.append(Level("SL_PML4E", 39, lambda raw: (sl_pml4e_layout(layout), None)))
    table += [
        Level("SL_PDPE", 30, lambda raw: (sl_pdpe_1g_layout(layout), PAGE_SIZE_1G) if raw & _PS
              else (sl_pdpe_layout(layout), None)),
        Level("SL_PDE", 21, lambda raw: (sl_pde_2m_layout(layout), PAGE_SIZE_2M) if raw & _PS
              else (sl_pde_layout(layout), None)),
        Level("SL_PTE", 12, lambda raw: (sl_pte_layout(layout), PAGE_SIZE_4K)),
    ]
    return walk(read_qword, hpa, keyid, iova, table, layout, _present, lambda b, _: reserved_check(b))
