"""Distinct address types and the KeyID layout of a physical address.

Guest-virtual, guest-physical and host-physical addresses are all ``int`` at run time; the
``NewType`` wrappers let a type checker catch a GPA passed where an HPA belongs. Convert only
through the named functions here.

With MAXPHYADDR = M and KEYID_BITS = k, bits M-1 .. M-k of a physical address carry the KeyID
and bits M-k-1 .. 0 the address proper (Intel MKTME spec, section "KeyID"; mktme.md §5). The
layout depends on how the BIOS activated MKTME, so it is an object, not a constant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NewType

GVA = NewType("GVA", int)
"""Guest-virtual (linear) address."""
GPA = NewType("GPA", int)
"""Guest-physical address."""
HPA = NewType("HPA", int)
"""Host-physical address without KeyID bits."""
KeyID = NewType("KeyID", int)
"""A MKTME KeyID: 0 is the TME (platform) KeyID."""
PhysAddr = NewType("PhysAddr", int)
"""A physical address as the CPU issues it: HPA with the KeyID in its upper bits."""

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
CACHE_LINE_SHIFT = 6
CACHE_LINE_SIZE = 1 << CACHE_LINE_SHIFT


@dataclass(frozen=True)
class KeyIdLayout:
    """Where the KeyID sits in a physical address for one MAXPHYADDR and KEYID_BITS.

    >>> layout = KeyIdLayout(maxphyaddr=46, keyid_bits=6)
    >>> hex(layout.compose(HPA(0x1000), KeyID(3)))
    '0x30000001000'
    >>> layout.split(PhysAddr(0x30000001000))
    (4096, 3)
    """

    maxphyaddr: int
    keyid_bits: int

    def __post_init__(self) -> None:
        if not 32 <= self.maxphyaddr <= 52:
            raise ValueError(f"maxphyaddr must be in 32..52, got {self.maxphyaddr}")
        if not 0 <= self.keyid_bits <= 15 or self.keyid_bits >= self.maxphyaddr - PAGE_SHIFT:
            raise ValueError(f"keyid_bits must be in 0..15 and leave a frame field, got {self.keyid_bits}")

    @property
    def keyid_shift(self) -> int:
        """Bit position of the KeyID's least significant bit (M - k)."""
        return self.maxphyaddr - self.keyid_bits

    @property
    def max_keyid(self) -> int:
        """Largest KeyID the layout can carry (2^k - 1; 0 when MKTME is off)."""
        return (1 << self.keyid_bits) - 1

    @property
    def keyid_mask(self) -> int:
        """The KeyID bits, in place."""
        return self.max_keyid << self.keyid_shift

    @property
    def address_mask(self) -> int:
        """The address bits left for the host-physical address proper."""
        return (1 << self.keyid_shift) - 1

    def compose(self, hpa: HPA, keyid: KeyID) -> PhysAddr:
        """The physical address that reaches ``hpa`` through ``keyid``."""
        if hpa < 0 or hpa & ~self.address_mask:
            raise ValueError(f"hpa {hpa:#x} does not fit below bit {self.keyid_shift}")
        if not 0 <= keyid <= self.max_keyid:
            raise ValueError(f"keyid {keyid} outside 0..{self.max_keyid}")
        return PhysAddr(hpa | (keyid << self.keyid_shift))

    def split(self, pa: PhysAddr) -> tuple[HPA, KeyID]:
        """(HPA, KeyID) of a physical address as issued by the CPU."""
        if pa < 0 or pa >> self.maxphyaddr:
            raise ValueError(f"physical address {pa:#x} exceeds MAXPHYADDR {self.maxphyaddr}")
        return HPA(pa & self.address_mask), KeyID((pa >> self.keyid_shift) & self.max_keyid)
