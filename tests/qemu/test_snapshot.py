"""Encrypted snapshots against real QEMU: save, restore and continue; every way a file can lie."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import textwrap

import pytest

from qemu_mktme.errors import IntegrityError, SnapshotError
from qemu_mktme.host.host import Host
from qemu_mktme.files import snapfile
from qemu_mktme.live.encrypted import EncryptedMachine
from qemu_mktme.qemu.boot import BootSpec
from qemu_mktme.qemu.machine import MachineConfig
from qemu_mktme.live.snapshot import restore_snapshot, save_snapshot, snapshot_summary, verify_snapshot

from reference import user_payload

TICK = re.compile(r"tick (\d+)\n")


def new_host_and_key(tenant="acme"):
    host = Host(keyid_bits=6)
    serial = host.keys.add("vm", user_payload(os.urandom(16), os.urandom(16)), tenant=tenant)
    return host, serial


def ticking(image, secret="SNAPSHOT-SECRET-42", memory="256M", name="vm"):
    return MachineConfig(boot=image.boot(commands=[f"write 0x200000 {secret}", "ticks 0 2000000"]),
                         memory=memory, name=name)


def mailbox_ticks(vm, image) -> int:
    addr = int(image.manifest["symbols"]["mailbox"], 16)
    return struct.unpack_from("<Q", vm.ram.read(addr + 8, 8))[0]


@pytest.fixture
def kek():
    return os.urandom(32)


@pytest.fixture
async def saved(tmp_path, baremetal_image, kek):
    """A snapshot of a ticking bare-metal guest, and the tick count stored in it."""
    host, serial = new_host_and_key()
    path = tmp_path / "vm.snap"
    async with EncryptedMachine(host, ticking(baremetal_image), key_serial=serial, tenant="acme") as vm:
        await vm.console.wait_for(r"tick 3\n", 30)
        result = await save_snapshot(vm, path, kek)
        ticks = mailbox_ticks(vm, baremetal_image)      # the VM is running again; the file has <= this
        await vm.console.wait_for(rf"tick {ticks + 1}\n", 30)   # and it carries on after the save
    return path, result, ticks


async def test_save_restore_continues(saved, baremetal_image, kek):
    path, result, _ = saved
    assert result.stored_nbytes < 16 << 20 and result.skipped_nbytes > 200 << 20   # zero chunks skipped
    raw = path.read_bytes()
    assert b"SNAPSHOT-SECRET-42" not in raw and b"tick" not in raw
    assert os.stat(path).st_mode & 0o777 == 0o600
    host = Host(keyid_bits=6)
    vm = await restore_snapshot(host, path, kek)
    async with vm:
        saved_ticks = mailbox_ticks(vm, baremetal_image)
        first = int((await vm.console.wait_for(TICK, 30))[1])
        assert first in (saved_ticks, saved_ticks + 1)                 # carries on, does not reboot
        await vm.console.wait_for(rf"tick {first + 2}\n", 30)
        assert "mktme-baremetal 1 ready" not in vm.console.transcript
        assert vm.ram.read(0x200000, 18) == b"SNAPSHOT-SECRET-42"
        assert vm.query()["key-type"] == "user"
    assert host.keys.table() == [] and host.guests == {}               # restored key revoked with the VM


def mutate(path, offset, fn):
    data = bytearray(path.read_bytes())
    fn(data, offset)
    path.write_bytes(bytes(data))


def flip(data, offset):
    data[offset] ^= 0x01


@pytest.mark.parametrize("where", ["chunk", "device_state", "manifest", "trailer_tag"])
async def test_flipped_bit_is_rejected_before_qemu_starts(saved, kek, where):
    path = saved[0]
    m = snapfile.open_snapshot(path, kek).manifest
    offsets = {
        "chunk": int(m["chunks"][1][2]) + 1000,
        "device_state": int(m["device_state"]["offset"]) + 7,
        "manifest": os.path.getsize(path) - snapfile.TRAILER.size - 20,
        "trailer_tag": os.path.getsize(path) - 20,
    }
    mutate(path, offsets[where], flip)
    host = Host(keyid_bits=6)
    with pytest.raises(IntegrityError):
        await restore_snapshot(host, path, kek)
    assert host.guests == {} and host.keys.table() == []


async def test_truncation_swap_and_substitution(saved, tmp_path, kek, baremetal_image):
    path = saved[0]
    good = path.read_bytes()
    for cut in (len(good) - 1, len(good) // 2, 100):
        path.write_bytes(good[:cut])
        with pytest.raises(IntegrityError, match="truncated|damaged|not a qemu-mktme"):
            verify_snapshot(path, kek)
    m = snapfile.open_snapshot(tmp_path / "vm.snap" if False else _restore(path, good), kek).manifest
    (o0, n0, f0, _), (o1, n1, f1, _) = m["chunks"][0], m["chunks"][1]
    assert n0 == n1
    swapped = bytearray(good)
    swapped[f0:f0 + n0], swapped[f1:f1 + n1] = good[f1:f1 + n1], good[f0:f0 + n0]
    path.write_bytes(bytes(swapped))
    with pytest.raises(IntegrityError, match="chunk 0"):
        verify_snapshot(path, kek)
    # a chunk of another snapshot (same VM, same KEK) in place of this one's
    other = tmp_path / "other.snap"
    host, serial = new_host_and_key()
    async with EncryptedMachine(host, ticking(baremetal_image, "OTHER"), key_serial=serial, tenant="acme") as vm:
        await vm.console.wait_for(r"tick 1\n", 30)
        await save_snapshot(vm, other, kek)
    om = snapfile.open_snapshot(other, kek).manifest
    foreign = other.read_bytes()[int(om["chunks"][0][2]):int(om["chunks"][0][2]) + int(om["chunks"][0][1])]
    substituted = bytearray(good)
    substituted[f0:f0 + len(foreign)] = foreign
    path.write_bytes(bytes(substituted))
    with pytest.raises(IntegrityError, match="another snapshot"):
        verify_snapshot(path, kek)


def _restore(path, data):
    path.write_bytes(data)
    return path


async def test_wrong_kek_and_future_version(saved, kek):
    path = saved[0]
    with pytest.raises(IntegrityError, match="wrong key-encryption key"):
        verify_snapshot(path, os.urandom(32))
    with pytest.raises(ValueError, match="expected 64 hex digits, found 4 hex digits"):
        snapfile.load_kek("abcd")
    assert snapfile.load_kek(kek.hex() + "\n") == kek
    mutate(path, 8, lambda d, o: d.__setitem__(slice(o, o + 4), struct.pack("<I", 99)))
    with pytest.raises(IntegrityError, match="version 99 is newer"):
        verify_snapshot(path, kek)


async def test_restore_needs_the_same_guest_and_memory(tmp_path, baremetal_image, kek):
    kernel = tmp_path / "baremetal.bin"
    shutil.copy(baremetal_image.kernel, kernel)
    boot = BootSpec(kernel, None, "ticks 0 2000000")
    host, serial = new_host_and_key()
    path = tmp_path / "vm.snap"
    async with EncryptedMachine(host, MachineConfig(boot=boot, memory="256M", name="vm"),
                                key_serial=serial, tenant="acme") as vm:
        await vm.console.wait_for(r"tick 1\n", 30)
        await save_snapshot(vm, path, kek)
    with pytest.raises(SnapshotError, match="256 MiB guest; cannot restore into 512 MiB"):
        await restore_snapshot(Host(), path, kek, memory=512 << 20)
    kernel.write_bytes(kernel.read_bytes() + b"\0")
    host2 = Host()
    with pytest.raises(SnapshotError, match="has changed since the save"):
        await restore_snapshot(host2, path, kek)
    assert host2.keys.table() == []


async def test_cpu_key_vm_cannot_be_saved(tmp_path, baremetal_image, kek):
    host = Host()
    serial = host.keys.add("vm", "type=cpu", tenant="acme")
    async with EncryptedMachine(host, ticking(baremetal_image), key_serial=serial, tenant="acme") as vm:
        with pytest.raises(SnapshotError, match="never leaves the CPU"):
            await save_snapshot(vm, tmp_path / "x.snap", kek)
    assert not (tmp_path / "x.snap").exists()


async def test_full_disk_keeps_previous_snapshot(saved, kek, baremetal_image):
    path = saved[0]
    before = path.read_bytes()
    host, serial = new_host_and_key()
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    async with EncryptedMachine(host, ticking(baremetal_image), key_serial=serial, tenant="acme") as vm:
        await vm.console.wait_for(r"tick 1\n", 30)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, hard))     # writes past 64 KiB fail (EFBIG)
        try:
            with pytest.raises(SnapshotError, match="cannot write snapshot"):
                await save_snapshot(vm, path, kek)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, old)
        await vm.console.wait_for(TICK, 30)                                # the VM runs on
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir() if "partial" in p.name] == []


KILLER = textwrap.dedent("""
    import asyncio, os, sys
    from qemu_mktme.host.host import Host
    from qemu_mktme import images
    from qemu_mktme.live.encrypted import EncryptedMachine
    from qemu_mktme.qemu.machine import MachineConfig
    from qemu_mktme.live.snapshot import save_snapshot
    async def main():
        host = Host()
        key, kek, path = sys.argv[1], bytes.fromhex(sys.argv[2]), sys.argv[3]
        serial = host.keys.add("vm", f"type=user key={key[:32]} tweak={key[32:]}", tenant="acme")
        boot = images.load("baremetal").boot(commands=["fill 0x400000 0x2000000 0x5a 8", "ticks 0 2000000"])
        async with EncryptedMachine(host, MachineConfig(boot=boot, memory="256M", name="vm"),
                                    key_serial=serial, tenant="acme") as vm:
            await vm.console.wait_for("tick 1", 30)
            while True:
                print("saving", flush=True)
                await save_snapshot(vm, path, kek)
    asyncio.run(main())
""")


async def test_kill_9_during_save_leaves_a_restorable_snapshot(saved, kek, baremetal_image):
    path = saved[0]
    key = os.urandom(32).hex()
    for delay in (0.05, 0.2, 0.4, 0.7):
        proc = subprocess.Popen([sys.executable, "-c", KILLER, key, kek.hex(), str(path)],
                                stdout=subprocess.PIPE, text=True)
        try:
            for _ in range(2):                  # let one save complete, kill inside the next
                assert proc.stdout.readline() == "saving\n"
            await asyncio.sleep(delay)
        finally:
            proc.kill()
            proc.wait()
            proc.stdout.close()
        verify_snapshot(path, kek)              # old or new, always complete
    host = Host()
    async with await restore_snapshot(host, path, kek) as vm:
        await vm.console.wait_for(TICK, 30)
    assert snapshot_summary(path, kek)["vm"]["name"] == "vm"
    assert hashlib.sha256(path.read_bytes()).hexdigest()      # readable, single file
