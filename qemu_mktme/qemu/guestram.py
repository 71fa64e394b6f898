"""Guest-physical memory of a running QEMU, mapped into this process.

QEMU keeps guest RAM in a shared memory backend (memfd or a file, ``share=on``); mapping the same
object here gives reads and writes at memory speed with no copy through QEMU. The backend is one
linear block, but guest-physical addresses are not: on q35, RAM is split at 2 GiB (or 2.75 GiB)
below 4 GiB and continues at 4 GiB. The real layout is read from QEMU's own flat view
(``info mtree -f``), never assumed.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
from pathlib import Path

import numpy as np

from ..arch.addresses import GPA
from ..arch.guestmap import GuestMap, GuestRange
from ..errors import AttachError


_FLAT_LINE = re.compile(
    r"^\s*([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, ([\w-]+)\): (\S+)(?: @([0-9a-f]+))?", re.M)


def parse_flat_view(mtree: str, backend: str) -> list[GuestRange]:
    """RAM ranges of memory region ``backend`` in the system address space of ``info mtree -f``
(an NVDIMM's backend shows as ``nv-ram``).

    Adjacent ranges that are contiguous both in GPA and in the backend are merged.
    """
    ranges: list[GuestRange] = []
    for view in mtree.split("FlatView #")[1:]:
        if 'AS "memory"' not in view:
            continue
        for m in _FLAT_LINE.finditer(view):
            start, last, kind, name, offset = m.groups()
            if name != backend or kind not in ("ram", "nv-ram"):     # nv-ram: an NVDIMM's backend
                continue
            gpa, size = int(start, 16), int(last, 16) - int(start, 16) + 1
            rng = GuestRange(gpa, size, int(offset, 16) if offset else 0)
            prev = ranges[-1] if ranges else None
            if prev and prev.end == rng.gpa and prev.offset + prev.size == rng.offset:
                ranges[-1] = GuestRange(prev.gpa, prev.size + rng.size, prev.offset)
            else:
                ranges.append(rng)
        break
    return sorted(ranges, key=lambda r: r.gpa)


class GuestRAM:
    """A guest's RAM as Python sees it: ``read``/``write``/``view`` by guest-physical address.

    >>> ram.write(GPA(0x200000), b"pattern")       # doctest: +SKIP
    >>> ram.read(GPA(0x200000), 7)                 # doctest: +SKIP
    b'pattern'
    """

    def __init__(self, backend_path: str | os.PathLike[str], size: int, ranges: list[GuestRange],
                 *, backend_id: str = "ram0") -> None:
        if not ranges:
            raise AttachError(f"QEMU's memory map shows no RAM from backend {backend_id!r}")
        try:
            fd = os.open(backend_path, os.O_RDWR)
        except OSError as err:
            raise AttachError(f"cannot open guest RAM backend {backend_path}: {err.strerror}") from err
        try:
            actual = os.fstat(fd).st_size
            if actual < size:
                raise AttachError(f"guest RAM backend {backend_path} holds {actual} bytes, QEMU says {size}")
            self._mmap = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd  # kept for SEEK_DATA / SEEK_HOLE
        for r in ranges:
            if r.offset + r.size > size:
                raise AttachError(f"RAM range at GPA {r.gpa:#x} lies beyond the backend ({size} bytes)")
        self.backend_id = backend_id
        self.backend_path = Path(backend_path)
        self.size = size
        self.map = GuestMap(ranges)
        self.ranges = self.map.ranges
        self._buffer = memoryview(self._mmap)

    def __repr__(self) -> str:
        return f"<GuestRAM {self.backend_id} {self.size >> 20} MiB at {self.map.describe()}>"

    # ----------------------------------------------------------------- addressing

    def offset_of(self, gpa: GPA | int, nbytes: int = 1) -> int:
        """Backend offset of ``[gpa, gpa + nbytes)``; ``AddressError`` unless it is all in one range."""
        return self.map.offset_of(gpa, nbytes)

    def gpa_of(self, offset: int) -> GPA:
        """The guest-physical address at which backend ``offset`` appears (``AddressError`` if none)."""
        return self.map.gpa_of(offset)

    # ----------------------------------------------------------------- access

    def read(self, gpa: GPA | int, nbytes: int) -> bytes:
        """A copy of ``nbytes`` at ``gpa``."""
        off = self.offset_of(gpa, nbytes)
        return bytes(self._buffer[off:off + nbytes])

    def write(self, gpa: GPA | int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` at ``gpa``, as a device (or a debugger) writing guest memory would."""
        view = memoryview(data).cast("B")
        off = self.offset_of(gpa, len(view))
        self._buffer[off:off + len(view)] = view

    def view(self, gpa: GPA | int, nbytes: int) -> memoryview:
        """A zero-copy, writable view of ``nbytes`` at ``gpa`` (release it before closing)."""
        off = self.offset_of(gpa, nbytes)
        return self._buffer[off:off + nbytes]

    def array(self, gpa: GPA | int, nbytes: int) -> np.ndarray:
        """Like :meth:`view`, as a ``uint8`` numpy array."""
        return np.frombuffer(self.view(gpa, nbytes), dtype=np.uint8)

    def data_extents(self, offset: int, nbytes: int) -> list[tuple[int, int]]:
        """Backend ranges in [offset, offset + nbytes) that may hold data (``SEEK_DATA``/
        ``SEEK_HOLE``); the rest was never written and reads as zeros. Lets dumps skip holes
        without reading them, which on shared memory would allocate them."""
        end, out, pos = offset + nbytes, [], offset
        try:
            while pos < end:
                start = os.lseek(self._fd, pos, os.SEEK_DATA)
                if start >= end:
                    break
                stop = min(os.lseek(self._fd, start, os.SEEK_HOLE), end)
                out.append((start, stop))
                pos = stop
        except OSError as err:
            if err.errno == errno.ENXIO:      # no data after pos
                return out
            return [(offset, end)]            # the backend cannot tell: assume data everywhere
        return out

    @property
    def backend(self) -> memoryview:
        """The whole backend, by backend offset (what the host maps as the guest's RAM)."""
        return self._buffer

    def close(self) -> None:
        """Unmap. If views are still exported, the mapping lives until they are released."""
        try:
            self._buffer.release()
            self._mmap.close()
        except BufferError:
            pass
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def closed(self) -> bool:
        return self._mmap.closed
