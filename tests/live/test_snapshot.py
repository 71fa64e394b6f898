"""Encrypted snapshots against real QEMU: save, restore and continue; every way a file can lie."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import resource
import shutil
import signal
import stat
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import patience
from reference import user_payload, xts_lines

from qemu_mktme.errors import IntegrityError, SnapshotError
from qemu_mktme.host.host import Host
from qemu_mktme import keymaterial
from qemu_mktme.files import snapfile
from qemu_mktme.files.runtime import process_start_time
from qemu_mktme.live.encrypted import EncryptedMachine
from qemu_mktme.live.snapshot import restore_snapshot, save_snapshot, snapshot_summary, verify_snapshot
from qemu_mktme.qemu.boot import BootSpec
from qemu_mktme.qemu.machine import Machine, MachineConfig

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
        await vm.console.wait_for(r"tick 3\n", patience(30))
        result = await save_snapshot(vm, path, kek)
        ticks = mailbox_ticks(vm, baremetal_image)      # the VM is running again; the file has <= this
        await vm.console.wait_for(rf"tick {ticks + 1}\n", patience(30))   # and it carries on after the save
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
        first = int((await vm.console.wait_for(TICK, patience(30)))[1])
        # Carries on: saved after "tick 3", so a reboot would say "tick 1" first; the guest runs
        # while we read its counter, which is at least the tick just printed (or one short, if
        # the save caught it between the increment and the end of the line).
        assert 3 <= first <= mailbox_ticks(vm, baremetal_image) + 1
        await vm.console.wait_for(rf"tick {first + 2}\n", patience(30))
        assert "mktme-baremetal 1 ready" not in vm.console.transcript
        assert vm.ram.read(0x200000, 18) == b"SNAPSHOT-SECRET-42"
        assert vm.query()["key-type"] == "user"
    assert host.keys.table() == [] and host.guests == {}               # restored key revoked with the VM


@pytest.mark.parametrize("where", ["same HPA", "relocated"])
async def test_restore_goes_through_the_host_model(saved, baremetal_image, kek, where):
    """At the saved HPA the DRAM image goes back into DRAM as is; elsewhere the host re-keys it
    (decrypt with the tenant key at the old tweak, write through the VM's KeyID). Either way the
    guest sees its memory and DRAM holds its ciphertext at the new HPA."""
    path, _, _ = saved
    saved_hpa = int(verify_snapshot(path, kek)["ram"]["hpa"], 16)
    host = Host(keyid_bits=6)
    if where == "relocated":
        host.hpa_ranges.reserve("squatter", 1 << 20, saved_hpa)
    async with await restore_snapshot(host, path, kek) as vm:
        assert (vm.guest.hpa_base == saved_hpa) == (where == "same HPA")
        assert vm.ram.read(0x200000, 18) == b"SNAPSHOT-SECRET-42"
        hpa = vm.guest.hpa_of(0x200000)
        dram = vm.guest.dram(0x200000, 64)
        key = host.keys.payload(vm.key_serial, vm.tenant)
        assert dram == xts_lines(key.key, key.tweak, hpa, vm.ram.read(0x200000, 64))
        await vm.console.wait_for(TICK, patience(30))


def mutate(path, offset, fn):
    data = bytearray(path.read_bytes())
    fn(data, offset)
    path.write_bytes(bytes(data))


def flip(data, offset):
    data[offset] ^= 0x01


def regions(path, kek):
    """File offset of one byte inside each section of a snapshot."""
    with snapfile.open_snapshot(path, kek) as snap:
        c1 = snap.chunks[1]
        size = snap.file_size
        return {
            "header_magic": 3, "header_version": 8, "header_salt": 20, "header_id": 50,
            "chunk": c1.file_offset + 1000, "chunk_tag": c1.file_offset + c1.nbytes + 5,
            "device_state": snap.device_state_offset + 7,
            "manifest": size - snapfile.TRAILER.size - 20,
            "trailer_offset": size - snapfile.TRAILER.size + 1, "trailer_length": size - snapfile.TRAILER.size + 9,
            "trailer_tag": size - 20, "trailer_end": size - 3,
        }


WHERE = ["header_magic", "header_version", "header_salt", "header_id", "chunk", "chunk_tag", "device_state",
         "manifest", "trailer_offset", "trailer_length", "trailer_tag", "trailer_end"]


@pytest.mark.parametrize("where", WHERE)
async def test_flipped_bit_anywhere_is_refused(saved, kek, where):
    path = saved[0]
    mutate(path, regions(path, kek)[where], flip)
    host = Host(keyid_bits=6)
    with pytest.raises(IntegrityError) as err:
        await restore_snapshot(host, path, kek)
    assert host.guests == {} and host.keys.table() == []
    with pytest.raises(IntegrityError):
        verify_snapshot(path, kek)
    if where == "header_version":                      # a damaged field, not a claim of a newer format
        assert "corrupted" in str(err.value) and "newer" not in str(err.value)


async def test_truncation_swap_and_substitution(saved, tmp_path, kek, baremetal_image):
    path = saved[0]
    good = path.read_bytes()
    for cut in (len(good) - 1, len(good) // 2, 100, 10):
        path.write_bytes(good[:cut])
        with pytest.raises(IntegrityError, match="truncated|damaged|not a qemu-mktme"):
            verify_snapshot(path, kek)
    path.write_bytes(good)
    with snapfile.open_snapshot(path, kek) as snap:
        c0, c1 = snap.chunks[0], snap.chunks[1]
    assert c0.nbytes == c1.nbytes
    n = c0.nbytes + snapfile.TAG_NBYTES
    f0, f1 = c0.file_offset, c1.file_offset
    swapped = bytearray(good)
    swapped[f0:f0 + n], swapped[f1:f1 + n] = good[f1:f1 + n], good[f0:f0 + n]
    path.write_bytes(bytes(swapped))
    with pytest.raises(IntegrityError, match="chunk 0"):
        verify_snapshot(path, kek)
    # a chunk of another snapshot (same VM, same KEK) in place of this one's
    other = tmp_path / "other.snap"
    host, serial = new_host_and_key()
    async with EncryptedMachine(host, ticking(baremetal_image, "OTHER"), key_serial=serial, tenant="acme") as vm:
        await vm.console.wait_for(r"tick 1\n", patience(30))
        await save_snapshot(vm, other, kek)
    with snapfile.open_snapshot(other, kek) as osnap:
        o0 = osnap.chunks[0]
    foreign = other.read_bytes()[o0.file_offset:o0.file_offset + o0.nbytes + snapfile.TAG_NBYTES]
    substituted = bytearray(good)
    substituted[f0:f0 + len(foreign)] = foreign
    path.write_bytes(bytes(substituted))
    with pytest.raises(IntegrityError, match="another snapshot"):
        verify_snapshot(path, kek)


@pytest.mark.parametrize("where", ["after_header", "between_chunks", "before_manifest"])
async def test_inserted_bytes_are_refused(saved, kek, where):
    """Bytes inserted between sections, with the trailer's manifest offset moved to match."""
    path = saved[0]
    good = path.read_bytes()
    with snapfile.open_snapshot(path, kek) as snap:
        at = {"after_header": snapfile.HEADER.size, "between_chunks": snap.chunks[1].file_offset,
              "before_manifest": snap.device_state_offset + snap.device_state_nbytes}[where]
    data = bytearray(good[:at] + bytes(64) + good[at:])
    t = len(data) - snapfile.TRAILER.size
    m_off, m_len, tag, end = snapfile.TRAILER.unpack(data[t:])
    data[t:] = snapfile.TRAILER.pack(m_off + 64, m_len, tag, end)
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        verify_snapshot(path, kek)


def synthetic(kek, canonical=snapfile.canonical, version=snapfile.VERSION):
    """A small snapshot file written by Writer, without QEMU (one 64-byte chunk)."""
    import io
    buf = io.BytesIO()
    w = snapfile.Writer(buf, kek)
    w.add_chunk(0, bytes(range(64)))
    orig = snapfile.canonical
    snapfile.canonical = canonical
    try:
        w.finish({"format": "qemu-mktme-snapshot", "vm": {"memory": 1 << 20}}, b"state", bytes(32))
    finally:
        snapfile.canonical = orig
    data = bytearray(buf.getvalue())
    data[8:12] = struct.pack("<I", version)
    return bytes(data)


def test_manifest_with_a_duplicated_key_is_refused(tmp_path, kek):
    path = tmp_path / "s.snap"
    path.write_bytes(synthetic(kek))
    with snapfile.open_snapshot(path, kek) as snap:
        snap.verify_all()
        assert snap.chunk(snap.chunks[0]) == bytes(range(64))
    canonical = snapfile.canonical
    dup = lambda m: canonical(m)[:-1] + b',"format":"other"}'
    path.write_bytes(synthetic(kek, canonical=dup))
    with pytest.raises(IntegrityError, match="duplicate key 'format'"):
        snapfile.open_snapshot(path, kek)
    with pytest.raises(ValueError, match="duplicate"):
        snapfile.parse_manifest(b'{"a":{"b":1,"b":1}}')


async def test_wrong_kek_and_other_versions(saved, kek, tmp_path):
    path = saved[0]
    with pytest.raises(IntegrityError, match="wrong key-encryption key"):
        verify_snapshot(path, os.urandom(32))
    with pytest.raises(ValueError, match="expected 64 hex digits, found 4 hex digits"):
        keymaterial.load_kek("abcd")
    assert keymaterial.load_kek(kek.hex() + "\n") == kek
    good = path.read_bytes()
    for version in (0, 3, 99, 67108866):                # the field of an intact file changed: corrupted
        mutate(path, 8, lambda d, o, v=version: d.__setitem__(slice(o, o + 4), struct.pack("<I", v)))
        with pytest.raises(IntegrityError, match="corrupted header") as err:
            verify_snapshot(path, kek)
        assert "newer" not in str(err.value)
        path.write_bytes(good)
    # a genuinely newer file (it does not authenticate as ours): plausible versions only
    newer = tmp_path / "newer.snap"
    newer.write_bytes(synthetic(kek, version=3)[:-30] + bytes(30))
    with pytest.raises(IntegrityError, match="version 3 is newer than this qemu-mktme .2., or the file is corrupted"):
        verify_snapshot(newer, kek)
    newer.write_bytes(synthetic(kek, version=67108866)[:-30] + bytes(30))
    with pytest.raises(IntegrityError, match="corrupted header .version field 67108866"):
        verify_snapshot(newer, kek)
    old = tmp_path / "v1.snap"                          # format 1: 12-byte header, same trailer
    body = b"QMKTSNAP" + struct.pack("<I", 1) + os.urandom(100)
    old.write_bytes(body + snapfile.TRAILER.pack(len(body) - 20, 20, bytes(16), snapfile.END_MAGIC))
    with pytest.raises(IntegrityError, match="format version 1 snapshot, which this qemu-mktme no longer reads"):
        verify_snapshot(old, kek)


def ram_words(path, kek):
    """Every 8-byte word of every stored chunk as it lies in the file (ciphertext and tags)."""
    raw = np.frombuffer(path.read_bytes(), np.uint8)
    with snapfile.open_snapshot(path, kek) as snap:
        start, end = snap.chunks[0].file_offset, snap.device_state_offset
    return raw[start:end].view(np.uint64)


async def test_two_snapshots_share_no_chunk_bytes(tmp_path, baremetal_image, kek):
    """One VM saved three times in a row, twice under one KEK and once under another: most of
    its RAM (code, the secret) is unchanged, its DRAM image equal, yet the files have no 8-byte
    word of RAM in common (format 1 stored the DRAM image itself: equal chunks, equal bytes)."""
    host, serial = new_host_and_key()
    paths = [tmp_path / f"{i}.snap" for i in range(3)]
    keks = [kek, kek, os.urandom(32)]
    async with EncryptedMachine(host, ticking(baremetal_image), key_serial=serial, tenant="acme") as vm:
        await vm.console.wait_for(r"tick 2\n", patience(30))
        for p, k in zip(paths, keks):
            await save_snapshot(vm, p, k)
    with snapfile.open_snapshot(paths[0], kek) as a, snapfile.open_snapshot(paths[1], kek) as b:
        assert [(c.offset, c.nbytes) for c in a.chunks] == [(c.offset, c.nbytes) for c in b.chunks]
        same = sum(a.chunk(x) == b.chunk(y) for x, y in zip(a.chunks, b.chunks))
        assert same >= len(a.chunks) - 2                     # equal DRAM images ...
    words = [ram_words(p, k) for p, k in zip(paths, keks)]
    assert words[0].size > 100_000
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert np.intersect1d(words[i], words[j]).size == 0  # ... no equal bytes in the files
    assert np.intersect1d(words[0], np.zeros(1, np.uint64)).size == 0


def test_chunk_sealing_is_aes_gcm_under_a_per_snapshot_key(tmp_path, kek):
    """The chunk bytes in the file are not its plaintext (DRAM image): AES-GCM, tag appended."""
    path = tmp_path / "s.snap"
    path.write_bytes(synthetic(kek))
    with snapfile.open_snapshot(path, kek) as snap:
        c = snap.chunks[0]
        assert c.file_offset == snapfile.HEADER.size
        assert path.read_bytes()[c.file_offset:c.file_offset + 64] != bytes(range(64))


async def test_restore_needs_the_same_guest_and_memory(tmp_path, baremetal_image, kek):
    kernel = tmp_path / "baremetal.bin"
    shutil.copy(baremetal_image.kernel, kernel)
    boot = BootSpec(kernel, None, "ticks 0 2000000")
    host, serial = new_host_and_key()
    path = tmp_path / "vm.snap"
    async with EncryptedMachine(host, MachineConfig(boot=boot, memory="256M", name="vm"),
                                key_serial=serial, tenant="acme") as vm:
        await vm.console.wait_for(r"tick 1\n", patience(30))
        await save_snapshot(vm, path, kek)
    with pytest.raises(SnapshotError, match="256 MiB guest; cannot restore into 512 MiB"):
        await restore_snapshot(Host(), path, kek, memory=512 << 20)
    kernel.write_bytes(kernel.read_bytes() + b"\0")
    host2 = Host()
    with pytest.raises(SnapshotError, match="has changed since the save"):
        await restore_snapshot(host2, path, kek)
    assert host2.keys.table() == []


async def test_a_paused_vm_is_saved_once_then_needs_a_resume(tmp_path, baremetal_image, kek):
    """QEMU refuses a second migration while the VM stays paused after the first: one clear error,
    nothing written; after a resume the VM saves again."""
    host, serial = new_host_and_key()
    async with EncryptedMachine(host, ticking(baremetal_image), key_serial=serial, tenant="acme") as vm:
        await vm.console.wait_for(r"tick 1\n", patience(30))
        await vm.pause()
        await save_snapshot(vm, tmp_path / "a.snap", kek)
        with pytest.raises(SnapshotError, match="resume it, then save"):
            await save_snapshot(vm, tmp_path / "b.snap", kek)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.snap"]
        await vm.resume()
        await save_snapshot(vm, tmp_path / "b.snap", kek)
    verify_snapshot(tmp_path / "b.snap", kek)


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
        await vm.console.wait_for(r"tick 1\n", patience(30))
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, hard))     # writes past 64 KiB fail (EFBIG)
        try:
            with pytest.raises(SnapshotError, match="cannot write snapshot"):
                await save_snapshot(vm, path, kek)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, old)
        await vm.console.wait_for(TICK, patience(30))                                # the VM runs on
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
            await vm.console.wait_for("tick 1", 300)
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
    leftovers = [p.name for p in path.parent.iterdir() if ".partial-" in p.name]
    host, serial = new_host_and_key()
    async with EncryptedMachine(host, ticking(baremetal_image), key_serial=serial, tenant="acme") as vm:
        await vm.console.wait_for(r"tick 1\n", patience(30))
        await save_snapshot(vm, path.with_name("another.snap"), kek)     # any save in that directory
    assert [p.name for p in path.parent.iterdir() if ".partial-" in p.name] == [], leftovers
    host = Host()
    async with await restore_snapshot(host, path, kek) as vm:
        await vm.console.wait_for(TICK, patience(30))
    assert snapshot_summary(path, kek)["vm"]["name"] == "vm"
    assert hashlib.sha256(path.read_bytes()).hexdigest()      # readable, single file


