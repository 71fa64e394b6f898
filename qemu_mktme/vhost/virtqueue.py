"""The VIRTIO 1.x split virtqueue, device side (VIRTIO 1.2 §2.7): descriptor table, available
and used rings, indirect descriptors (§2.7.5.3) and event-index notification suppression
(§2.7.7, ``vring_need_event``).

Every byte goes through a memory object (``memory.IommuMemory`` normally), so a ring or buffer
address outside the IOMMU domain is a ``DmaFault``, never a stray access. A guest driver is
untrusted: a bad chain (loop, too long, next out of range, nested indirect, readable after
writable, faulting address) is returned to the driver as an error (:attr:`Chain.error`); a
broken ring (available index jumping by more than the queue size, a head out of range, rings
the IOMMU does not map) is a :class:`RingError` and the device must ask for a reset.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..host.dma import DmaFault

DESC = struct.Struct("<QIHH")
DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1
MAX_QUEUE_SIZE = 32768
_FLAG_BITS = bytes(b & (F_NEXT | F_WRITE | F_INDIRECT) for b in range(256))
_NEXT_BIT = bytes(b & F_NEXT for b in range(256))
_NEXT_LO = bytes(i & 0xFF for i in range(MAX_QUEUE_SIZE + 1))     # next = i: its low and high bytes
_NEXT_HI = bytes(i >> 8 for i in range(MAX_QUEUE_SIZE + 1))


class Memory(Protocol):
    def read(self, iova: int, nbytes: int) -> bytes: ...
    def read_arrays(self, iova: int, nbytes: int) -> list[np.ndarray]: ...
    def write(self, iova: int, data: bytes | bytearray | memoryview | np.ndarray) -> None: ...
    def write_sg(self, segments: list[tuple[int, int]], data: np.ndarray) -> None: ...
    def read_sg(self, segments: list[tuple[int, int]]) -> list[np.ndarray]: ...
    def write_views(self, segments: list[tuple[int, int]]) -> list[np.ndarray] | None: ...


class RingError(Exception):
    """The ring itself is unusable: the device sets DEVICE_NEEDS_RESET and stops the queue."""


@dataclass
class Chain:
    """One descriptor chain: device-readable then device-writable (IOVA, length) segments."""

    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)
    error: str | None = None

    @property
    def readable_len(self) -> int:
        return sum(n for _, n in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)


def need_event(event: int, new: int, old: int) -> bool:
    """VIRTIO's ``vring_need_event``: has ``new`` passed ``event`` since ``old`` (mod 2^16)?"""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


