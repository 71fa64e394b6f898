"""The physical-address field shared by every paging structure that carries a KeyID.

With MAXPHYADDR = M and KEYID_BITS = k, an entry that points at a frame holds the frame's
address in bits M-k-1..low and the KeyID in bits M-1..M-k; bits above M-1 (to ``reserved_top``)
are reserved, because reserved-bit checks still use the full M (mktme.md §5). ``address_rows``
writes those rows for a layout table; ``make_entry`` / ``entry_address`` / ``entry_keyid`` move
values in and out, so callers never shift by hand.
"""

from __future__ import annotations

from .addresses import HPA, KeyID, KeyIdLayout
from .bitfield import BitLayout


def address_rows(layout: KeyIdLayout, low: int, reserved_top: int = 51) -> list[tuple[str, int, int]]:
    """Rows for the address field starting at bit ``low``: address, KeyID, reserved to ``reserved_top``."""
    m, shift = layout.maxphyaddr, layout.keyid_shift
    return [
        ("address", shift - 1, low),
        ("keyid", m - 1, shift),
        ("reserved_above_maxphyaddr", reserved_top, m),
    ]


def make_entry(lay: BitLayout, address: int, keyid: int = 0, **flags: int) -> int:
    """An entry of layout ``lay`` pointing at ``address`` through ``keyid`` with ``flags`` set.

    Raises ``ValueError`` when the address is misaligned for the field, does not fit below the
    KeyID bits, or the KeyID does not fit (including any non-zero KeyID when KEYID_BITS = 0).
    """
    f = lay.field("address")
    if address < 0 or address & ((1 << f.low) - 1):
        raise ValueError(f"{lay.name}: address {address:#x} is not aligned to {1 << f.low:#x}")
    if address >> (f.high + 1):
        raise ValueError(f"{lay.name}: address {address:#x} does not fit below bit {f.high + 1}")
    if "keyid" in lay:
        flags["keyid"] = keyid
    elif keyid:
        raise ValueError(f"{lay.name}: keyid {keyid} given but the layout has no KeyID bits")
    if "address" in flags:
        raise ValueError("pass the address positionally")
    return lay.encode(address=address >> f.low, **flags)


def entry_address(lay: BitLayout, raw: int) -> HPA:
    """The frame address an entry points at, without KeyID bits."""
    return HPA(raw & lay.field("address").mask)


def entry_keyid(lay: BitLayout, raw: int) -> KeyID:
    return KeyID(lay.get(raw, "keyid") if "keyid" in lay else 0)
