"""A device assigned to a VM doing DMA through the VM's IOMMU domain.

Every access is translated page by page by walking the VT-d second-level table in platform
memory; the HPA and the KeyID come from the leaf entry, so a domain tagged with the wrong KeyID
(or not tagged) makes the device read ciphertext-as-garbage and write garbage into the guest,
as on hardware. A non-present IOVA is a DMA remapping fault (:class:`DmaFault`).

:func:`translate_dma` is the one translation every device model uses (this module's
:class:`AssignedDevice`, and devices built on it in ``live/``): it is where the KeyID-aliasing
sanitizer's rule (c) hears of each page of a transfer (:meth:`~.sanitizer.Sanitizer.dma`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext

from ..arch.addresses import PAGE_SIZE, KeyID
from ..arch.walk import WalkFault
from ..errors import AddressError
from .guest import EncryptedGuest
from .sanitizer import sanitizer_of


class DmaFault(AddressError):
    """The IOMMU refused a DMA address (not mapped, or a reserved-bit fault)."""


def translate_dma(guest: EncryptedGuest, iova: int, nbytes: int, *, device: str,
                  direction: str) -> list[tuple[int, int, int]]:
    """(physical address with KeyID, offset into the transfer, length) per page of a DMA of
    ``nbytes`` at ``iova`` by ``device`` (``direction``: ``"read"`` or ``"write"``).

    Raises :class:`DmaFault` for an IOVA the IOMMU does not map. When a sanitizer watches the
    platform, each page is reported to it with the KeyID used and the VM's.
    """
    if direction not in ("read", "write"):
        raise ValueError(f"direction must be read or write, got {direction!r}")
    sanitizer = sanitizer_of(guest.platform.memory)
    out, done = [], 0
    while done < nbytes:
        t = guest.iommu.walk(iova + done)
        if isinstance(t, WalkFault):
            raise DmaFault(f"{device}: DMA remapping fault at IOVA {iova + done:#x}: {t}",
                           address=iova + done, nbytes=nbytes)
        n = min(nbytes - done, PAGE_SIZE - (iova + done) % PAGE_SIZE)
        if sanitizer is not None:
            sanitizer.dma(device=device, vm=guest.name, iova=iova + done, hpa=int(t.hpa), keyid=int(t.keyid),
                          expected_keyid=int(guest.keyid), direction=direction, nbytes=n)
        out.append((guest.layout.compose(t.hpa, KeyID(t.keyid)), done, n))
        done += n
    return out


def dma_quiet(guest: EncryptedGuest) -> "nullcontext[None] | Iterator[None]":
    """Context for the memory accesses of a DMA: rule (a) stays quiet, rule (c) has reported."""
    sanitizer = sanitizer_of(guest.platform.memory)
    return sanitizer.quiet() if sanitizer is not None else nullcontext()  # type: ignore[return-value]


class AssignedDevice:
    """A DMA-capable device in ``guest``'s IOMMU domain."""

    def __init__(self, guest: EncryptedGuest, name: str = "dev0") -> None:
        self.guest = guest
        self.name = name

    def _pieces(self, iova: int, nbytes: int, direction: str = "read") -> list[tuple[int, int, int]]:
        return translate_dma(self.guest, iova, nbytes, device=self.name, direction=direction)

    def dma_read(self, iova: int, nbytes: int) -> bytes:
        """Bytes the device reads at ``iova``."""
        mem = self.guest.platform.memory
        pieces = self._pieces(iova, nbytes, "read")
        with dma_quiet(self.guest):
            return b"".join(mem.read(pa, n) for pa, _, n in pieces)

    def dma_write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        """The device writes ``data`` at ``iova``."""
        view = memoryview(data).cast("B")
        mem = self.guest.platform.memory
        layout = self.guest.layout
        for pa, off, n in self._pieces(iova, len(view), "write"):
            with dma_quiet(self.guest):
                mem.write(pa, view[off:off + n])
            hpa, keyid = layout.split(pa)
            if keyid != self.guest.keyid:
                self.guest.foreign_write(self.guest.gpa_of(hpa), n, keyid)
