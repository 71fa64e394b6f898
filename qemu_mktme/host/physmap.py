"""Who owns which host-physical addresses: the host kernel's frames and the VMs' RAM ranges.

The emulated host keeps its own structures (page tables, the PCONFIG struct page) in a low
region reached through KeyID 0, and gives every VM a contiguous HPA range for its RAM, aligned
so that EPT and IOMMU tables can use 2 MiB leaves. Overlaps are refused, not silently allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..arch.addresses import HPA, PAGE_SIZE
from ..errors import AddressError, HostError

HOST_KERNEL_BASE = 0x0100_0000          # 16 MiB: host frames start here
HOST_KERNEL_NBYTES = 0x0F00_0000        # up to 256 MiB
GUEST_RAM_BASE = 1 << 32                # VM RAM from 4 GiB up
GUEST_RAM_ALIGN = 1 << 30               # 1 GiB: every VM range starts on a 1 GiB boundary


class FrameAllocator:
    """4 KiB host frames from [base, base + nbytes); freed frames are reused."""

    def __init__(self, base: int = HOST_KERNEL_BASE, nbytes: int = HOST_KERNEL_NBYTES) -> None:
        self.base, self.end = base, base + nbytes
        self._next = base
        self._free: list[int] = []

    def alloc(self) -> HPA:
        if self._free:
            return HPA(self._free.pop())
        if self._next >= self.end:
            raise HostError(f"host frame pool exhausted ({(self.end - self.base) >> 20} MiB)")
        frame, self._next = self._next, self._next + PAGE_SIZE
        return HPA(frame)

    def free(self, frame: int) -> None:
        if not self.base <= frame < self._next or frame % PAGE_SIZE:
            raise ValueError(f"{frame:#x} is not a frame of this allocator")
        self._free.append(frame)

    @property
    def in_use(self) -> int:
        return (self._next - self.base) // PAGE_SIZE - len(self._free)


@dataclass(frozen=True)
class HpaRange:
    owner: str
    hpa: int
    nbytes: int
    kind: str = "RAM"                   # or "NVDIMM": persistent memory, placed like RAM

    @property
    def end(self) -> int:
        return self.hpa + self.nbytes


class HpaRanges:
    """Non-overlapping HPA ranges for VM RAM below ``limit`` (the address bits left by the KeyID)."""

    def __init__(self, limit: int, base: int = GUEST_RAM_BASE, align: int = GUEST_RAM_ALIGN) -> None:
        self.limit, self.base, self.align = limit, base, align
        self._ranges: list[HpaRange] = []

    def reserve(self, owner: str, nbytes: int, hpa: int | None = None, *, kind: str = "RAM") -> HpaRange:
        """``nbytes`` at ``hpa``, or at the lowest free aligned address. ``AddressError`` when
        the range overlaps another, leaves physical memory, or nothing is free."""
        if nbytes <= 0 or nbytes % PAGE_SIZE:
            raise ValueError(f"nbytes must be a positive multiple of 4 KiB, got {nbytes:#x}")
        if hpa is None:
            hpa = self.place(nbytes)
        if hpa % PAGE_SIZE:
            raise ValueError(f"hpa {hpa:#x} is not 4 KiB aligned")
        conflict = self._conflict(hpa, nbytes)
        if conflict:
            raise AddressError(f"HPA {hpa:#x}+{nbytes:#x} {conflict}", address=hpa, nbytes=nbytes)
        rng = HpaRange(owner, hpa, nbytes, kind)
        self._ranges.append(rng)
        return rng

    def place(self, nbytes: int) -> int:
        """Where ``reserve(owner, nbytes)`` without an address would put the range: the lowest
        free ``align``-aligned address (checked by ``reserve``, not here)."""
        hpa = self.base
        for r in sorted(self._ranges, key=lambda r: r.hpa):
            if hpa + nbytes <= r.hpa:
                break
            hpa = max(hpa, -(-r.end // self.align) * self.align)
        return hpa

    def why_not(self, hpa: int, nbytes: int) -> str | None:
        """Why ``[hpa, hpa + nbytes)`` cannot be reserved (overlap, beyond memory), or None."""
        return self._conflict(hpa, nbytes)

    def is_free(self, hpa: int, nbytes: int) -> bool:
        """Whether ``reserve(owner, nbytes, hpa)`` would succeed."""
        return hpa % PAGE_SIZE == 0 and nbytes > 0 and nbytes % PAGE_SIZE == 0 and not self._conflict(hpa, nbytes)

    def _conflict(self, hpa: int, nbytes: int) -> str | None:
        if hpa < HOST_KERNEL_BASE + HOST_KERNEL_NBYTES:
            return "overlaps host kernel memory"
        if hpa + nbytes > self.limit:
            return f"exceeds physical memory ({self.limit:#x} bytes addressable with these KeyID bits)"
        for r in self._ranges:
            if r.hpa < hpa + nbytes and hpa < r.end:
                return f"overlaps {r.owner}'s {r.kind} at {r.hpa:#x}+{r.nbytes:#x}"
        return None

    def release(self, rng: HpaRange) -> None:
        self._ranges.remove(rng)

    def owner_of(self, hpa: int) -> HpaRange | None:
        return next((r for r in self._ranges if r.hpa <= hpa < r.end), None)
