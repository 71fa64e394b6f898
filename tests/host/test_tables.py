"""The KeyID-tagged translation structures (host/tables) and the host's physical map (host/physmap)
on their own: entries really written to platform memory, read back by the architectural walkers
and by a hand decode of the raw qwords; frames allocated, reused and given back; HPA ranges that
never overlap. No QEMU."""

from __future__ import annotations

import struct

import pytest

from qemu_mktme.arch.addresses import PAGE_SIZE
from qemu_mktme.arch.walk import WalkFault
from qemu_mktme.errors import AddressError, HostError
from qemu_mktme.host.host import Host
from qemu_mktme.host.physmap import (GUEST_RAM_ALIGN, GUEST_RAM_BASE, HOST_KERNEL_BASE, HOST_KERNEL_NBYTES,
                                     FrameAllocator, HpaRanges)
from qemu_mktme.host.tables import EPT, IOMMU, VMM, TranslationTable

MIB = 1 << 20
HPA0 = GUEST_RAM_BASE


@pytest.fixture
def host() -> Host:
    return Host(keyid_bits=6)


def table(host: Host, fmt=EPT) -> TranslationTable:
    return TranslationTable(fmt, host.platform.memory, host.platform.layout, host.frames)


@pytest.mark.parametrize("fmt", [EPT, VMM, IOMMU], ids=lambda f: f.name)
def test_a_mapping_walks_to_its_hpa_with_its_keyid(host, fmt):
    t = table(host, fmt)
    t.map(0x20_0000, HPA0, 4 * MIB, keyid=5)                  # 2 MiB leaves
    t.map(0x1000, HPA0 + 64 * MIB + 0x1000, 3 * PAGE_SIZE, keyid=7)   # 4 KiB leaves
    t.flush()
    for address, hpa, keyid, size in ((0x20_0000, HPA0, 5, 2 * MIB), (0x5F_FFF8, HPA0 + 0x3F_FFF8, 5, 2 * MIB),
                                      (0x2010, HPA0 + 64 * MIB + 0x2010, 7, PAGE_SIZE)):
        walk = t.walk(address)
        assert not isinstance(walk, WalkFault), walk
        assert (int(walk.hpa), int(walk.keyid), walk.page_size) == (hpa, keyid, size)
        assert walk.phys_addr == host.platform.layout.compose(walk.hpa, walk.keyid)
    assert isinstance(t.walk(0x4000), WalkFault) and isinstance(t.walk(0x60_0000), WalkFault)
    spans = [(s.address, s.size, s.hpa, s.keyid) for s in t.spans()]
    assert spans == [(0x1000, 3 * PAGE_SIZE, HPA0 + 64 * MIB + 0x1000, 7), (0x20_0000, 4 * MIB, HPA0, 5)]
    assert [(leaf.address, leaf.size) for leaf in t.leaves()] == [
        (0x1000, PAGE_SIZE), (0x2000, PAGE_SIZE), (0x3000, PAGE_SIZE), (0x20_0000, 2 * MIB), (0x40_0000, 2 * MIB)]


def test_the_entries_are_in_platform_memory_as_the_hardware_reads_them(host):
    """Decode the EPT by hand from the raw qwords: what a page walker reads, not a shadow copy."""
    t = table(host)
    t.map(0, HPA0, PAGE_SIZE, keyid=9)
    t.flush()
    layout = host.platform.layout
    address_bits = ((1 << layout.keyid_shift) - 1) & ~0xFFF

    def qword(hpa: int) -> int:
        return int(struct.unpack("<Q", host.platform.memory.read(hpa, 8))[0])

    table_hpa = int(t.root)
    for _level in range(3):                                     # PML4E, PDPTE, PDE (index 0 for GPA 0)
        entry = qword(table_hpa)
        assert entry & 7 and not entry >> layout.keyid_shift    # present; tables themselves under KeyID 0
        table_hpa = entry & address_bits
    pte = qword(table_hpa)
    assert pte & 7 == 7 and (pte >> layout.keyid_shift) & layout.max_keyid == 9
    assert pte & address_bits == HPA0
    assert t.pointer & ~0xFFF == int(t.root)                    # the EPTP carries the root


