"""Tagged EPT / VMM / IOMMU structures, the guest binding and DMA, over an in-memory RAM buffer."""

from __future__ import annotations

import os

import numpy as np
import pytest

from qemu_mktme.arch.walk import FaultKind, WalkFault
from qemu_mktme.errors import AddressError, KeyServiceError
from qemu_mktme.host.dma import AssignedDevice, DmaFault
from qemu_mktme.arch.guestmap import GuestRange
from qemu_mktme.host.host import Host

from reference import user_payload, xts_lines

MIB = 1 << 20


@pytest.fixture
def setup():
    host = Host(keyid_bits=6)
    key, tweak = os.urandom(16), os.urandom(16)
    serial = host.keys.add("vm", user_payload(key, tweak), tenant="acme")
    ram = np.zeros(64 * MIB, np.uint8)
    ranges = [GuestRange(0, 0xA0000, 0), GuestRange(0x100000, 61 * MIB, 0x100000),
              GuestRange(1 << 32, 2 * MIB, 62 * MIB)]
    guest = host.add_guest("vm", ram, ranges, key_serial=serial, tenant="acme")
    return host, guest, ram, key, tweak


def test_walks_agree_with_the_layout_and_carry_the_keyid(setup):
    host, guest, ram, *_ = setup
    for gpa in (0x0, 0x9F000, 0x100000, 0x2345678, (1 << 32) + 0x1234):
        t = guest.ept.walk(gpa)
        assert not isinstance(t, WalkFault)
        assert t.hpa == guest.hpa_of(gpa) and t.keyid == guest.keyid
        io = guest.iommu.walk(gpa)
        assert io.hpa == t.hpa and io.keyid == guest.keyid
        off = t.hpa - guest.hpa_base
        vmm = guest.vmm.walk(guest.hva + off)
        assert vmm.hpa == t.hpa and vmm.keyid == guest.keyid
    hole = guest.ept.walk(0xA0000)
    assert isinstance(hole, WalkFault) and hole.kind is FaultKind.NOT_PRESENT
    sizes = {leaf.size for leaf in guest.ept.leaves()}
    assert sizes == {4096, 2 * MIB}                     # 4 KiB below 1 MiB, 2 MiB leaves elsewhere
    assert guest.check_consistency() == []


def test_dram_view_is_xts_under_the_programmed_key(setup):
    host, guest, ram, key, tweak = setup
    secret = b"TOP-SECRET-" * 6
    ram[0x200000:0x200000 + len(secret)] = np.frombuffer(secret, np.uint8)
    line = bytes(ram[0x200000:0x200040])
    assert guest.dram(0x200000, 64) == xts_lines(key, tweak, guest.hpa_of(0x200000), line)
    high = (1 << 32) + 0x40
    ram[62 * MIB + 0x40:62 * MIB + 0x80] = 7
    assert guest.dram(high, 64) == xts_lines(key, tweak, guest.hpa_of(high), bytes([7]) * 64)
    assert guest.hpa_of(high) == guest.hpa_base + 62 * MIB + 0x40
    assert guest.read(0x200000, len(secret)) == secret                  # through the VM's KeyID


def test_wrong_keyid_reads_garbage_and_writes_garbage(setup):
    host, guest, ram, *_ = setup
    other = host.keys.add("other", "type=cpu", tenant="globex")
    other_keyid = host.keys.describe(other)["keyid"]
    ram[0x300000:0x300040] = np.frombuffer(b"A" * 64, np.uint8)
    assert guest.read(0x300000, 64, keyid=other_keyid) != b"A" * 64
    seen = []
    guest.foreign_write_hooks.append(lambda gpa, n, k: seen.append((gpa, n, k)))
    guest.write(0x300000, b"B" * 64, keyid=other_keyid)
    assert bytes(ram[0x300000:0x300040]) != b"B" * 64                  # the guest would read garbage
    assert guest.read(0x300000, 64, keyid=other_keyid) == b"B" * 64    # the writer's KeyID reads it back
    assert seen == [(0x300000, 64, other_keyid)]
    guest.write(0x300000, b"C" * 64)
    assert bytes(ram[0x300000:0x300040]) == b"C" * 64


def test_vmm_mapping_with_another_keyid_is_reported(setup):
    host, guest, *_ = setup
    guest.vmm.retag(guest.hva + 0x200000, 5)
    [m] = guest.check_consistency()
    assert (m.gpa, m.nbytes, m.ept_keyid, m.vmm_keyid, m.iommu_keyid) == (0x200000, 2 * MIB, guest.keyid, 5, guest.keyid)
    assert "VMM KeyID 5" in str(m)
    assert guest.query()["consistent"] is False


