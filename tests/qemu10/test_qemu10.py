"""QEMU 10 (Debian bookworm-backports, unpacked in the cache by ``images build qemu10``) beside
the system's 7.2: the shim's plugin-ABI-3 variant traces it, an encrypted snapshot (its device
state through QEMU 10's migration) saves and restores, and the verifier's bare-metal workload is
identical plain and emulated. ``make test-qemu10`` runs the whole shim and snapshot suites on it."""

from __future__ import annotations

import os

import pytest
from helpers import patience
from reference import user_payload

from qemu_mktme import verifier
from qemu_mktme.errors import ImageError
from qemu_mktme.host.host import Host
from qemu_mktme.images import backports
from qemu_mktme.live.encrypted import EncryptedMachine
from qemu_mktme.live.launch import launch_machine
from qemu_mktme.live.snapshot import restore_snapshot, save_snapshot
from qemu_mktme.qemu.binary import ENV_QEMU, find_qemu
from qemu_mktme.qemu.machine import MachineConfig
from qemu_mktme.trace.accesses import Traffic
from qemu_mktme.trace.shim import abi_for
from qemu_mktme.trace.tracer import Tracer

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def qemu10():
    path = backports.fetch("qemu10")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(ENV_QEMU, str(path))                   # every find_qemu() of this module: QEMU 10
        yield find_qemu()


def test_unpacked_beside_the_system_qemu(qemu10):
    assert qemu10.version[:2] == (10, 0) and abi_for(qemu10.version) == 3
    assert str(qemu10.path).startswith(str(backports.qemu_path().parent))
    assert find_qemu("qemu-system-x86_64").path != qemu10.path           # the system's QEMU is untouched
    manifest = (backports.qemu_path().parent / "manifest.json").read_text()
    assert "bookworm-backports" in manifest and "qemu-system-x86" in manifest
    with pytest.raises(ImageError, match="unknown QEMU release 'qemu11'"):
        backports.qemu_path("qemu11")


async def test_verifier_baremetal_on_qemu10(qemu10, baremetal_image):
    outcomes, _ = await verifier.verify(["baremetal"])
    [o] = outcomes
    assert o.identical, o.first_difference
    shim = [n for n in o.emulated.notes if n.startswith("shim:")]
    assert shim and " 0 mismatches" in shim[0]


async def test_shim_attributes_exactly_on_qemu10(qemu10, baremetal_image):
    """QEMU 10's plugin API (ABI 3, phys=gpa) gives the per-page counts 7.2 gives, access by
    access (the bare-metal guest's commands: 4-byte fills, a 1-byte CRC across a page boundary,
    8-byte fills), the software TLB's counts folded in on request, watched stores streamed."""
    page = 0x400_0000                                                 # untouched until a command names it
    config = MachineConfig(boot=baremetal_image.boot(), memory="512M")
    async with Tracer() as tracer, await launch_machine(config, tracer=tracer) as vm:
        assert vm.qemu is not None and vm.qemu.version[:2] == (10, 0)
        await vm.console.wait_for("mktme> ", patience(10))
        for command in (f"fill {page:#x} 12288 3 4", f"crc {page + 100:#x} 5000", f"fill {page + 0x2000:#x} 64 1 8"):
            if command.startswith(f"fill {page + 0x2000:#x}"):
                stores = tracer.watch(page + 0x2000, 64, on="store")
            await vm.console.command(command, r"ok \w+ .*\n", patience(10))
        assert [p.traffic for p in tracer.page_counters(page, 0x3000)] == [
            Traffic(loads=3996, stores=1024, load_bytes=3996, store_bytes=4096),
            Traffic(loads=1004, stores=1024, load_bytes=1004, store_bytes=4096),
            Traffic(loads=0, stores=1032, load_bytes=0, store_bytes=4160)]
        await tracer.flush()
        written = [await stores.__anext__() for _ in range(8)]
        assert [(a.gpa, a.size, a.kind) for a in written] == [(page + 0x2000 + 8 * i, 8, "store") for i in range(8)]
        stats = tracer.stats()
        assert stats.verify_mismatches == 0 and stats.decode_mismatches == 0 and not stats.decode_api


async def test_snapshot_round_trip_on_qemu10(qemu10, baremetal_image, tmp_path):
    host = Host(keyid_bits=6)
    serial = host.keys.add("vm", user_payload(os.urandom(16), os.urandom(16)), tenant="acme")
    config = MachineConfig(boot=baremetal_image.boot(commands=["write 0x200000 QEMU10-SECRET", "ticks 0 2000000"]),
                           memory="256M", name="vm10")
    path, kek = tmp_path / "vm.snap", os.urandom(32)
    async with EncryptedMachine(host, config, key_serial=serial, tenant="acme") as vm:
        assert vm.qemu is not None and vm.qemu.version[:2] == (10, 0)
        await vm.console.wait_for(r"tick 2\n", patience(30))
        await save_snapshot(vm, path, kek)
    restored = await restore_snapshot(Host(keyid_bits=6), path, kek)
    async with restored:
        await restored.console.wait_for(r"tick \d+\n", patience(30))
        assert "ready" not in restored.console.transcript            # carried on, not rebooted
        assert restored.ram.read(0x200000, 13) == b"QEMU10-SECRET"