class Virtqueue:
    """A split virtqueue of ``num`` entries at guest-physical ``desc``/``avail``/``used``."""

    def __init__(self, mem: Memory, num: int, desc: int, avail: int, used: int, *,
                 event_idx: bool, indirect: bool, last_avail: int = 0, max_bytes: int = 128 << 20) -> None:
        if not (1 <= num <= MAX_QUEUE_SIZE and num & (num - 1) == 0):
            raise RingError(f"queue size {num} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        self.mem, self.num = mem, num
        self.desc, self.avail, self.used = desc, avail, used
        self.event_idx, self.indirect = event_idx, indirect
        self.last_avail = last_avail & 0xFFFF
        self._ready = 0                      # announced by the driver, not yet taken
        self.used_idx = self._read16(used + 2)
        self._signalled_used = self.used_idx
        self.max_bytes = max_bytes

    # ------------------------------------------------------------------ memory

    def _read16(self, iova: int) -> int:
        try:
            return int.from_bytes(self.mem.read(iova, 2), "little")
        except DmaFault as err:
            raise RingError(f"ring at {iova:#x} is not reachable through the IOMMU: {err}") from None

    def _write(self, iova: int, data: bytes) -> None:
        try:
            self.mem.write(iova, data)
        except DmaFault as err:
            raise RingError(f"used ring at {iova:#x} is not reachable through the IOMMU: {err}") from None

    # ------------------------------------------------------------------ available side

    def pending(self) -> int:
        """Available buffers not yet taken (``RingError`` if the driver's index is impossible)."""
        n = (self._read16(self.avail + 2) - self.last_avail) & 0xFFFF
        if n > self.num:
            raise RingError(f"available index moved by {n} entries in a queue of {self.num}")
        return n

    def pop(self) -> Chain | None:
        """The next available chain, or None (the driver's index is read again only once the
        buffers it announced last time are taken)."""
        if not self._ready:
            self._ready = self.pending()
            if not self._ready:
                return None
        self._ready -= 1
        slot = self.avail + 4 + 2 * (self.last_avail % self.num)
        head = self._read16(slot)
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if head >= self.num:
            raise RingError(f"available ring names head {head} in a queue of {self.num}")
        chain = Chain(head)
        try:
            self._walk(chain)
        except DmaFault as err:
            chain.error = f"descriptor or buffer outside the IOMMU domain: {err}"
        return chain

    def _walk(self, chain: Chain) -> None:
        table, size, index = self.desc, self.num, chain.head
        seen, total, indirect_done = 0, 0, False
        indirect: list[tuple[int, int, int, int]] = []
        while True:
            if index >= size:
                chain.error = f"descriptor index {index} outside a table of {size}"
                return
            seen += 1
            if seen > size:
                chain.error = f"descriptor chain longer than its table ({size}): a loop"
                return
            if indirect_done:                      # the indirect table, read and decoded at once
                addr, length, flags, nxt = indirect[index]
            else:
                addr, length, flags, nxt = DESC.unpack(self.mem.read(table + 16 * index, 16))
            if flags & F_INDIRECT:
                if not self.indirect:
                    chain.error = "indirect descriptor without VIRTIO_F_INDIRECT_DESC"
                    return
                if indirect_done or table != self.desc:
                    chain.error = "nested indirect descriptor table"
                    return
                if flags & F_NEXT:
                    chain.error = "indirect descriptor with NEXT set"
                    return
                if length == 0 or length % 16 or length // 16 > MAX_QUEUE_SIZE:
                    chain.error = f"indirect table of {length} bytes"
                    return
                data = self.mem.read(addr, length)
                if self._linear(chain, data, total):
                    return
                indirect = list(DESC.iter_unpack(data))
                table, size, index, seen, indirect_done = addr, length // 16, 0, 0, True
                continue
            total += length
            if total > self.max_bytes:
                chain.error = f"chain of more than {self.max_bytes} bytes"
                return
            if flags & F_WRITE:
                chain.writable.append((addr, length))
            elif chain.writable:
                chain.error = "device-readable descriptor after a device-writable one"
                return
            else:
                chain.readable.append((addr, length))
            if not flags & F_NEXT:
                return
            index = nxt

    def _linear(self, chain: Chain, table: bytes, total: int) -> bool:
        """The usual indirect table, decoded at once: entries 0..k-1 chained in order (NEXT set on
        all but the last, next = i + 1), readable ones first, no nested indirect, within the
        byte bound. False (nothing done) for any other table: the entry-by-entry walk judges it.
        The flags and next fields are checked as byte strings (C loops), not entry by entry."""
        flags = table[12::16].translate(_FLAG_BITS)     # NEXT | WRITE | INDIRECT of each entry
        k = flags.translate(_NEXT_BIT).find(0) + 1      # the chain stops at the first entry without NEXT
        if not k:
            return False
        head = flags[:k]
        rest = head.lstrip(b"\x01")                    # readable entries with NEXT, then:
        first_w = k - len(rest)
        if rest == b"\x00":                            # the last one readable: no writable part
            first_w = k
        elif rest[-1] != F_WRITE or rest[:-1].strip(b"\x03"):   # writable with NEXT, the last writable
            return False
        if k > 1 and (table[14:16 * (k - 1):16] != _NEXT_LO[1:k] or table[15:16 * (k - 1):16] != _NEXT_HI[1:k]):
            return False
        pairs = [(a, n) for a, n, _, _ in DESC.iter_unpack(table[:16 * k])]
        if total + sum(n for _, n in pairs) > self.max_bytes:
            return False
        chain.readable.extend(pairs[:first_w])
        chain.writable.extend(pairs[first_w:])
        return True

    # ------------------------------------------------------------------ used side

    def push(self, head: int, written: int) -> None:
        """Return chain ``head`` to the driver with ``written`` bytes written."""
        slot = self.used + 4 + 8 * (self.used_idx % self.num)
        self._write(slot, struct.pack("<II", head, written))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._write(self.used + 2, struct.pack("<H", self.used_idx))

    def enable_kicks(self) -> None:
        """With event index: ask to be kicked for the next buffer after those taken."""
        if self.event_idx:
            self._write(self.used + 4 + 8 * self.num, struct.pack("<H", self.last_avail))

    def should_notify(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last one."""
        old, new = self._signalled_used, self.used_idx
        if old == new:
            return False
        if self.event_idx:
            event = self._read16(self.avail + 4 + 2 * self.num)
            notify = need_event(event, new, old)
        else:
            notify = not self._read16(self.avail) & AVAIL_F_NO_INTERRUPT
        self._signalled_used = new
        return notify


def gather(segments: list[tuple[int, int]], start: int, nbytes: int) -> list[tuple[int, int]]:
    """The (IOVA, length) pieces of bytes [start, start + nbytes) of a segment list."""
    out, pos = [], 0
    for addr, n in segments:
        lo, hi = max(start, pos), min(start + nbytes, pos + n)
        if lo < hi:
            out.append((addr + lo - pos, hi - lo))
        pos += n
        if pos >= start + nbytes:
            break
    return out
