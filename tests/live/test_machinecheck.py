"""live/machinecheck on its own: under the integrity mode a line tampered in DRAM stops the guest
at its first access, with the access the tracer saw; a tampered line nobody touches stops nothing."""

from __future__ import annotations

import asyncio
import re
import zlib

import pytest
from helpers import patience

from qemu_mktme import images
from qemu_mktme.live.encrypted import EncryptedMachine
from qemu_mktme.live.session import HostSession, VmSpec
from qemu_mktme.qemu.machine import MachineConfig, VmState

pytestmark = pytest.mark.qemu
LINE = 0x200000


def _flip(vm: EncryptedMachine, gpa: int) -> None:
    """A bus attacker's bit flip in the line's DRAM ciphertext."""
    hpa = int(vm.guest.hpa_of(gpa))
    memory = vm.guest.platform.memory
    line = bytearray(memory.read_dram(hpa, 64))
    line[5] ^= 0x10
    memory.write_dram(hpa, bytes(line))


async def test_a_tampered_line_stops_the_guest_at_its_first_access(baremetal_image):
    spec = VmSpec(MachineConfig(boot=baremetal_image.boot(), memory="64M", name="mc"), "t", "type=cpu", trace=True)
    async with HostSession([spec], integrity="mac", control=False) as session:
        vm = session.machines["mc"]
        assert isinstance(vm, EncryptedMachine) and vm.poison_watch is not None
        await vm.console.wait_for(re.escape(images.BAREMETAL.prompt), patience(20))
        await vm.console.command(f"writehex {LINE:#x} 00112233445566778899aabbccddeeff", r"ok writehex .*\n")
        _flip(vm, LINE + 0x1000)                                   # a line the guest never reads
        _flip(vm, LINE)
        assert not vm.poison_watch.events                          # poisoned, not yet consumed
        await vm.console.write(f"crc {LINE:#x} 16\r")
        await asyncio.wait_for(vm.poison_watch.stopped.wait(), patience(20))
        (event,) = vm.poison_watch.events
        assert event.vm == "mc" and event.line_gpa == LINE and event.cause == "dram-write"
        assert LINE <= event.access.gpa < LINE + 64 and event.access.kind in ("load", "store")
        assert "poisoned line 0x200000" in str(event) and "VM stopped" in str(event)
        assert vm.state is VmState.PAUSED
        # The guest may run on for the moment the tracer takes, but on the values it had: the
        # tampered line never reaches its RAM.
        done = re.search(r"ok crc32 0x200000 16 (0x[0-9a-f]+)", vm.console.transcript)
        assert done is None or int(done[1], 16) == zlib.crc32(bytes.fromhex("00112233445566778899aabbccddeeff"))