async def test_chunk_changed_after_the_checks_never_reaches_a_running_guest(saved, kek, monkeypatch):
    """Time of check / time of use: the file changes once restore has checked what it checks
    before starting QEMU. Restore must refuse, tear the new QEMU down, and never run a vCPU."""
    path = saved[0]
    offset = regions(path, kek)["chunk"]
    resumed = []
    launch, resume = EncryptedMachine.launch, Machine.resume

    async def launch_then_tamper(self):
        await launch(self)
        with open(path, "r+b") as f:  # noqa: ASYNC230 -- in place: the restorer's open file sees it
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0x40]))

    async def recording_resume(self):
        resumed.append(self.name)
        await resume(self)

    monkeypatch.setattr(EncryptedMachine, "launch", launch_then_tamper)
    monkeypatch.setattr(Machine, "resume", recording_resume)
    host = Host(keyid_bits=6)
    with pytest.raises(IntegrityError, match="chunk 1 .* fails authentication"):
        await restore_snapshot(host, path, kek)
    assert resumed == []                                  # no vCPU ever ran
    assert host.guests == {} and host.keys.table() == []


async def test_file_replaced_after_open_restores_what_was_opened(saved, tmp_path, kek, monkeypatch):
    """Renaming another file over the path mid-restore changes nothing: one descriptor, read once."""
    path = saved[0]
    other = tmp_path / "other.bin"
    other.write_bytes(os.urandom(os.path.getsize(path)))
    launch = EncryptedMachine.launch

    async def launch_then_replace(self):
        await launch(self)
        os.replace(other, path)

    monkeypatch.setattr(EncryptedMachine, "launch", launch_then_replace)
    async with await restore_snapshot(Host(keyid_bits=6), path, kek) as vm:
        await vm.console.wait_for(TICK, patience(30))
        assert vm.ram.read(0x200000, 18) == b"SNAPSHOT-SECRET-42"


