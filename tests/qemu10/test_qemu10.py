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
from qemu_mktme.live.snapshot import restore_snapshot, save_snapshot
from qemu_mktme.qemu.binary import ENV_QEMU, find_qemu
from qemu_mktme.qemu.machine import MachineConfig
from qemu_mktme.trace.shim import abi_for

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
