"""A device assigned to a VM doing DMA through the VM's IOMMU domain.

Every access is translated page by page by walking the VT-d second-level table in platform
memory; the HPA and the KeyID come from the leaf entry, so a domain tagged with the wrong KeyID
(or not tagged) makes the device read ciphertext-as-garbage and write garbage into the guest,
as on hardware. A non-present IOVA is a DMA remapping fault (:class:`DmaFault`).
"""

from __future__ import annotations

from ..arch.addresses import PAGE_SIZE, KeyID
from ..arch.walk import WalkFault
from ..errors import AddressError
from .guest import EncryptedGuest


class DmaFault(AddressError):
    """The IOMMU refused a DMA address (not mapped, or a reserved-bit fault)."""


class AssignedDevice:
    """A DMA-capable device in ``guest``'s IOMMU domain."""

    def __init__(self, guest: EncryptedGuest, name: str = "dev0") -> None:
        self.guest = guest
        self.name = name

    def _pieces(self, iova: int, nbytes: int) -> list[tuple[int, int, int]]:
        """(physical address with KeyID, offset into the transfer, length) per page touched."""
        out, done = [], 0
        while done < nbytes:
            t = self.guest.iommu.walk(iova + done)
            if isinstance(t, WalkFault):
                raise DmaFault(f"{self.name}: DMA remapping fault at IOVA {iova + done:#x}: {t}",
                               address=iova + done, nbytes=nbytes)
            n = min(nbytes - done, PAGE_SIZE - (iova + done) % PAGE_SIZE)
            out.append((self.guest.layout.compose(t.hpa, KeyID(t.keyid)), done, n))
            done += n
        return out

    def dma_read(self, iova: int, nbytes: int) -> bytes:
        """Bytes the device reads at ``iova``."""
        mem = self.guest.platform.memory
        return b"".join(mem.read(pa, n) for pa, _, n in self._pieces(iova, nbytes))

    def dma_write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        """The device writes ``data`` at ``iova``."""
        view = memoryview(data).cast("B")
        mem = self.guest.platform.memory
        layout = self.guest.layout
        for pa, off, n in self._pieces(iova, len(view)):
            mem.write(pa, view[off:off + n])
            hpa, keyid = layout.split(pa)
            if keyid != self.guest.keyid:
                self.guest.foreign_write(self.guest.gpa_of(hpa), n, keyid)
