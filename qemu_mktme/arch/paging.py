"""IA-32e paging (4- and 5-level) with KeyIDs: entry layouts per level, CR3, and the walk.

Layouts are SDM vol. 3A §4.5, tables 4-12 (CR3), 4-14 (PML5E), 4-15 (PML4E), 4-16 (PDPTE,
1 GiB page), 4-17 (PDPTE, page directory), 4-18 (PDE, 2 MiB page), 4-19 (PDE, page table),
4-20 (PTE), with the address field split into frame and KeyID (mktme.md §5). XD (bit 63) is
reserved when IA32_EFER.NXE = 0, so every layout comes in an ``nxe`` flavour. CR3 is modelled
without PCIDs (CR4.PCIDE = 0) and with bits 63:M reserved (no LAM).

>>> from qemu_mktme.arch.addresses import KeyIdLayout
>>> lay = KeyIdLayout(46, 6)
>>> e = make_entry(pte_layout(lay), 0x5000, keyid=3, p=1, rw=1)
>>> hex(e), entry_keyid(pte_layout(lay), e)
('0x30000005003', 3)
"""

from __future__ import annotations

from functools import cache

from .addresses import KeyIdLayout
from .bitfield import BitLayout
from .entry import address_rows, entry_address, entry_keyid, make_entry
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
    "PAGE_SIZE_1G",
    "PAGE_SIZE_2M",
    "PAGE_SIZE_4K",
    "cr3_layout",
    "entry_address",
    "entry_keyid",
    "make_entry",
    "pde_2m_layout",
    "pde_layout",
    "pdpte_1g_layout",
    "pdpte_layout",
    "pml4e_layout",
    "pml5e_layout",
    "pte_layout",
    "walk_ia32e",
]

PAGE_SIZE_4K = 1 << 12
PAGE_SIZE_2M = 1 << 21
PAGE_SIZE_1G = 1 << 30


def _xd(nxe: bool) -> tuple[str, int, int]:
    return ("xd", 63, 63) if nxe else ("reserved_xd", 63, 63)


@cache
def cr3_layout(layout: KeyIdLayout) -> BitLayout:
    # SDM table 4-12, CR4.PCIDE = 0
    return BitLayout("CR3", [
        ("ignored_2_0", 2, 0), ("pwt", 3, 3), ("pcd", 4, 4), ("ignored_11_5", 11, 5),
        *address_rows(layout, 12, reserved_top=63),
    ])


def _upper(name: str, layout: KeyIdLayout, nxe: bool) -> BitLayout:
    # SDM tables 4-14, 4-15, 4-17, 4-19: an entry that references a paging structure
    return BitLayout(name, [
        ("p", 0, 0), ("rw", 1, 1), ("us", 2, 2), ("pwt", 3, 3), ("pcd", 4, 4), ("a", 5, 5),
        ("ignored_6", 6, 6), ("ps", 7, 7), ("ignored_11_8", 11, 8),
        *address_rows(layout, 12), ("ignored_62_52", 62, 52), _xd(nxe),
    ])


def _leaf(name: str, layout: KeyIdLayout, nxe: bool, low: int) -> BitLayout:
    # SDM tables 4-16, 4-18, 4-20: an entry that maps a page (PAT at bit 12 for large pages)
    if low == 12:
        flags = [("pat", 7, 7), ("g", 8, 8), ("ignored_11_9", 11, 9)]
    else:
        flags = [("ps", 7, 7), ("g", 8, 8), ("ignored_11_9", 11, 9), ("pat", 12, 12),
                 ("reserved_low", low - 1, 13)]
    return BitLayout(name, [
        ("p", 0, 0), ("rw", 1, 1), ("us", 2, 2), ("pwt", 3, 3), ("pcd", 4, 4), ("a", 5, 5),
        ("d", 6, 6), *flags, *address_rows(layout, low), ("ignored_58_52", 58, 52),
        ("pk", 62, 59), _xd(nxe),
    ])


