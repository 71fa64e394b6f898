"""How the device reaches guest memory.

:class:`IommuMemory` is the only path a device uses in normal operation: every descriptor, ring
entry and data buffer goes through ``host.dma.AssignedDevice`` (VT-d second-level walk, then
physical memory through the KeyID the leaf carries). :class:`DirectMemory` maps the memfd
regions QEMU passed in SET_MEM_TABLE and touches them directly: it BYPASSES the MKTME model
(no translation, no KeyID, no sanitizer) and exists only as the benchmark's "model bypassed"
baseline, never chosen by default.

Addresses: without VIRTIO_F_ACCESS_PLATFORM, descriptor addresses are guest-physical (IOVA =
GPA in the VM's domain); vring addresses in SET_VRING_ADDR are QEMU's virtual addresses, turned
into guest-physical ones with the memory table.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence

import numpy as np

from ..host.dma import AssignedDevice, DmaFault
from .protocol import MemRegion
import contextlib


class MemTable:
    """The regions of the last SET_MEM_TABLE (fds closed once the table is read)."""

    def __init__(self, regions: Sequence[MemRegion]) -> None:
        self.regions = list(regions)

    def gpa_of_uva(self, uva: int) -> int:
        """QEMU's virtual address -> guest-physical address (``DmaFault`` if in no region)."""
        for r in self.regions:
            if r.userspace_addr <= uva < r.userspace_addr + r.memory_size:
                return r.guest_phys_addr + uva - r.userspace_addr
        raise DmaFault(f"vring address {uva:#x} lies in no memory region", address=uva)


class IommuMemory:
    """Guest memory through the host model's IOMMU domain (the device's only normal path)."""

    bypass = False

    def __init__(self, device: AssignedDevice) -> None:
        self.device = device

    def read(self, iova: int, nbytes: int) -> bytes:
        return self.device.dma_read(iova, nbytes)

    def read_arrays(self, iova: int, nbytes: int) -> list[np.ndarray]:
        return self.device.dma_read_arrays(iova, nbytes)

    def write(self, iova: int, data: bytes | bytearray | memoryview | np.ndarray) -> None:
        self.device.dma_write(iova, data)

    def write_sg(self, segments: list[tuple[int, int]], data: np.ndarray) -> None:
        self.device.dma_write_sg(segments, data)

    def read_sg(self, segments: list[tuple[int, int]]) -> list[np.ndarray]:
        return self.device.dma_read_sg(segments)

    def close(self) -> None:
        pass


class DirectMemory:
    """BYPASS of the MKTME model: the memfd regions mapped here and touched directly (benchmark
    baseline (b) only). Ranges are still checked against the regions."""

    bypass = True

    def __init__(self, regions: Sequence[MemRegion]) -> None:
        self._maps: list[tuple[int, int, mmap.mmap, np.ndarray]] = []
        for r in regions:
            m = mmap.mmap(r.fd, r.memory_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                          offset=r.mmap_offset) if r.mmap_offset % mmap.PAGESIZE == 0 else None
            if m is None:
                raise DmaFault(f"memory region at {r.guest_phys_addr:#x} has an unaligned mmap offset")
            self._maps.append((r.guest_phys_addr, r.memory_size, m, np.frombuffer(m, np.uint8)))

    def _array(self, gpa: int, nbytes: int) -> np.ndarray:
        for base, size, _, arr in self._maps:
            if base <= gpa and gpa + nbytes <= base + size:
                return arr[gpa - base:gpa - base + nbytes]
        raise DmaFault(f"direct access {gpa:#x}+{nbytes:#x} outside guest RAM", address=gpa, nbytes=nbytes)

    def read(self, iova: int, nbytes: int) -> bytes:
        return self._array(iova, nbytes).tobytes()

    def read_arrays(self, iova: int, nbytes: int) -> list[np.ndarray]:
        return [self._array(iova, nbytes)]

    def write(self, iova: int, data: bytes | bytearray | memoryview | np.ndarray) -> None:
        src = data.reshape(-1).view(np.uint8) if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
        self._array(iova, src.size)[:] = src

    def write_sg(self, segments: list[tuple[int, int]], data: np.ndarray) -> None:
        pos = 0
        for iova, n in segments:
            self._array(iova, n)[:] = data[pos:pos + n]
            pos += n

    def read_sg(self, segments: list[tuple[int, int]]) -> list[np.ndarray]:
        return [self._array(iova, n) for iova, n in segments]

    def close(self) -> None:
        maps, self._maps = self._maps, []
        for *_, m, _arr in maps:
            del _arr
            with contextlib.suppress(BufferError):
                m.close()


def close_fds(regions: Sequence[MemRegion]) -> None:
    for r in regions:
        if r.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(r.fd)