def test_dma_through_the_iommu(setup):
    host, guest, ram, *_ = setup
    dev = AssignedDevice(guest)
    payload = os.urandom(6000)                                          # crosses page boundaries
    dev.dma_write(0x400F00, payload)
    assert bytes(ram[0x400F00:0x400F00 + 6000]) == payload
    assert dev.dma_read(0x400F00, 6000) == payload
    with pytest.raises(DmaFault, match="remapping fault"):
        dev.dma_write(0xA0000, b"x")                                    # the hole is not mapped
    guest.iommu.retag(0x500000, 9)                                      # an untagged/mis-tagged domain
    dev.dma_write(0x500000, b"D" * 64)
    assert bytes(ram[0x500000:0x500040]) != b"D" * 64


def test_zero_copy_views_only_where_the_iommu_gives_the_vms_keyid(setup):
    host, guest, ram, *_ = setup
    dev = AssignedDevice(guest)
    segs = [(0x400F00, 0x100), (0x600000, 4096), (0x401000, 512)]
    views = dev.dma_write_views(segs)
    assert views is not None and [v.size for v in views] == [0x100, 4096, 512]
    views[1][:] = 7                                                     # written in place: the VM's RAM
    assert (ram[0x600000:0x601000] == 7).all() and dev.counters.write_bytes == 0x100 + 4096 + 512
    assert [bytes(a) for a in dev.dma_read_sg(segs)] == [bytes(v) for v in views]
    with pytest.raises(DmaFault, match="remapping fault"):
        dev.dma_write_views([(0xA0000, 16)])                            # the hole: a fault, as the full path
    assert dev.dma_write_views([(0x1FFF00, 0x200)]) is None             # crosses a leaf: the full path
    guest.iommu.retag(0x600000, 9)                                      # a foreign KeyID: never a raw view
    assert dev.dma_write_views(segs) is None
    assert [bytes(a) for a in dev.dma_read_sg([(0x600000, 64)])] != [bytes(64 * [7])]


def test_failed_add_guest_leaves_nothing(setup):
    host, guest, *_ = setup
    serial = host.keys.add("vm2", "type=cpu", tenant="acme")
    frames, free = host.frames.in_use, host.keyids.free_count
    ram2 = np.zeros(8 * MIB, np.uint8)
    with pytest.raises(AddressError, match="overlaps vm's RAM"):
        host.add_guest("vm2", ram2, [GuestRange(0, 8 * MIB, 0)], key_serial=serial, tenant="acme",
                       hpa=guest.hpa_base + MIB)
    with pytest.raises(KeyServiceError):
        host.add_guest("vm2", ram2, [GuestRange(0, 8 * MIB, 0)], key_serial=serial, tenant="globex")
    assert host.frames.in_use == frames and host.keyids.free_count == free
    assert host.keys.describe(serial)["users"] == [] and list(host.guests) == ["vm"]
    assert len(host.platform.memory.attachments) == 1
    g2 = host.add_guest("vm2", ram2, [GuestRange(0, 8 * MIB, 0)], key_serial=serial, tenant="acme")
    host.remove_guest("vm2")
    assert host.frames.in_use == frames and g2.name not in host.guests


def test_iter_dram_skips_holes_without_changing_the_answer():
    host = Host(keyid_bits=6)
    serial = host.keys.add("vm", "type=cpu", tenant="acme")
    ram = np.zeros(8 * MIB, np.uint8)
    ram[0x1000:0x3000] = 0xAB
    ram[5 * MIB + 0x40:5 * MIB + 0x80] = 1
    data = [(0x1000, 0x3000), (5 * MIB, 5 * MIB + 4096)]
    def extents(off, n):
        return [(max(s, off), min(e, off + n)) for s, e in data if s < off + n and e > off]
    guest = host.add_guest("vm", ram, [GuestRange(0, 8 * MIB, 0)], key_serial=serial, tenant="acme",
                           extents=extents)
    expected = guest.dram_array(0, 8 * MIB).tobytes()
    got = b"".join(chunk.tobytes() for _, chunk in guest.iter_dram(chunk_nbytes=3 * MIB - 64 * 7))
    assert got == expected


def test_vmm_table_at_an_unaligned_hva_uses_4k_leaves_and_walks_right():
    host = Host(keyid_bits=6)
    serial = host.keys.add("vm", "type=cpu", tenant="acme")
    ram = np.zeros(6 * MIB, np.uint8)
    hva = 0x7F12_3456_7000                                   # where QEMU mapped it: 4 KiB aligned only
    guest = host.add_guest("vm", ram, [GuestRange(0, 6 * MIB, 0)], key_serial=serial, tenant="acme", hva=hva)
    leaves = list(guest.vmm.leaves())
    assert {leaf.size for leaf in leaves} == {4096} and len(leaves) == 6 * MIB // 4096
    for off in (0, 4096, 0x1FF000, 0x200000, 6 * MIB - 4096):
        t = guest.vmm.walk(hva + off + 0x123)
        assert t.hpa == guest.hpa_base + off + 0x123 and t.keyid == guest.keyid
    assert guest.check_consistency() == []


