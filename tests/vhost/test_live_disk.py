"""The stock Debian guest's virtio_blk driver on our vhost-user-blk backend, every DMA through
the host model's IOMMU: the disk workload's data round-trips, lands in the disk file, the DMA
trace sees the VM's KeyID, and the DRAM view of a DMA buffer is its ciphertext."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re

from helpers import patience
from qemu_mktme.host.host import Host
from qemu_mktme.live.encrypted import EncryptedMachine
from qemu_mktme.qemu.devices import DiskSpec
from qemu_mktme.qemu.machine import MachineConfig
from reference import user_payload, xts_lines


def disk_machine(linux_image, tmp_path, name: str, payload: str = "type=cpu", size_mb: int = 1):
    """A host with one key, a 16 MiB disk file and the disk workload's machine config."""
    host = Host(keyid_bits=6)
    serial = host.keys.add("vm", payload, tenant="acme")
    disk = tmp_path / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(16 << 20)
    config = MachineConfig(boot=linux_image.boot(workload="disk", params={"size_mb": size_mb}), memory="512M",
                           name=name, disks=(DiskSpec.parse(str(disk)),))
    return host, serial, disk, config


async def test_stock_virtio_blk_on_our_backend_through_the_iommu(linux_image, tmp_path):
    key, tweak = os.urandom(16), os.urandom(16)
    host, serial, disk, config = disk_machine(linux_image, tmp_path, "vhost-disk", user_payload(key, tweak))
    async with EncryptedMachine(host, config, key_serial=serial, tenant="acme") as vm:
        assert vm.config.disks[0].dma == "vhost"                          # the default under emulation
        assert any("vhost-user-blk-pci" in a for a in vm.argv)
        transfers, checked = [], asyncio.Event()

        async def watch() -> None:
            async for t in vm.dma_trace():
                transfers.append(t)
                if t.request == "out" and t.length >= 4096 and not checked.is_set():
                    await vm.pause()                                       # the buffer holds still
                    hpa = vm.guest.hpa_of(t.iova, 64)
                    assert t.hpa == hpa and t.keyid == vm.keyid
                    plain = vm.guest.read(t.iova, 64)
                    assert vm.guest.dram(t.iova, 64) == xts_lines(key, tweak, hpa, plain)
                    checked.set()
                    await vm.resume()

        watcher = asyncio.create_task(watch())
        try:
            await vm.console.wait_for("mktme-linux: poweroff", timeout=patience(30))
        finally:
            watcher.cancel()
        text = vm.console.transcript
        counters = vm.dma_counters()["disk0"]
        sanitizer = vm.vhost.assigned["disk0"].sanitizer.count
        keyid = vm.keyid
    wrote = re.search(r"disk wrote sha256=(\w+)", text)[1]
    assert re.search(r"disk read sha256=(\w+) match", text)[1] == wrote
    assert hashlib.sha256(disk.read_bytes()[:1 << 20]).hexdigest() == wrote     # on the disk file too
    assert checked.is_set()
    assert {"in", "out", "flush"} <= {t.request for t in transfers}
    assert all(t.keyid == keyid for t in transfers if t.hpa >= 0)
    assert sanitizer == 0 and counters["write_bytes"] >= 1 << 20 and counters["read_bytes"] >= 1 << 20
    assert counters["faults"] == 0 and counters["errors"] == 0          # the firmware's requests too


async def test_a_wrong_iommu_keyid_breaks_the_stock_driver_and_is_reported(linux_image, tmp_path):
    host, serial, disk, config = disk_machine(linux_image, tmp_path, "vhost-bad")
    async with EncryptedMachine(host, config, key_serial=serial, tenant="acme", iommu_keyid=7) as vm:
        foreign = []
        vm.guest.foreign_write_hooks.append(lambda gpa, n, k: foreign.append(k))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience(20)       # the driver's first read (partition scan at insmod)
        while "disk0" not in vm.vhost.assigned or not vm.vhost.assigned["disk0"].sanitizer.count:
            assert loop.time() < deadline, "no DMA through the wrong KeyID was reported"
            await asyncio.sleep(0.05)
        reports = list(vm.vhost.assigned["disk0"].sanitizer.reports)
        assert {(r.keyid, r.expected_keyid) for r in reports} == {(7, vm.keyid)}
        # the device read the driver's rings as garbage: it gives the queue up and asks for a reset
        while not vm.vhost.devices[0].status & 0x40:
            assert loop.time() < deadline, "the device kept using a garbage ring"
            await asyncio.sleep(0.05)
        assert "match" not in vm.console.transcript


async def test_the_compiled_dataplane_serves_the_stock_driver(linux_image, tmp_path):
    """No trace listening: after the first touches the queue threads serve the guest's I/O; the
    data round-trips and lands in the file, through the VM's KeyID only."""
    from qemu_mktme.vhost import native
    if native.library() is None:
        import pytest
        pytest.skip(f"no compiled dataplane: {native.status()}")
    host, serial, disk, config = disk_machine(linux_image, tmp_path, "vhost-native", size_mb=4)
    async with EncryptedMachine(host, config, key_serial=serial, tenant="acme") as vm:
        await vm.console.wait_for("mktme-linux: poweroff", timeout=patience(30))
        text = vm.console.transcript
        counters = vm.dma_counters()["disk0"]
        sanitizer = vm.vhost.assigned["disk0"].sanitizer.count
    wrote = re.search(r"disk wrote sha256=(\w+)", text)[1]
    assert re.search(r"disk read sha256=(\w+) match", text)[1] == wrote
    assert hashlib.sha256(disk.read_bytes()[:4 << 20]).hexdigest() == wrote
    assert sanitizer == 0 and counters["faults"] == 0 and counters["errors"] == 0
    assert counters["native"] > counters["requests"] // 2, counters        # most of them in C
    assert counters["read_bytes"] >= 4 << 20 and counters["write_bytes"] >= 4 << 20
