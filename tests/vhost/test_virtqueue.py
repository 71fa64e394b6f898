"""The split virtqueue on its own (VIRTIO 1.2 §2.7): chains walked as the spec lays them out,
used entries and indices written back, notification suppression, and every malformed chain or
ring refused the way the device must refuse it. Memory is a plain buffer whose edges fault like
an IOMMU domain. No QEMU."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from qemu_mktme.host.dma import DmaFault
from qemu_mktme.vhost.virtqueue import (AVAIL_F_NO_INTERRUPT, F_INDIRECT, F_NEXT, F_WRITE, RingError, Virtqueue,
                                        gather, need_event)

NUM = 8
DESC, AVAIL, USED, DATA = 0x1000, 0x2000, 0x3000, 0x10000
SIZE = 0x40000


class Buffer:
    """Guest memory [0, SIZE): anything else is a DMA fault, as outside an IOMMU domain."""

    def __init__(self) -> None:
        self.ram = bytearray(SIZE)

    def _check(self, iova: int, nbytes: int) -> None:
        if iova < 0 or iova + nbytes > SIZE:
            raise DmaFault(f"IOVA {iova:#x}+{nbytes:#x} not mapped", address=iova, nbytes=nbytes)

    def read(self, iova: int, nbytes: int) -> bytes:
        self._check(iova, nbytes)
        return bytes(self.ram[iova:iova + nbytes])

    def read_arrays(self, iova: int, nbytes: int) -> list[np.ndarray]:
        return [np.frombuffer(self.read(iova, nbytes), np.uint8)]

    def write(self, iova: int, data: bytes | bytearray | memoryview | np.ndarray) -> None:
        raw = bytes(data)
        self._check(iova, len(raw))
        self.ram[iova:iova + len(raw)] = raw

    def write_sg(self, segments: list[tuple[int, int]], data: np.ndarray) -> None:
        pos = 0
        for iova, n in segments:
            self.write(iova, data[pos:pos + n].tobytes())
            pos += n

    def read_sg(self, segments: list[tuple[int, int]]) -> list[np.ndarray]:
        return [a for iova, n in segments for a in self.read_arrays(iova, n)]


class Driver:
    """The driver's half, written by hand from the spec's layout."""

    def __init__(self, mem: Buffer, *, desc: int = DESC) -> None:
        self.mem, self.desc, self.avail_idx = mem, desc, 0

    def descriptor(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0, table: int | None = None) -> None:
        self.mem.write((self.desc if table is None else table) + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def offer(self, head: int) -> None:
        self.mem.write(AVAIL + 4 + 2 * (self.avail_idx % NUM), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(AVAIL + 2, struct.pack("<H", self.avail_idx))

    def used(self) -> tuple[int, list[tuple[int, int]]]:
        idx = struct.unpack("<H", self.mem.read(USED + 2, 2))[0]
        return idx, [struct.unpack("<II", self.mem.read(USED + 4 + 8 * i, 8)) for i in range(min(idx, NUM))]


@pytest.fixture
def ring() -> tuple[Buffer, Driver]:
    mem = Buffer()
    return mem, Driver(mem)


def queue(mem: Buffer, **kw: object) -> Virtqueue:
    opts: dict[str, object] = {"event_idx": False, "indirect": True} | kw
    return Virtqueue(mem, NUM, DESC, AVAIL, USED, **opts)  # type: ignore[arg-type]


def test_a_chain_is_walked_and_returned_as_the_spec_lays_it_out(ring):
    mem, drv = ring
    drv.descriptor(0, DATA, 16, F_NEXT, 3)                          # header: device reads
    drv.descriptor(3, DATA + 0x100, 512, F_NEXT | F_WRITE, 5)       # data: device writes
    drv.descriptor(5, DATA + 0x400, 1, F_WRITE)                     # status byte
    drv.offer(0)
    q = queue(mem)
    assert q.pending() == 1
    chain = q.pop()
    assert chain is not None and chain.error is None and chain.head == 0
    assert chain.readable == [(DATA, 16)] and chain.writable == [(DATA + 0x100, 512), (DATA + 0x400, 1)]
    assert chain.readable_len == 16 and chain.writable_len == 513
    assert q.pop() is None and q.pending() == 0
    q.push(chain.head, 513)
    assert drv.used() == (1, [(0, 513)])                          # id and len, then the index


def test_an_indirect_table_is_read_in_one_transfer(ring):
    mem, drv = ring
    table = DATA + 0x8000
    drv.descriptor(0, DATA, 8, F_NEXT, 1, table=table)
    drv.descriptor(1, DATA + 0x80, 64, F_WRITE, table=table)
    drv.descriptor(2, table, 32, F_INDIRECT)
    drv.offer(2)
    chain = queue(mem).pop()
    assert chain is not None and chain.error is None and chain.head == 2
    assert chain.readable == [(DATA, 8)] and chain.writable == [(DATA + 0x80, 64)]
    drv.offer(2)
    refused = queue(mem, indirect=False).pop()                      # the feature was not negotiated
    assert refused is not None and refused.error == "indirect descriptor without VIRTIO_F_INDIRECT_DESC"


@pytest.mark.parametrize("build, error", [
    (lambda d: (d.descriptor(0, DATA, 8, F_NEXT, 1), d.descriptor(1, DATA, 8, F_NEXT, 0)), "a loop"),
    (lambda d: d.descriptor(0, DATA, 8, F_NEXT, NUM), f"descriptor index {NUM} outside a table of {NUM}"),
    (lambda d: (d.descriptor(0, DATA, 8, F_NEXT | F_WRITE, 1), d.descriptor(1, DATA, 8)),
     "device-readable descriptor after a device-writable one"),
    (lambda d: (d.descriptor(0, DATA + 0x8000, 16, F_INDIRECT),
                d.descriptor(0, DATA + 0x9000, 16, F_INDIRECT, table=DATA + 0x8000)), "nested indirect"),
    (lambda d: d.descriptor(0, DATA + 0x8000, 16, F_INDIRECT | F_NEXT, 1), "indirect descriptor with NEXT set"),
    (lambda d: d.descriptor(0, DATA + 0x8000, 24, F_INDIRECT), "indirect table of 24 bytes"),
    (lambda d: d.descriptor(0, SIZE - 8, 64, F_INDIRECT), "outside the IOMMU domain"),
], ids=["loop", "next-out-of-range", "readable-after-writable", "nested-indirect", "indirect-next", "indirect-size",
        "indirect-unmapped"])
def test_a_bad_chain_goes_back_to_the_driver_as_an_error(ring, build, error):
    mem, drv = ring
    build(drv)
    drv.offer(0)
    q = queue(mem)
    chain = q.pop()
    assert chain is not None and chain.error is not None and error in chain.error
    assert q.last_avail == 1                                        # taken: the queue goes on


def test_a_chain_longer_than_the_limit_is_refused(ring):
    mem, drv = ring
    drv.descriptor(0, DATA, 4096, F_NEXT | F_WRITE, 1)
    drv.descriptor(1, DATA, 4096, F_WRITE)
    drv.offer(0)
    chain = Virtqueue(mem, NUM, DESC, AVAIL, USED, event_idx=False, indirect=True, max_bytes=6000).pop()
    assert chain is not None and chain.error == "chain of more than 6000 bytes"


def test_a_broken_ring_needs_a_reset(ring):
    mem, drv = ring
    mem.write(AVAIL + 2, struct.pack("<H", NUM + 1))               # the index jumps past the queue
    with pytest.raises(RingError, match=f"moved by {NUM + 1} entries in a queue of {NUM}"):
        queue(mem).pending()
    mem.write(AVAIL + 2, struct.pack("<H", 1))
    mem.write(AVAIL + 4, struct.pack("<H", NUM))                    # a head outside the table
    with pytest.raises(RingError, match=f"names head {NUM}"):
        queue(mem).pop()
    with pytest.raises(RingError, match="not reachable through the IOMMU"):
        Virtqueue(mem, NUM, DESC, AVAIL, SIZE - 1, event_idx=False, indirect=False)
    with pytest.raises(RingError, match="not a power of two"):
        Virtqueue(mem, 6, DESC, AVAIL, USED, event_idx=False, indirect=False)


def test_interrupts_follow_the_drivers_suppression(ring):
    mem, drv = ring
    drv.descriptor(0, DATA, 8, F_WRITE)
    q = queue(mem)
    assert not q.should_notify()                                   # nothing used yet
    drv.offer(0)
    q.push(q.pop().head, 8)
    assert q.should_notify() and not q.should_notify()             # once per batch
    mem.write(AVAIL, struct.pack("<H", AVAIL_F_NO_INTERRUPT))
    drv.offer(0)
    q.push(q.pop().head, 8)
    assert not q.should_notify()                                   # the driver asked for none


def test_event_index_suppression(ring):
    mem, drv = ring
    drv.descriptor(0, DATA, 8, F_WRITE)
    q = queue(mem, event_idx=True)
    used_event = AVAIL + 4 + 2 * NUM
    mem.write(used_event, struct.pack("<H", 1))                    # interrupt once used passes index 1
    for expected in (False, True, False):
        drv.offer(0)
        q.push(q.pop().head, 8)
        assert q.should_notify() is expected
    q.enable_kicks()                                               # avail_event: kick me after these
    assert struct.unpack("<H", mem.read(USED + 4 + 8 * NUM, 2))[0] == q.last_avail == 3


@pytest.mark.parametrize("event, new, old", [(0, 1, 0), (5, 7, 3), (0xFFFF, 0, 0xFFFE), (10, 10, 9), (3, 2, 1),
                                             (0, 0x8000, 0x7FFF), (100, 5, 65530)])
def test_need_event_is_the_kernels_formula(event, new, old):
    """vring_need_event(): (u16)(new_idx - event_idx - 1) < (u16)(new_idx - old)."""
    assert need_event(event, new, old) == (((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF))
    assert need_event(event, new, old) == any((old + k) & 0xFFFF == (event + 1) & 0xFFFF
                                              for k in range(1, ((new - old) & 0xFFFF) + 1))


def test_gather_picks_byte_ranges_across_segments():
    segments = [(0x1000, 16), (0x5000, 100), (0x9000, 4)]
    assert gather(segments, 0, 16) == [(0x1000, 16)]
    assert gather(segments, 10, 20) == [(0x100A, 6), (0x5000, 14)]
    assert gather(segments, 110, 10) == [(0x505E, 6), (0x9000, 4)]
    assert gather(segments, 200, 4) == []