def qemu_argv(vm) -> bytes:
    return Path(f"/proc/{vm.pid}/cmdline").read_bytes()


async def test_restored_qemu_does_not_show_the_kernel_command_line(saved, kek):
    """The sealed -append goes to QEMU through a pipe (-readconfig), not its argv (ps)."""
    path = saved[0]
    async with await restore_snapshot(Host(keyid_bits=6), path, kek) as vm:
        argv = qemu_argv(vm)
        assert b"SNAPSHOT-SECRET-42" not in argv and b"-append" not in argv and b"-readconfig" in argv
        append = await vm.qmp.execute("qom-get", {"path": "/machine", "property": "append"})
        assert "write 0x200000 SNAPSHOT-SECRET-42" in append == vm.config.boot.append   # QEMU has it
        await vm.console.wait_for(TICK, patience(30))


async def test_kernel_command_line_through_readconfig_reaches_the_guest(baremetal_image):
    """Every launch passes the command line through a pipe: the guest runs the commands of a
    command line that never was in QEMU's argv."""
    boot = baremetal_image.boot(commands=["write 0x200000 VIA-READCONFIG", "crc 0x200000 14"])
    before = open_pipes()
    async with Machine(MachineConfig(boot=boot, memory="256M", name="vm")) as vm:
        await vm.console.wait_for(r"ok write 0x200000 14\n", patience(30))
        argv = qemu_argv(vm)
        assert b"VIA-READCONFIG" not in argv and b"-append" not in argv and b"-readconfig" in argv
        assert vm.ram.read(0x200000, 14) == b"VIA-READCONFIG"
        assert open_pipes() <= before | {pipe_of(vm.pid)}     # our copy of the pipe is closed


