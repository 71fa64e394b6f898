"""An NVDIMM in the host model: placed in the host physical map like RAM, tagged with the VM's
KeyID in EPT, VMM page table and IOMMU, its DRAM view AES-XTS under the VM key with tweak = HPA."""

from __future__ import annotations

import os

import numpy as np
import pytest

from qemu_mktme.arch.guestmap import GuestRange
from qemu_mktme.errors import AddressError
from qemu_mktme.host.host import Host

from reference import user_payload, xts_lines

MIB = 1 << 20
NV_GPA = 1 << 32


@pytest.fixture
def bound():
    host = Host(keyid_bits=6)
    key, tweak = os.urandom(16), os.urandom(16)
    serial = host.keys.add("vm", user_payload(key, tweak), tenant="acme")
    guest = host.add_guest("vm", np.zeros(16 * MIB, np.uint8), [GuestRange(0, 16 * MIB, 0)], key_serial=serial,
                           tenant="acme")
    return host, guest, key, tweak


def test_placed_tagged_and_encrypted_like_ram(bound):
    host, guest, key, tweak = bound
    backend = np.zeros(4 * MIB, np.uint8)
    nv = host.add_nvdimm("vm", backend, NV_GPA)
    assert nv.hpa >= guest.hpa_base + guest.ram.size and nv.hpa % (1 << 30) == 0     # the next free range
    assert host.hpa_ranges.owner_of(nv.hpa).kind == "NVDIMM"
    for table, address in ((guest.ept, NV_GPA + 0x1234), (guest.iommu, NV_GPA + 0x1234), (guest.vmm, nv.hva + 0x1234)):
        t = table.walk(address)
        assert t.hpa == nv.hpa + 0x1234 and t.keyid == guest.keyid, table.format.name
    assert not guest.check_consistency()
    plain = os.urandom(4096)
    backend[8192:8192 + 4096] = np.frombuffer(plain, np.uint8)       # the guest writes its pmem
    assert guest.dram(NV_GPA + 8192, 4096) == xts_lines(key, tweak, nv.hpa + 8192, plain)
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


def test_hpa_overlaps_are_refused(bound):
    host, guest, *_ = bound
    with pytest.raises(AddressError, match="overlaps vm's RAM"):
        host.add_nvdimm("vm", np.zeros(4 * MIB, np.uint8), NV_GPA, hpa=guest.hpa_base)
    nv = host.add_nvdimm("vm", np.zeros(4 * MIB, np.uint8), NV_GPA, hpa=0x2_0000_0000)
    with pytest.raises(AddressError, match=r"overlaps vm/nvdimm0's NVDIMM"):
        host.add_nvdimm("vm", np.zeros(4 * MIB, np.uint8), NV_GPA + 4 * MIB, hpa=nv.hpa + 2 * MIB)
    assert len(guest.nvdimms) == 1 and len(host.platform.memory.attachments) == 2
