"""A firmware boot from a vhost disk: SeaBIOS reads the boot sector through our
vhost-user-blk backend, every DMA through the host model's IOMMU domain, after it turned
0xC0000-0xFFFFF into RAM (PAM) behind the domain's back: the domain follows QEMU's memory map,
so the firmware's own buffers there do not fault, the boot sector runs, reads a sector through
INT 13h, writes it back elsewhere and prints it on the serial port."""

from __future__ import annotations

import os

import pytest

from helpers import patience
from qemu_mktme.host.host import Host
from qemu_mktme.images import backports
from qemu_mktme.live.encrypted import EncryptedMachine
from qemu_mktme.qemu.devices import DiskSpec
from qemu_mktme.qemu.machine import MachineConfig

pytestmark = pytest.mark.qemu

# 16-bit boot sector (GNU as, .code16): save DL; INT 13h AH=02 reads CHS 0/0/2 (LBA 1) to 0x7E00;
# INT 13h AH=03 writes it to CHS 0/0/3 (LBA 2); OUT each byte of the NUL-terminated text at
# 0x7E00 to COM1 (0x3F8); HLT loop. On a carry: "mktme-fw: int13 failed".
BOOT_SECTOR = bytes.fromhex(
    "fa31c08ed88ec08ed0bc007cfb88d3b70053bb007eb80102b90200b600cd1372165a52bb007eb80103b90300b600cd"
    "137205be007eeb03be487cac84c07406baf803eeebf5f4ebfd6d6b746d652d66773a20696e743133206661696c6564"
    "0d0a00")


@pytest.fixture(params=["system", "qemu10"])
def qemu(request) -> str | None:
    """The system's QEMU 7.2, and QEMU 10 when ``images build qemu10`` has unpacked it."""
    if request.param == "system":
        return None
    path = backports.qemu_path("qemu10")
    if not path.exists():
        pytest.skip("QEMU 10 is not unpacked (images build qemu10)")
    return str(path)


async def test_seabios_boots_from_a_vhost_disk_through_the_iommu(tmp_path, qemu):
    text = f"mktme-fw-boot {os.urandom(8).hex()}\r\n".encode()
    image = bytearray(1 << 20)
    image[:len(BOOT_SECTOR)] = BOOT_SECTOR
    image[510:512] = b"\x55\xaa"
    image[512:512 + len(text)] = text
    disk = tmp_path / "boot.img"
    disk.write_bytes(image)
    host = Host(keyid_bits=6)
    serial = host.keys.add("vm", "type=cpu", tenant="acme")
    config = MachineConfig(memory="128M", name="fw-boot", disks=(DiskSpec.parse(str(disk)),), firmware_boot=True,
                           qemu=qemu)
    async with EncryptedMachine(host, config, key_serial=serial, tenant="acme") as vm:
        assert vm.config.disks[0].dma == "vhost" and not any(a == "-kernel" for a in vm.argv)
        await vm.console.wait_for(text.decode().strip(), timeout=patience(30))
        counters = vm.dma_counters()["disk0"]
        ranges = [(r.gpa, r.end) for r in vm.guest.ranges]
        consistent = vm.guest.check_consistency()
        keyid = vm.keyid
        reads = [d for d in vm.vhost.assigned["disk0"].sanitizer.reports]
    assert "int13 failed" not in vm.console.transcript
    assert counters["faults"] == 0 and counters["errors"] == 0, counters
    assert counters["requests"] >= 3 and counters["write_bytes"] >= 512 and counters["read_bytes"] >= 512
    assert any(lo <= 0xE9418 < hi for lo, hi in ranges), ranges        # the firmware's RAM is mapped
    assert consistent == [] and reads == [] and keyid > 0
    assert disk.read_bytes()[1024:1024 + len(text)] == text            # the INT 13h write landed
