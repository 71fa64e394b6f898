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

import contextlib
import ctypes
import fcntl
import gc
import logging
import mmap
import os
import stat
from collections.abc import Callable, Sequence

import numpy as np

from ..host.dma import AssignedDevice, DmaFault
from .native import DataplaneUnavailable, Mirror
from .protocol import MemRegion, ProtocolError

log = logging.getLogger(__name__)


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


def check_region(r: MemRegion, *, unsealed_ok: bool = False) -> None:
    """Refuse a region whose memory could vanish under a mapping of it (``ProtocolError``).

    A file the front end can shrink after we mapped it turns our next access into SIGBUS, which
    kills the backend for every connection. QEMU's memfd backend seals its memfds
    (``F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL``, ``seal=on`` by default, 7.2 and 10.0), so a
    region must come from a memfd sealed against shrinking, and its file must hold the whole
    region now. ``unsealed_ok``: an unsealed file (a ``memory-backend-file`` on tmpfs) is accepted;
    the caller has checked it is the guest-RAM file it created (0600) and maps itself.
    """
    where = f"memory region at GPA {r.guest_phys_addr:#x}"
    try:
        st = os.fstat(r.fd)
    except OSError as err:
        raise ProtocolError(f"{where}: {err.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ProtocolError(f"{where}: not a memory file")
    if r.memory_size <= 0 or r.mmap_offset < 0 or r.mmap_offset % mmap.PAGESIZE:
        raise ProtocolError(f"{where}: size {r.memory_size:#x} at offset {r.mmap_offset:#x} cannot be mapped")
    if st.st_size < r.mmap_offset + r.memory_size:
        raise ProtocolError(f"{where}: its file holds {st.st_size:#x} bytes, the region needs "
                            f"{r.mmap_offset + r.memory_size:#x}")
    try:
        seals = fcntl.fcntl(r.fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = -1                                  # not a memfd/shmem file: no seals possible
    if (seals >= 0 and seals & fcntl.F_SEAL_SHRINK) or unsealed_ok:
        return
    raise ProtocolError(f"{where}: its memfd is not sealed against shrinking (F_SEAL_SHRINK): "
                        "the front end could truncate it under the mapping")


def map_region(r: MemRegion, *, unsealed_ok: bool = False) -> mmap.mmap:
    """A shared read-write mapping of a checked region (``ProtocolError`` if it cannot be)."""
    check_region(r, unsealed_ok=unsealed_ok)
    try:
        return mmap.mmap(r.fd, r.memory_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                         offset=r.mmap_offset)
    except (OSError, ValueError) as err:
        raise ProtocolError(f"cannot map the memory region at GPA {r.guest_phys_addr:#x}: {err}") from None


def unmap(m: mmap.mmap, what: str) -> None:
    """Unmap ``m``; every view of it must be gone (a leak is logged, never silent)."""
    try:
        m.close()
    except BufferError:
        gc.collect()                                # views held by reference cycles
        try:
            m.close()
        except BufferError:
            log.error("%s: still referenced, its mapping stays until the references go", what)


class IommuMemory:
    """Guest memory through the host model's IOMMU domain (the device's only normal path).
    ``on_close`` runs when the device lets go of it (a new memory table, a reset)."""

    bypass = False

    def __init__(self, device: AssignedDevice, on_close: Callable[[], None] | None = None) -> None:
        self.device = device
        self._on_close = on_close
        self._mirror: Mirror | None = None

    def mirror(self, lib: ctypes.CDLL) -> Mirror:
        """The compiled dataplane's translation mirror of this device's IOTLB (made once, fed
        by ``AssignedDevice`` until :meth:`close`); ``DataplaneUnavailable`` if it cannot be."""
        if self._mirror is None:
            limit = max((r.gpa + r.size for r in self.device.guest.ranges), default=0)
            self._mirror = Mirror(lib, limit)
            self.device.attach_mirror(self._mirror)
        return self._mirror

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

    def write_views(self, segments: list[tuple[int, int]]) -> list[np.ndarray] | None:
        return self.device.dma_write_views(segments)

    def close(self) -> None:
        """Let go of the memory (this object is unusable after)."""
        on_close, self._on_close = self._on_close, None
        if hasattr(self, "device"):
            if self._mirror is not None:              # the queue threads are gone: drop its windows
                self.device.detach_mirror()
                self._mirror.close()
                self._mirror = None
            del self.device                         # its views of guest RAM must go before an unmap
        if on_close is not None:
            on_close()


class DirectMemory:
    """BYPASS of the MKTME model: the memfd regions mapped here and touched directly (benchmark
    baseline (b) only). Ranges are still checked against the regions."""

    bypass = True

    def __init__(self, regions: Sequence[MemRegion], *, unsealed_ok: bool = False) -> None:
        self._maps: list[tuple[int, int, mmap.mmap, np.ndarray]] = []
        for r in regions:
            m = map_region(r, unsealed_ok=unsealed_ok)
            self._maps.append((r.guest_phys_addr, r.memory_size, m, np.frombuffer(m, np.uint8)))
        self._mirror: Mirror | None = None

    def mirror(self, lib: ctypes.CDLL) -> Mirror:
        """The same compiled dataplane, its mirror mapping every region directly (no model)."""
        if self._mirror is None:
            if len(self._maps) > 64:
                raise DataplaneUnavailable(f"{len(self._maps)} memory regions (the mirror takes 64)")
            mirror = Mirror(lib, max((base + size for base, size, _, _ in self._maps), default=0))
            for i, (base, size, _, arr) in enumerate(self._maps):
                mirror.window(i, arr)
                iova = -(-base // 4096) * 4096
                while iova + 4096 <= base + size:        # 2 MiB leaves where they fit, else 4 KiB
                    leaf = 0x200000 if iova % 0x200000 == 0 and iova + 0x200000 <= base + size else 4096
                    mirror.fill(iova, leaf, iova - base, i)
                    iova += leaf
            self._mirror = mirror
        return self._mirror

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

    def write_views(self, segments: list[tuple[int, int]]) -> list[np.ndarray] | None:
        return [self._array(iova, n) for iova, n in segments]

    def close(self) -> None:
        if self._mirror is not None:
            self._mirror.close()
            self._mirror = None
        mappings = [m for _, _, m, _ in self._maps]
        self._maps = []                             # drops the arrays over the mappings
        for m in mappings:
            unmap(m, "direct guest-memory mapping")


def close_fds(regions: Sequence[MemRegion]) -> None:
    for r in regions:
        if r.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(r.fd)