@cache
def pml5e_layout(layout: KeyIdLayout, nxe: bool = True) -> BitLayout:
    return _with_reserved_ps(_upper("PML5E", layout, nxe))


@cache
def pml4e_layout(layout: KeyIdLayout, nxe: bool = True) -> BitLayout:
    return _with_reserved_ps(_upper("PML4E", layout, nxe))


@cache
def pdpte_layout(layout: KeyIdLayout, nxe: bool = True) -> BitLayout:
    return _upper("PDPTE", layout, nxe)


@cache
def pdpte_1g_layout(layout: KeyIdLayout, nxe: bool = True) -> BitLayout:
    return _leaf("PDPTE_1G", layout, nxe, 30)


@cache
def pde_layout(layout: KeyIdLayout, nxe: bool = True) -> BitLayout:
    return _upper("PDE", layout, nxe)


@cache
def pde_2m_layout(layout: KeyIdLayout, nxe: bool = True) -> BitLayout:
    return _leaf("PDE_2M", layout, nxe, 21)


@cache
def pte_layout(layout: KeyIdLayout, nxe: bool = True) -> BitLayout:
    return _leaf("PTE", layout, nxe, 12)


def _with_reserved_ps(lay: BitLayout) -> BitLayout:
    """PML5E/PML4E: bit 7 (PS) is reserved (must be 0)."""
    rows = [(f.name if f.name != "ps" else "reserved_ps", f.high, f.low) for f in lay.fields]
    return BitLayout(lay.name, rows)


_PS = 1 << 7


def _levels(layout: KeyIdLayout, levels: int, nxe: bool) -> list[Level]:
    out: list[Level] = []
    if levels == 5:
        out.append(Level("PML5E", 48, lambda raw: (pml5e_layout(layout, nxe), None)))
    out += [
        Level("PML4E", 39, lambda raw: (pml4e_layout(layout, nxe), None)),
        Level("PDPTE", 30, lambda raw: (pdpte_1g_layout(layout, nxe), PAGE_SIZE_1G) if raw & _PS
              else (pdpte_layout(layout, nxe), None)),
        Level("PDE", 21, lambda raw: (pde_2m_layout(layout, nxe), PAGE_SIZE_2M) if raw & _PS
              else (pde_layout(layout, nxe), None)),
        Level("PTE", 12, lambda raw: (pte_layout(layout, nxe), PAGE_SIZE_4K)),
    ]
    return out


def walk_ia32e(
    read_qword: ReadQword,
    cr3: int,
    linear_address: int,
    layout: KeyIdLayout,
    *,
    levels: int = 4,
    nxe: bool = True,
) -> Translation | WalkFault:
    """Translate ``linear_address`` through the tables CR3 points at.

    ``levels`` is 4 or 5 (CR4.LA57). Outcomes: a :class:`Translation`, or a :class:`WalkFault`
    for a non-canonical address (the #GP case), a CR3 with reserved bits, a not-present entry
    (#PF, P = 0) or a present entry with reserved bits (#PF, RSVD = 1). Access rights are not
    checked: the walk answers "where", not "may".
    """
    if levels not in (4, 5):
        raise ValueError(f"levels must be 4 or 5, got {levels}")
    width = 48 if levels == 4 else 57
    top = linear_address >> (width - 1)
    if linear_address < 0 or top not in (0, (1 << (64 - width + 1)) - 1):
        return WalkFault(FaultKind.BAD_ADDRESS, "CR3", linear_address, (), "non-canonical")
    c = cr3_layout(layout).decode(cr3)
    if c.reserved:
        return WalkFault(FaultKind.RESERVED_BIT, "CR3", linear_address, (), f"CR3 reserved bits {c.reserved:#x}")
    return walk(
        read_qword, entry_address(c.layout, cr3), entry_keyid(c.layout, cr3), linear_address,
        _levels(layout, levels, nxe), layout, lambda b: bool(b.p), lambda b, _: reserved_check(b),
    )