def open_pipes() -> set[str]:
    """The pipes this process holds open (by inode)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("pipe:"):
            found.add(target)
    return found


def pipe_of(pid: int) -> str:
    """QEMU's stdout pipe, which this process reads."""
    return os.readlink(f"/proc/{pid}/fd/1")


async def test_command_line_that_a_config_file_cannot_carry_goes_to_append(baremetal_image, caplog):
    boot = baremetal_image.boot(commands=['write 0x200000 "quoted"'])
    async with Machine(MachineConfig(boot=boot, memory="256M", name="vm")) as vm:
        await vm.console.wait_for(r"ok write 0x200000", patience(30))
        assert b"-append" in qemu_argv(vm)
    assert "visible in ps" in caplog.text


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


async def test_save_removes_partial_files_of_dead_writers_only(tmp_path, baremetal_image, kek):
    dead, me = dead_pid(), os.getpid()
    my_start = process_start_time(me)
    magic = snapfile.MAGIC + os.urandom(100)
    removed = {f".vm.snap.partial-{dead}-{12345}": magic,          # writer gone
               f".other.snap.partial-{dead}-7": b"",                 # killed before the header
               f".x.snap.partial-{me}-{my_start + 1}": magic,        # pid reused: another start time
               f".w.snap.partial-{dead}": magic}                     # format-1 name, writer gone
    kept = {f".y.snap.partial-{me}-{my_start}": magic,               # writer alive (us)
            f".z.snap.partial-{me}": magic,                          # format-1 name, pid alive
            ".vm.snap.partial-abc": magic, f"vm.snap.partial-{dead}-1": magic,       # other shapes
            f".vm.snap.partial-{dead}-1.bak": magic, f".vm.snap.partial-{dead}-": magic,
            f".u.snap.partial-{dead}-1": b"the user's own data"}     # not a snapshot
    for name, data in {**removed, **kept}.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "target").write_bytes(magic)
    (tmp_path / f".s.snap.partial-{dead}-1").symlink_to(tmp_path / "target")
    (tmp_path / f".d.snap.partial-{dead}-1").mkdir()
    host, serial = new_host_and_key()
    async with EncryptedMachine(host, ticking(baremetal_image), key_serial=serial, tenant="acme") as vm:
        await vm.console.wait_for(r"tick 1\n", patience(30))
        await save_snapshot(vm, tmp_path / "new.snap", kek)
    left = {p.name for p in tmp_path.iterdir()}
    assert not left & set(removed)
    assert left == set(kept) | {"target", f".s.snap.partial-{dead}-1", f".d.snap.partial-{dead}-1", "new.snap"}


async def test_save_reports_success_once_the_file_is_in_place(tmp_path, baremetal_image, kek, monkeypatch):
    """After the rename the new snapshot is there: a failing directory sync is not a failed save."""
    fsync = os.fsync

    def failing_dir_fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(5, "Input/output error")
        fsync(fd)

    host, serial = new_host_and_key()
    path = tmp_path / "vm.snap"
    async with EncryptedMachine(host, ticking(baremetal_image), key_serial=serial, tenant="acme") as vm:
        await vm.console.wait_for(r"tick 1\n", patience(30))
        monkeypatch.setattr(os, "fsync", failing_dir_fsync)
        result = await save_snapshot(vm, path, kek)
        monkeypatch.undo()
        await vm.console.wait_for(TICK, patience(30))
    assert result.path == str(path)
    verify_snapshot(path, kek)
    assert [p.name for p in tmp_path.iterdir()] == ["vm.snap"]
