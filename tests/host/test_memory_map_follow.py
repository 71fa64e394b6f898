"""The EPT and IOMMU domain follow the VM's memory map (EncryptedGuest.follow): what firmware
turns into RAM is mapped (a device's DMA there stops faulting, its IOTLB is invalidated), what
goes is unmapped (a 2 MiB leaf split around it), and a map that aliases RAM is refused."""

from __future__ import annotations

import numpy as np
import pytest

from qemu_mktme.arch.guestmap import GuestRange
from qemu_mktme.errors import AddressError
from qemu_mktme.host.dma import AssignedDevice, DmaFault
from qemu_mktme.host.host import Host

RAM = 8 << 20
BOOT = [GuestRange(0, 0xA0000, 0), GuestRange(0x100000, RAM - 0x100000, 0x100000)]          # paused q35
POST = [GuestRange(0, 0xA0000, 0), GuestRange(0xC0000, RAM - 0xC0000, 0xC0000)]             # after SeaBIOS's PAM


@pytest.fixture
def vm():
    host = Host(keyid_bits=6)
    serial = host.keys.add("v", "type=cpu", tenant="t")
    ram = np.zeros(RAM, np.uint8)
    guest = host.add_guest("vm", ram, BOOT, key_serial=serial, tenant="t")
    yield guest, ram, AssignedDevice(guest, "d")
    host.remove_guest("vm")


def test_firmware_ram_gets_mapped_and_unmapped_again(vm):
    guest, ram, dev = vm
    with pytest.raises(DmaFault, match="0xe9418"):
        dev.dma_write(0xE9418, b"x")
    assert guest.follow(POST) is True
    dev.dma_write(0xE9418, b"hello")                        # the cached IOTLB did not keep the fault
    assert bytes(ram[0xE9418:0xE941D]) == b"hello"
    assert guest.translate(0xE9418)[1] == guest.keyid and guest.check_consistency() == []
    assert guest.follow(POST) is False                      # nothing changed
    assert guest.follow(BOOT) is True
    with pytest.raises(DmaFault):
        dev.dma_read(0xE9418, 1)
    with pytest.raises(AddressError):
        guest.hpa_of(0xE9418)


def test_a_hole_in_a_2mib_leaf_splits_it(vm):
    guest, ram, dev = vm
    guest.follow([BOOT[0], GuestRange(0x100000, 0x101000, 0x100000), GuestRange(0x202000, RAM - 0x202000, 0x202000)])
    for gpa, mapped in ((0x200000, True), (0x201000, False), (0x202000, True), (0x400000, True), (RAM - 4096, True)):
        if mapped:
            dev.dma_write(gpa, b"y")
            assert ram[gpa] == ord("y")
        else:
            with pytest.raises(DmaFault):
                dev.dma_write(gpa, b"y")
    guest.follow(BOOT)
    dev.dma_write(0x201000, b"z")
    assert ram[0x201000] == ord("z") and guest.check_consistency() == []


def test_a_wrong_iommu_keyid_stays_on_what_is_mapped_later(vm):
    guest, _, dev = vm
    guest.set_iommu_keyid(7)
    guest.follow(POST)
    assert dev.translate(0xE9418)[1] == 7 and guest.translate(0xE9418)[1] == guest.keyid


@pytest.mark.parametrize("ranges, why", [
    ([GuestRange(0, 0xA0000, 0), GuestRange(0xC0000, 0x1000, 0)], "two GPAs"),
    ([GuestRange(0, RAM + 4096, 0)], "not 4 KiB pages"),
    ([GuestRange(0, 0x2000, 0), GuestRange(0x1000, 0x2000, 0x3000)], "overlap"),
    ([GuestRange(0x800, 0x1000, 0)], "not 4 KiB pages"),
])
def test_a_map_that_aliases_or_leaves_the_backend_is_refused(vm, ranges, why):
    guest, _, _ = vm
    with pytest.raises(AddressError, match=why):
        guest.follow(ranges)
    assert guest.ranges == tuple(BOOT)
