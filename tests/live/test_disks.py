"""live/disks on its own: the vhost-user-blk backends of a machine listen before QEMU starts, give
QEMU its arguments, refuse a memory table before the VM is bound or one that is not the VM's RAM
backend, count per device, and leave nothing behind. No QEMU: the front end's messages are
calls here."""

from __future__ import annotations

import os
import socket
import stat

import pytest

from qemu_mktme.live.disks import VhostDisks
from qemu_mktme.qemu.devices import DiskSpec
from qemu_mktme.vhost.protocol import MemRegion, ProtocolError


@pytest.fixture
def disk(tmp_path) -> DiskSpec:
    path = tmp_path / "d.raw"
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    return DiskSpec(path, format="raw", dma="vhost")


async def test_backends_listen_before_qemu_and_go_away(disk, tmp_path):
    ram = tmp_path / "ram"
    ram.write_bytes(bytes(4096))
    disks = VhostDisks("vm", [(0, disk), (1, disk)], bound=lambda: None, ram_file=lambda: str(ram))
    argv = await disks.start()
    try:
        assert disks.dir is not None and stat.S_IMODE(disks.dir.stat().st_mode) == 0o700
        socks = sorted(p.name for p in disks.dir.glob("*.sock"))
        assert socks == ["disk0.sock", "disk1.sock"]
        assert argv == ["-chardev", f"socket,id=vhost0,path={disks.dir / 'disk0.sock'},reconnect=1",
                        "-device", "vhost-user-blk-pci,chardev=vhost0,id=disk0-dev,queue-size=256",
                        "-chardev", f"socket,id=vhost1,path={disks.dir / 'disk1.sock'},reconnect=1",
                        "-device", "vhost-user-blk-pci,chardev=vhost1,id=disk1-dev,queue-size=256"]
        with socket.socket(socket.AF_UNIX) as s:              # a front end can connect now
            s.connect(str(disks.dir / "disk0.sock"))
        summary = disks.summary()
        assert len(summary) == 2 and summary[0].startswith("  dma vm/disk0: 0 requests (0 errors, 0 unsupported)")
        assert set(disks.counters()) == {"disk0", "disk1"}
    finally:
        directory = disks.dir
        disks.close()
    assert directory is not None and not directory.exists() and disks.dir is None


async def test_a_memory_table_is_checked_against_the_bound_vm(disk, tmp_path):
    ram = tmp_path / "ram"
    ram.write_bytes(bytes(1 << 16))
    bound: list[object] = []
    disks = VhostDisks("vm", [(0, disk)], bound=lambda: bound[0] if bound else None, ram_file=lambda: str(ram))
    memory_for = disks._memory_for("disk0")      # what the device calls on SET_MEM_TABLE
    other = tmp_path / "other"
    other.write_bytes(bytes(1 << 16))
    fd = os.open(other, os.O_RDWR)
    try:
        region = MemRegion(0, 1 << 16, 0x7F00_0000_0000, 0, fd=fd)
        with pytest.raises(ProtocolError, match="memory table before the VM is bound to the host model"):
            memory_for([region])
        bound.append(object())                    # bound now, but the table names another file
        with pytest.raises(ProtocolError, match="at GPA 0x0 is not the VM's RAM backend"):
            memory_for([region])
    finally:
        os.close(fd)
        disks.close()


async def test_each_backend_gets_its_disks_polling_bound(disk, tmp_path):
    """``--disk PATH,poll-max-ns=N`` reaches that disk's backend; unset, the backend's default."""
    from qemu_mktme.vhost.blk import POLL_MAX_NS
    ram = tmp_path / "ram"
    ram.write_bytes(bytes(4096))
    quiet = DiskSpec.parse(f"{disk.path},dma=vhost,poll-max-ns=0")
    disks = VhostDisks("vm", [(0, quiet), (1, disk)], bound=lambda: None, ram_file=lambda: str(ram))
    await disks.start()
    try:
        assert [d.poll_max_ns for d in disks.devices] == [0, POLL_MAX_NS]
    finally:
        disks.close()