def test_spans_equal_the_coalesced_leaves():
    host = Host(keyid_bits=6)
    serial = host.keys.add("vm", "type=cpu", tenant="acme")
    ram = np.zeros(12 * MIB, np.uint8)
    guest = host.add_guest("vm", ram, [GuestRange(0, 0xA0000, 0), GuestRange(0x100000, 11 * MIB, MIB)],
                           key_serial=serial, tenant="acme", hva=0x7F00_0012_3000)
    guest.vmm.retag(guest.hva + 0x5000, 7)                  # a hole in the run, in a 4 KiB table
    for table in (guest.ept, guest.vmm, guest.iommu):
        runs: list[list[int]] = []
        for leaf in table.leaves():
            last = runs[-1] if runs else None
            if last and last[0] + last[1] == leaf.address and last[2] + last[1] == leaf.hpa and last[3] == leaf.keyid:
                last[1] += leaf.size
            else:
                runs.append([leaf.address, leaf.size, leaf.hpa, leaf.keyid])
        assert [(s.address, s.size, s.hpa, s.keyid) for s in table.spans()] == [tuple(r) for r in runs]


NVDIMM_GPA = 8 << 30


def test_nvdimm_placed_tagged_and_encrypted_like_ram(setup):
    """An NVDIMM: placed in the host physical map like RAM, tagged with the VM's KeyID in EPT, VMM
    page table and IOMMU, its DRAM view AES-XTS under the VM key with tweak = HPA."""
    host, guest, _ram, key, tweak = setup
    backend = np.zeros(4 * MIB, np.uint8)
    nv = host.add_nvdimm("vm", backend, NVDIMM_GPA)
    assert nv.hpa >= guest.hpa_base + guest.ram.size and nv.hpa % (1 << 30) == 0     # the next free range
    assert host.hpa_ranges.owner_of(nv.hpa).kind == "NVDIMM"
    for table, address in ((guest.ept, NVDIMM_GPA + 0x1234), (guest.iommu, NVDIMM_GPA + 0x1234), (guest.vmm, nv.hva + 0x1234)):
        t = table.walk(address)
        assert t.hpa == nv.hpa + 0x1234 and t.keyid == guest.keyid, table.format.name
    assert not guest.check_consistency()
    plain = os.urandom(4096)
    backend[8192:8192 + 4096] = np.frombuffer(plain, np.uint8)       # the guest writes its pmem
    assert guest.dram(NVDIMM_GPA + 8192, 4096) == xts_lines(key, tweak, nv.hpa + 8192, plain)
    off, first = next(guest.nvdimm_dram(0, chunk_nbytes=MIB))        # (one reused buffer)
    assert off == 0 and first[8192:8192 + 4096].tobytes() == xts_lines(key, tweak, nv.hpa + 8192, plain)
    # media bytes loaded back at the same HPA give the plaintext; at another HPA, garbage
    cipher = np.frombuffer(xts_lines(key, tweak, nv.hpa, b"P" * 4096), np.uint8)
    guest.load_nvdimm(0, 0, cipher)
    assert backend[:4096].tobytes() == b"P" * 4096
    guest.load_nvdimm(0, 4096, cipher)
    assert backend[4096:8192].tobytes() != b"P" * 4096
    host.remove_guest("vm")
    assert host.hpa_ranges.owner_of(nv.hpa) is None and not host.platform.memory.attachments


def test_nvdimm_hpa_overlaps_are_refused(setup):
    host, guest, *_ = setup
    with pytest.raises(AddressError, match="overlaps vm's RAM"):
        host.add_nvdimm("vm", np.zeros(4 * MIB, np.uint8), NVDIMM_GPA, hpa=guest.hpa_base)
    nv = host.add_nvdimm("vm", np.zeros(4 * MIB, np.uint8), NVDIMM_GPA, hpa=0x2_0000_0000)
    with pytest.raises(AddressError, match=r"overlaps vm/nvdimm0's NVDIMM"):
        host.add_nvdimm("vm", np.zeros(4 * MIB, np.uint8), NVDIMM_GPA + 4 * MIB, hpa=nv.hpa + 2 * MIB)
    assert len(guest.nvdimms) == 1 and len(host.platform.memory.attachments) == 2
