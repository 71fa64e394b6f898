"""The shim wired to the host model: foreign-KeyID writes made through the emulated hardware are
caught when the guest reads them; `qemu-mktme run --trace` prints per-KeyID traffic."""

from __future__ import annotations

import os
import re
import zlib

from qemu_mktme.host.dma import AssignedDevice
from qemu_mktme.host.host import Host
from qemu_mktme.live.encrypted import EncryptedMachine
from qemu_mktme.live.launch import launch_machine
from qemu_mktme.qemu.machine import MachineConfig
from qemu_mktme.trace.tracer import Tracer

from helpers import patience, qm

LINE = 0x500040


async def test_host_write_through_foreign_keyid_is_a_foreign_read(baremetal_image):
    host = Host()
    serial = host.keys.add("vm", "type=cpu", tenant="acme")
    intruder = host.keys.add("dev", "type=cpu", tenant="other")
    other = host.keys.describe(intruder)["keyid"]
    config = MachineConfig(boot=baremetal_image.boot(), memory="256M", name="vm")
    async with Tracer() as tracer, await launch_machine(config, tracer=tracer, machine=lambda c: EncryptedMachine(
            host, c, key_serial=serial, tenant="acme")) as vm:
        await vm.console.wait_for("mktme> ", patience(10))
        assert tracer.keyid_of(LINE) == vm.keyid
        async with tracer.foreign_reads() as reads:
            vm.guest.write(LINE, os.urandom(64), keyid=other)            # a VMM bug, through the engine
            m = await vm.console.command(f"crc {LINE:#x} 64", r"ok crc32 \S+ 64 0x(\w{8})\n")
            read = await anext(reads)
        assert int(m[1], 16) == zlib.crc32(vm.ram.read(LINE, 64))       # the guest read garbage ...
        assert (read.foreign_keyid, read.line_gpa) == (other, LINE)     # ... and it was seen
        assert read.access.kind == "load" and read.instruction.mnemonic == "movzx"
        # the same through an assigned device whose IOMMU domain carries the wrong KeyID
        vm.guest.iommu.retag(0x600000, other)
        async with tracer.foreign_reads() as reads:
            AssignedDevice(vm.guest).dma_write(0x600000, b"\x5a" * 64)
            await vm.console.command("crc 0x600000 16", r"ok crc32 .*\n")
            read = await anext(reads)
        assert (read.foreign_keyid, read.line_gpa) == (other, 0x600000)
        totals = tracer.keyid_totals()
        assert totals[vm.keyid].loads >= 64 and set(totals) == {vm.keyid}


def test_run_trace_prints_per_keyid_traffic(baremetal_image):
    out = qm("run", "--trace", "--trace-interval", "0.5", "--no-input", "--key", "cpu",
             "-c", "fill 0x400000 0x100000 0x33 8", "-c", "ticks 3 3000000", "-c", "poweroff")
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"KeyID\s+loads\s+stores\s+bytes", out.stderr)
    assert re.search(r"^\s+1\s+[\d,]+\s+[\d,]+\s+", out.stderr, re.M)       # KeyID 1 has traffic
    assert "hottest pages:" in out.stderr and "(KeyID 1)" in out.stderr