def test_retag_changes_one_leaf_and_bumps_the_generation(host):
    t = table(host, IOMMU)
    t.map(0, HPA0, 2 * PAGE_SIZE, keyid=3)
    t.flush()
    generation = t.generation
    t.retag(PAGE_SIZE, 4)
    assert (t.walk(0).keyid, t.walk(PAGE_SIZE).keyid) == (3, 4)
    assert t.generation > generation
    with pytest.raises(ValueError, match="is not mapped"):
        t.retag(16 * PAGE_SIZE, 4)
    with pytest.raises(ValueError, match="4 KiB aligned"):
        t.map(0x800, HPA0, PAGE_SIZE, keyid=3)


def test_free_gives_every_frame_back_zeroed(host):
    before = host.frames.in_use
    t = table(host)
    t.map(0, HPA0, 8 * MIB, keyid=2)
    t.map(1 << 30, HPA0 + 1024 * MIB, PAGE_SIZE, keyid=2)
    t.flush()
    frames = list(t._pages)                      # what free() must clear
    assert host.frames.in_use == before + t.frames > before + 1
    t.free()
    assert host.frames.in_use == before
    assert all(host.platform.memory.read(f, PAGE_SIZE) == bytes(PAGE_SIZE) for f in frames)


def test_frames_are_reused_and_bounded():
    frames = FrameAllocator(base=HOST_KERNEL_BASE, nbytes=3 * PAGE_SIZE)
    a, b, c = frames.alloc(), frames.alloc(), frames.alloc()
    assert (a, b, c) == (HOST_KERNEL_BASE, HOST_KERNEL_BASE + PAGE_SIZE, HOST_KERNEL_BASE + 2 * PAGE_SIZE)
    with pytest.raises(HostError, match="exhausted"):
        frames.alloc()
    frames.free(b)
    assert frames.in_use == 2 and frames.alloc() == b
    for bad in (b + 8, HOST_KERNEL_BASE + 3 * PAGE_SIZE, 0):
        with pytest.raises(ValueError, match="not a frame of this allocator"):
            frames.free(bad)


def test_vm_ranges_are_aligned_disjoint_and_inside_physical_memory():
    limit = 1 << 40
    ranges = HpaRanges(limit)
    a = ranges.reserve("a", 512 * MIB)
    b = ranges.reserve("b", 3 * GUEST_RAM_ALIGN // 2)
    c = ranges.reserve("c", PAGE_SIZE)
    assert (a.hpa, b.hpa, c.hpa) == (GUEST_RAM_BASE, GUEST_RAM_BASE + GUEST_RAM_ALIGN,
                                     GUEST_RAM_BASE + 3 * GUEST_RAM_ALIGN)
    assert ranges.owner_of(b.hpa + 5) is b and ranges.owner_of(a.end) is None
    with pytest.raises(AddressError, match="overlaps a's RAM"):
        ranges.reserve("d", PAGE_SIZE, a.hpa + PAGE_SIZE)
    with pytest.raises(AddressError, match="overlaps host kernel memory"):
        ranges.reserve("d", PAGE_SIZE, HOST_KERNEL_BASE + HOST_KERNEL_NBYTES - PAGE_SIZE)
    with pytest.raises(AddressError, match="exceeds physical memory"):
        ranges.reserve("d", 2 * PAGE_SIZE, limit - PAGE_SIZE)
    with pytest.raises(ValueError, match="multiple of 4 KiB"):
        ranges.reserve("d", 100)
    assert not ranges.is_free(a.hpa, PAGE_SIZE) and ranges.is_free(a.end, PAGE_SIZE)
    ranges.release(a)
    assert ranges.reserve("e", PAGE_SIZE).hpa == GUEST_RAM_BASE   # the lowest free place again
