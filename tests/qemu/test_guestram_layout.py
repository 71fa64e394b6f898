"""The guest-physical layout parsed from QEMU's flat view, and GuestRAM addressing."""

from __future__ import annotations

from pathlib import Path

from qemu_mktme.arch.guestmap import GuestRange as RamRange
from qemu_mktme.qemu.guestram import parse_flat_view

DATA = Path(__file__).parent.parent / "data"


def test_q35_5g_layout_from_qemu_7_2():
    ranges = parse_flat_view((DATA / "mtree-q35-5G-qemu7.2.txt").read_text(), "ram0")
    assert ranges == [
        RamRange(0x0, 0xC0000, 0x0),
        RamRange(0x100000, 0x7FF00000, 0x100000),
        RamRange(0x1_0000_0000, 0xC000_0000, 0x8000_0000),   # above 4 GiB continues at offset 2 GiB
    ]


def test_other_backends_and_address_spaces_are_ignored():
    text = (DATA / "mtree-q35-5G-qemu7.2.txt").read_text()
    assert parse_flat_view(text, "pc.bios") == []            # rom, not ram
    assert parse_flat_view(text, "nonexistent") == []
