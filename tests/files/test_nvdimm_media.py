"""The NVDIMM media image: ciphertext only, digests that refuse tampering, atomic writes, offline
re-encryption checked against `cryptography`, one VM per image, bad paths refused in one line.
None of these start QEMU: every refusal comes before it."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from qemu_mktme.engine.xts import XtsKey
from qemu_mktme.errors import NvdimmError
from qemu_mktme.files import nvdimmfile
from qemu_mktme.files.nvdimmfile import (DIGEST_UNIT, HEADER_NBYTES, MediaLock, UnitDigests, read_header, read_media,
                                         rekey_media, verify_media, write_media)
from qemu_mktme.host.host import Host
from qemu_mktme.live.encrypted import EncryptedMachine
from qemu_mktme.live.migrate import migrate
from qemu_mktme.live.nvdimm import NvdimmMedia, describe, rekey
from qemu_mktme.live.snapshot import save_snapshot
from qemu_mktme.qemu.boot import BootSpec
from qemu_mktme.qemu.machine import MachineConfig
from reference import user_payload, xts_lines

SIZE = 2 << 20
HPA = 0x1_4000_0000


def _key(seed: int) -> tuple[bytes, bytes]:
    rng = np.random.default_rng(seed)
    return rng.bytes(16), rng.bytes(16)


def _media(path: Path, plain: bytes, key: tuple[bytes, bytes], hpa: int = HPA) -> bytes:
    """A media image of ``plain`` written as the DRAM view would be: reference XTS at ``hpa``."""
    cipher = xts_lines(*key, hpa, plain)
    write_media(path, [(0, np.frombuffer(cipher, np.uint8))], size=len(plain), hpa=hpa,
                algorithm="aes-xts-128", keyid=1, reason="shutdown")
    return cipher


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_image_holds_the_ciphertext_and_says_where(tmp_path: Path) -> None:
    plain = b"SECRET-PMEM-LINE" * (SIZE // 16)
    cipher = _media(tmp_path / "m", plain, _key(1))
    data = (tmp_path / "m").read_bytes()
    assert data[HEADER_NBYTES:] == cipher and b"SECRET-PMEM" not in data
    assert os.stat(tmp_path / "m").st_mode & 0o777 == 0o600
    header = verify_media(tmp_path / "m")
    assert (header.hpa, header.size, header.algorithm) == (HPA, SIZE, "aes-xts-128")
    assert header.describe()["hpa"] == hex(HPA)


@pytest.mark.parametrize("where", ["magic", "hpa", "padding", "body", "truncated", "extended"])
def test_tampered_images_are_refused(tmp_path: Path, where: str) -> None:
    path = tmp_path / "m"
    _media(path, bytes(SIZE), _key(2))
    data = bytearray(path.read_bytes())
    offsets = {"magic": 0, "hpa": 24, "padding": 3000, "body": HEADER_NBYTES + 12345}
    if where in offsets:
        data[offsets[where]] ^= 0x10
    elif where == "truncated":
        del data[-4096:]
    else:
        data += bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(NvdimmError) as err:
        verify_media(path)
    assert "\n" not in str(err.value)
    assert {"magic": "not a qemu-mktme NVDIMM media image", "hpa": "header fails its digest",
            "padding": "header fails its digest", "body": "fails its digest",
            "truncated": "truncated", "extended": "truncated or extended"}[where] in str(err.value)


def test_rekey_moves_an_image_to_another_hpa_and_key(tmp_path: Path) -> None:
    path, key, new_key = tmp_path / "m", _key(3), _key(4)
    plain = np.random.default_rng(5).bytes(SIZE)
    _media(path, plain, key)
    old, new = rekey_media(path, XtsKey(*key), to_hpa=HPA + (1 << 30))
    assert (old.hpa, new.hpa, new.reason) == (HPA, HPA + (1 << 30), "rekey")
    assert path.read_bytes()[HEADER_NBYTES:] == xts_lines(*key, HPA + (1 << 30), plain)
    rekey_media(path, XtsKey(*key), to_key=XtsKey(*new_key))
    assert path.read_bytes()[HEADER_NBYTES:] == xts_lines(*new_key, HPA + (1 << 30), plain)
    # a wrong key is not detected: the result is garbage, not an error
    rekey_media(path, XtsKey(*key), to_hpa=HPA)
    assert path.read_bytes()[HEADER_NBYTES:] != xts_lines(*new_key, HPA, plain)


def test_a_killed_writer_leaves_the_last_complete_image(tmp_path: Path) -> None:
    """kill -9 in the middle of writing a new image: the old one stays, whole and verified."""
    path = tmp_path / "m"
    _media(path, bytes(SIZE), _key(6))
    before = _sha(path)
    script = (
        "import sys, time, numpy as np\n"
        "from qemu_mktme.files.nvdimmfile import write_media\n"
        "def chunks():\n"
        "    yield 0, np.zeros(1 << 20, np.uint8)\n"
        "    print('half', flush=True); time.sleep(60)\n"
        "    yield 1 << 20, np.zeros(1 << 20, np.uint8)\n"
        f"write_media({str(path)!r}, chunks(), size={SIZE}, hpa=0, algorithm='x', keyid=1, reason='shutdown')\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "half"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _sha(path) == before and verify_media(path).hpa == HPA
    assert [p.name for p in tmp_path.iterdir() if ".partial-" in p.name]      # its temporary...
    _media(path, bytes(SIZE), _key(6))
    assert not [p.name for p in tmp_path.iterdir() if ".partial-" in p.name]  # ...gone at the next write


def test_one_vm_per_image(tmp_path: Path) -> None:
    lock = MediaLock(tmp_path / "m", "VM one")
    with pytest.raises(NvdimmError, match=r"in use by VM one \(pid \d+\): one VM per media image"):
        MediaLock(tmp_path / "m", "VM two")
    lock.release()
    MediaLock(tmp_path / "m", "VM two").release()


def test_media_option_parsing() -> None:
    assert NvdimmMedia.parse("/x/m,size=16M,hpa=0x200000000") == NvdimmMedia(Path("/x/m"), 16 << 20, 0x2_0000_0000)
    assert NvdimmMedia.parse("m") == NvdimmMedia(Path("m"))
    for bad, why in [("m,size=3M", "multiple of 2 MiB"), ("m,hpa=0x1000", "2 MiB aligned"),
                     ("m,colour=red", "expected PATH"), ("m,hpa=zz", "an address"), (",size=2M", "needs a file"),
                     ("m,size=2M,size=4M", "given twice"), ("m,size=99999999999G", "beyond any host physical"),
                     (f"m,size=2M,hpa={1 << 52:#x}", "beyond any host physical")]:
        with pytest.raises(ValueError, match=why):
            NvdimmMedia.parse(bad)


# --------------------------------------------------------------------------- refused before QEMU

def _launch(tmp_path: Path, *media: NvdimmMedia, strict: bool = False, ram_hpa: int | None = None) -> str:
    """Launch a VM with ``media``: the one-line error (QEMU is hidden from this test: reaching it fails)."""
    host = Host(keyid_bits=6)
    serial = host.keys.add("t:vm", user_payload(*_key(7)), tenant="t")
    kernel = tmp_path / "kernel"
    kernel.write_bytes(b"")
    config = MachineConfig(name="vm", boot=BootSpec(kernel, None, "", 0, "test"), memory="1G")
    vm = EncryptedMachine(host, config, key_serial=serial, tenant="t", nvdimms=media, nvdimm_strict=strict,
                          hpa=ram_hpa)

    async def go() -> str:
        with pytest.raises(NvdimmError) as err:
            await vm.launch()
        return str(err.value)
    line = asyncio.run(go())
    assert "\n" not in line and vm.pid is None, "refused after QEMU started"
    assert not host.guests and not host.hpa_ranges._ranges          # nothing left taken in the host
    assert not list(Path("/dev/shm").glob(f"qemu-mktme-vm-{os.getpid()}-*"))
    return line


def test_bad_media_paths_are_one_line_each_and_lose_nothing(tmp_path: Path) -> None:
    good = tmp_path / "good"
    _media(good, bytes(SIZE), _key(7))
    raw = tmp_path / "raw"
    raw.write_bytes(b"precious data" * 1000)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    short = tmp_path / "short"
    short.write_bytes(good.read_bytes()[:-8192])
    sums = {p: _sha(p) for p in (good, raw, short)}
    cases = [
        (NvdimmMedia(tmp_path), "is a directory"),
        (NvdimmMedia(fifo), "is a FIFO, not a regular file"),
        (NvdimmMedia(Path("/dev/zero"), SIZE), "is a device, not a regular file"),
        (NvdimmMedia(raw, SIZE), "is not a qemu-mktme NVDIMM media image"),
        (NvdimmMedia(short, SIZE), "truncated"),
        (NvdimmMedia(good, 2 * SIZE), "a module does not change size"),
        (NvdimmMedia(tmp_path / "new"), "give size= to create a new module"),
        (NvdimmMedia(tmp_path / "nodir" / "m", SIZE), "no directory"),
    ]
    for media, why in cases:
        assert why in _launch(tmp_path, media), media
    assert {p: _sha(p) for p in sums} == sums
    assert not Path("/dev/.zero.lock").exists()


def test_placement_refused_before_qemu_starts(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _media(a, bytes(SIZE), _key(7))
    line = _launch(tmp_path, NvdimmMedia(a, hpa=1 << 32))          # the VM's RAM goes to 4 GiB
    assert f"hpa={1 << 32:#x}+{SIZE:#x} overlaps the VM's RAM at {1 << 32:#x}" in line
    line = _launch(tmp_path, NvdimmMedia(a, hpa=HPA), NvdimmMedia(b, SIZE, hpa=HPA))
    assert f"overlaps NVDIMM media {a}" in line
    line = _launch(tmp_path, NvdimmMedia(a, hpa=HPA + (1 << 30)), strict=True)
    assert f"was written at HPA {HPA:#x}, attached at {HPA + (1 << 30):#x}: refused (--nvdimm-strict)" in line
    line = _launch(tmp_path, NvdimmMedia(a), NvdimmMedia(a))
    assert "in use by VM vm" in line


def test_two_vms_on_one_media(tmp_path: Path) -> None:
    a = tmp_path / "a"
    _media(a, bytes(SIZE), _key(7))
    before = _sha(a)
    lock = MediaLock(a, "VM other")                     # another VM runs on it
    try:
        assert "in use by VM other" in _launch(tmp_path, NvdimmMedia(a))
    finally:
        lock.release()
    assert _sha(a) == before


def test_reader_checks_the_body_digest_at_the_end(tmp_path: Path) -> None:
    path = tmp_path / "m"
    _media(path, bytes(SIZE), _key(8))
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert read_header(path).size == SIZE                 # the header alone is fine
    with pytest.raises(NvdimmError, match="fails its digest"), read_media(path, 1 << 20) as (_h, chunks):
        for _ in chunks:
            pass


def test_rekey_and_show_as_the_cli_does(tmp_path: Path) -> None:
    path, key = tmp_path / "m", _key(9)
    plain = np.random.default_rng(9).bytes(SIZE)
    _media(path, plain, key)
    shown = describe(path)
    assert shown["hpa"] == hex(HPA) and shown["digests"].startswith("ok") and key[0].hex() not in str(shown)
    spec = f"user:{key[0].hex()}:{key[1].hex()}"
    with pytest.raises(NvdimmError, match="tenant's key"):
        rekey(path, "cpu", to_hpa=2 * HPA)
    with pytest.raises(NvdimmError, match="--to-hpa ADDR and/or --to-key"):
        rekey(path, spec)
    with pytest.raises(NvdimmError, match="2 MiB aligned"):
        rekey(path, spec, to_hpa=HPA + 4096)
    lock = MediaLock(path, "VM busy")
    with pytest.raises(NvdimmError, match="in use by VM busy"):
        rekey(path, spec, to_hpa=2 * HPA)
    lock.release()
    new_key = _key(10)
    old, new = rekey(path, spec, to_hpa=2 * HPA, to_key_spec=f"user:{new_key[0].hex()}:{new_key[1].hex()}")
    assert (old.hpa, new.hpa) == (HPA, 2 * HPA)
    assert path.read_bytes()[HEADER_NBYTES:] == xts_lines(*new_key, 2 * HPA, plain)
    assert describe(path)["reason"] == "rekey"


def test_unchanged_units_are_not_rewritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that read the image gives its unit digests back: all the same, nothing is written;
    one unit changed, only it is written (in place, through the journal) and the result is exact;
    most units changed, a whole new image (the units so far copied from journal and old image)."""
    monkeypatch.setattr(nvdimmfile, "DIGEST_UNIT", 2 << 20)      # small units: a quick reference XTS
    unit = nvdimmfile.DIGEST_UNIT
    path, key, size = tmp_path / "m", _key(11), 3 * unit
    plain = bytearray(np.random.default_rng(11).bytes(size))
    _media(path, bytes(plain), key)
    digests = UnitDigests()
    with read_media(path, digests=digests) as (header, chunks):
        body = b"".join(c.tobytes() for _, c in chunks)
    inode = path.stat().st_ino

    def chunked(data: bytes):
        for off in range(0, len(data), unit):
            yield off, np.frombuffer(data[off:off + unit], np.uint8)
    fields = dict(size=size, hpa=header.hpa, algorithm=header.algorithm, keyid=header.keyid, reason="shutdown")
    assert write_media(path, chunked(body), previous=digests.units, **fields) is None
    assert path.stat().st_ino == inode
    assert write_media(path, chunked(body), previous=digests.units, **{**fields, "keyid": 2}) is not None
    inode = path.stat().st_ino                            # (another KeyID: a whole new image)
    plain[2 * unit + 5] ^= 0xFF                           # the guest changed the last unit
    cipher = xts_lines(*key, HPA, bytes(plain))
    fields["keyid"] = 2                                           # (as the file now says)
    units: list[bytes] = []
    assert write_media(path, chunked(cipher), previous=digests.units, units=units, **fields) is not None
    assert path.read_bytes()[HEADER_NBYTES:] == cipher and verify_media(path).hpa == HPA
    assert write_media(path, chunked(cipher), previous=units, **fields) is None     # the next flush: unchanged
    assert path.stat().st_ino == inode                    # (changed units: written in place)
    plain[5] ^= 0xFF                                      # most of the module changed: a whole new image
    plain[unit + 5] ^= 0xFF
    cipher = xts_lines(*key, HPA, bytes(plain))
    assert write_media(path, chunked(cipher), previous=units, **fields) is not None
    assert path.stat().st_ino != inode and not nvdimmfile.journal_path(path).exists()
    assert path.read_bytes()[HEADER_NBYTES:] == cipher and verify_media(path).hpa == HPA


def test_snapshot_and_migration_of_a_vm_with_an_nvdimm_are_refused(tmp_path: Path) -> None:
    host = Host(keyid_bits=6)
    serial = host.keys.add("t:vm", user_payload(*_key(12)), tenant="t")
    vm = EncryptedMachine(host, MachineConfig(name="vm"), key_serial=serial, tenant="t",
                          nvdimms=[NvdimmMedia(tmp_path / "m", SIZE)])

    async def go() -> list[str]:
        lines = []
        for attempt in (lambda: save_snapshot(vm, tmp_path / "snap", bytes(range(32))),
                        lambda: migrate(vm, Host(keyid_bits=6), tls=None, insecure=True)):
            with pytest.raises(NvdimmError) as err:
                await attempt()
            lines.append(str(err.value))
        return lines
    snap, migration = asyncio.run(go())
    assert snap.startswith("vm: a snapshot of a VM with an NVDIMM is refused") and "\n" not in snap
    assert migration.startswith("vm: live migration of a VM with an NVDIMM is refused") and "nvdimm rekey" in migration
    assert not (tmp_path / "snap").exists() and not (tmp_path / "m").exists()


def test_a_symlinked_image_stays_a_symlink(tmp_path: Path) -> None:
    real, link, key = tmp_path / "real.img", tmp_path / "link.img", _key(13)
    plain = np.random.default_rng(13).bytes(SIZE)
    _media(real, plain, key)
    link.symlink_to(real)
    rekey(link, f"user:{key[0].hex()}:{key[1].hex()}", to_hpa=2 * HPA)
    assert link.is_symlink() and read_header(real).hpa == 2 * HPA
    assert real.read_bytes()[HEADER_NBYTES:] == xts_lines(*key, 2 * HPA, plain)
    (tmp_path / "to-zero").symlink_to("/dev/zero")
    assert "is a device" in _launch(tmp_path, NvdimmMedia(tmp_path / "to-zero", SIZE))


def test_unit_digests_the_same_on_threads() -> None:
    from concurrent.futures import ThreadPoolExecutor
    data = memoryview(np.random.default_rng(14).bytes(3 * DIGEST_UNIT + (2 << 20)))
    one, two = UnitDigests(), UnitDigests()
    one.update(data, final=True)
    with ThreadPoolExecutor(2) as pool:
        two.update(data[:2 * DIGEST_UNIT + 4096], pool=pool)
        two.update(data[2 * DIGEST_UNIT + 4096:], final=True, pool=pool)
    assert one.units == two.units and len(one.units) == 4 and one.digest() == two.digest()


_KILLER = """
import os, signal, sys
import numpy as np
from qemu_mktme.files import nvdimmfile
from qemu_mktme.files.nvdimmfile import UnitDigests, read_media, write_media
nvdimmfile.DIGEST_UNIT = {unit}
path, new = {path!r}, open({new!r}, 'rb').read()
digests = UnitDigests()
with read_media(path, digests=digests) as (header, chunks):
    for _ in chunks:
        pass
calls, kill_at = [0], {kill_at}
def killing(name, real):
    def call(*args):
        calls[0] += 1
        if calls[0] == kill_at:
            if name in ('pwrite', 'copy_file_range'):      # a torn write: half of it, then the end
                a = list(args)
                if name == 'pwrite':
                    a[1] = memoryview(a[1]).cast('B')[:max(len(memoryview(a[1]).cast('B')) // 2, 1)]
                else:
                    a[2] = max(a[2] // 2, 1)
                real(*a)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args)
    return call
for name in ('pwrite', 'write', 'fsync', 'unlink', 'copy_file_range', 'rename', 'replace'):
    setattr(os, name, killing(name, getattr(os, name)))
chunks = [(o, np.frombuffer(new[o:o + {unit}], np.uint8)) for o in range(0, len(new), {unit})]
write_media(path, chunks, size=header.size, hpa=header.hpa, algorithm=header.algorithm, keyid=header.keyid,
            reason='shutdown', previous=digests.units)
print(calls[0], flush=True)
"""


def test_a_writer_killed_at_every_step_of_the_journal_leaves_a_complete_image(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-place write of changed units (journal, fsync, in place, fsync, journal dropped):
    kill -9 at each of its writes, fsyncs and unlinks (a write torn in half where it is one):
    the next opener finds the old image before the journal was complete, the new one after,
    whole and verified, and never anything else; no journal is left behind."""
    unit = 2 << 20
    monkeypatch.setattr(nvdimmfile, "DIGEST_UNIT", unit)          # as in the writer's process
    path, new_path = tmp_path / "m", tmp_path / "new-body"
    rng = np.random.default_rng(21)
    old = rng.bytes(4 * unit)
    new = bytearray(old)
    new[unit + 7: unit + 4096] = rng.bytes(4089)                  # units 1 and 3 change
    new[3 * unit:] = rng.bytes(unit)
    new_path.write_bytes(new)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}

    def run(kill_at: int) -> subprocess.CompletedProcess[str]:
        write_media(path, [(0, np.frombuffer(old, np.uint8))], size=len(old), hpa=HPA, algorithm="aes-xts-128",
                    keyid=1, reason="shutdown")
        script = _KILLER.format(unit=unit, path=str(path), new=str(new_path), kill_at=kill_at)
        return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)

    full = run(0)
    assert full.returncode == 0, full.stderr
    steps = int(full.stdout)
    assert path.read_bytes()[HEADER_NBYTES:] == new and verify_media(path).reason == "shutdown"
    assert not nvdimmfile.journal_path(path).exists()
    assert steps >= 10                                            # journal writes, fsyncs, in place, unlink
    outcomes = []
    for kill_at in range(1, steps + 1):
        proc = run(kill_at)
        assert proc.returncode == -signal.SIGKILL, (kill_at, proc.stderr)
        lock = MediaLock(path, "test")
        try:
            found = nvdimmfile.recover_media(path)
        finally:
            lock.release()
        body = path.read_bytes()[HEADER_NBYTES:]
        assert body in (old, new), kill_at
        verify_media(path)                                        # whole: header and body agree
        assert not nvdimmfile.journal_path(path).exists()
        outcomes.append(("new" if body == new else "old", found))
    states = [state for state, _ in outcomes]
    first_new = states.index("new")
    assert states == ["old"] * first_new + ["new"] * (steps - first_new), outcomes   # one switch, never back
    assert 2 <= first_new < steps - 2                             # killed before and after the journal was complete
    assert {found for _, found in outcomes[first_new:]} <= {"replayed", None}
    assert "discarded" in {found for _, found in outcomes[:first_new]}


def test_a_journal_is_replayed_only_when_complete_and_for_this_image(tmp_path: Path) -> None:
    """A journal with a flipped bit (incomplete, or tampered) is dropped, the image untouched; a
    complete journal for another version of the image too; a complete one whose applying failed
    is kept; `show` and the next write finish it first."""
    from qemu_mktme.files import journal as jmod
    path, other = tmp_path / "m", tmp_path / "n"
    _media(path, bytes(SIZE), _key(22))
    _media(other, b"\x5a" * SIZE, _key(22))
    before, after = path.read_bytes(), other.read_bytes()

    def journal(old_head: bytes) -> Path:
        """A complete journal from ``before`` to ``after``, left as a killed writer leaves it."""
        writer = jmod.JournalWriter(path, old_head)
        writer.add(HEADER_NBYTES, memoryview(after[HEADER_NBYTES:]))
        real = jmod._apply
        jmod._apply = lambda *a: (_ for _ in ()).throw(OSError("killed"))      # type: ignore[assignment]
        try:
            with pytest.raises(OSError, match="killed"):
                writer.commit(after[:HEADER_NBYTES])
        finally:
            jmod._apply = real
            writer.abandon()                                      # (a complete journal is kept)
        return jmod.journal_path(path)

    j = journal(before[:HEADER_NBYTES])
    data = bytearray(j.read_bytes())
    data[100] ^= 1
    j.write_bytes(bytes(data))
    assert jmod.recover(path) == "discarded" and path.read_bytes() == before and not j.exists()
    journal(b"another image's header")
    assert jmod.recover(path) == "discarded" and path.read_bytes() == before
    journal(before[:HEADER_NBYTES])
    path.write_bytes(before[:HEADER_NBYTES] + after[HEADER_NBYTES:])      # torn: the body in place, not the header
    with pytest.raises(NvdimmError, match="is being written"):    # a reader that does not recover says why
        verify_media(path)
    assert describe(path)["digests"] == "ok (header and body)"    # show completes it first
    assert path.read_bytes() == after and not j.exists() and jmod.recover(path) is None
    path.write_bytes(before)
    journal(before[:HEADER_NBYTES])                               # a write that failed after its journal...
    cipher = _media(path, b"\x11" * SIZE, _key(22))              # ...is finished before the next one
    assert not j.exists() and path.read_bytes()[HEADER_NBYTES:] == cipher
    os.mkfifo(j)                                                  # not a journal of ours: one line, nothing lost
    with pytest.raises(NvdimmError, match="not a regular file of this user: not touched"):
        describe(path)
    with pytest.raises(NvdimmError, match="not a regular file"):
        _media(path, bytes(SIZE), _key(22))
    assert path.read_bytes()[HEADER_NBYTES:] == cipher and j.exists()


def test_media_locks_leave_nothing_beside_the_media(tmp_path: Path) -> None:
    """The lock lives in the user's runtime directory and goes at release, for a media image that
    exists and for one never created (a launch refused before QEMU); a file of the user's that
    looks like an old lock beside the image is not touched."""
    good = tmp_path / "good"
    _media(good, bytes(SIZE), _key(7))
    mine = tmp_path / ".good.lock"
    mine.write_bytes(b"the user's own file")
    before = sorted(p.name for p in tmp_path.iterdir())
    for path in (good, tmp_path / "never-created"):
        lock = MediaLock(path, "VM one")
        assert nvdimmfile.lock_path(path).parent == nvdimmfile.runtime.private_parent()
        assert "VM one" in nvdimmfile.lock_path(path).read_text()
        lock.release()
        assert not nvdimmfile.lock_path(path).exists()
    assert "give size= to create a new module" in _launch(tmp_path, NvdimmMedia(tmp_path / "new"))
    assert "overlaps the VM's RAM" in _launch(tmp_path, NvdimmMedia(tmp_path / "new2", SIZE, hpa=1 << 32))
    assert sorted(p.name for p in tmp_path.iterdir()) == before + ["kernel"]
    assert mine.read_bytes() == b"the user's own file"
    for name in ("new", "new2"):
        assert not nvdimmfile.lock_path(tmp_path / name).exists()
    assert nvdimmfile.lock_path(tmp_path / "sub" / ".." / "good") == nvdimmfile.lock_path(good)   # one lock per image


def test_removing_a_lock_never_lets_two_holders_in(tmp_path: Path) -> None:
    """Four threads take and release one image's lock 300 times each (each release removes the
    file): never two holders at once, and nothing left."""
    import threading
    inside, most, errors = [0], [0], []
    guard = threading.Lock()

    def worker() -> None:
        for _ in range(300):
            try:
                lock = MediaLock(tmp_path / "m", "VM t")
            except NvdimmError as err:
                if "in use by" not in str(err):
                    errors.append(err)
                continue
            with guard:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            with guard:
                inside[0] -= 1
            lock.release()
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and most[0] == 1
    assert not nvdimmfile.lock_path(tmp_path / "m").exists() and list(tmp_path.iterdir()) == []


def test_a_comma_in_a_media_path_is_written_twice() -> None:
    assert NvdimmMedia.parse("/x/a,,b,size=2M") == NvdimmMedia(Path("/x/a,b"), 2 << 20)
    assert NvdimmMedia.parse("/x/a,,,hpa=0x200000") == NvdimmMedia(Path("/x/a,"), None, 0x200000)
    assert NvdimmMedia.parse("/x/a,,b") == NvdimmMedia(Path("/x/a,b"))
    with pytest.raises(ValueError, match="unknown nvdimm option 'b'"):
        NvdimmMedia.parse("/x/a,b")


def test_rekey_refuses_an_hpa_past_the_keyid_reduced_space(tmp_path: Path) -> None:
    from qemu_mktme.live import nvdimm
    path, key = tmp_path / "m", _key(11)
    _media(path, bytes(SIZE), key)
    before = _sha(path)
    spec = f"user:{key[0].hex()}:{key[1].hex()}"
    assert Host().platform.maxphyaddr == nvdimm.MAXPHYADDR
    with pytest.raises(NvdimmError, match=r"would end at 0x10000200000, past the host's physical addresses "
                                          r"\(below 0x10000000000: MAXPHYADDR 46 minus 6 KeyID bits\)"):
        rekey(path, spec, to_hpa=1 << 40)
    with pytest.raises(NvdimmError, match="MAXPHYADDR 46 minus 4 KeyID bits"):
        rekey(path, spec, to_hpa=(1 << 42) - SIZE + (2 << 20), keyid_bits=4)
    assert _sha(path) == before
    old, new = rekey(path, spec, to_hpa=(1 << 40) - SIZE)           # the last place that fits
    assert new.hpa == (1 << 40) - SIZE


def test_a_media_lock_survives_its_holder_killed_and_odd_files_at_its_place(tmp_path: Path) -> None:
    """A holder killed with -9 leaves its file unlocked: the next one takes it and removes it. A
    FIFO or a symlink at the lock's place is one line, and stays."""
    media = tmp_path / "m"
    script = ("import sys, time\nfrom qemu_mktme.files.nvdimmfile import MediaLock\n"
              f"lock = MediaLock({str(media)!r}, 'VM killed')\nprint('held', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    with pytest.raises(NvdimmError, match=r"in use by VM killed \(pid \d+\)"):
        MediaLock(media, "VM two")
    proc.kill()
    proc.wait()
    assert nvdimmfile.lock_path(media).exists()                      # left by the killed holder...
    MediaLock(media, "VM two").release()
    assert not nvdimmfile.lock_path(media).exists()                  # ...taken and removed by the next
    place = nvdimmfile.lock_path(media)
    for make, why in ((os.mkfifo, "is not a regular file"), (lambda p: os.symlink(tmp_path / "elsewhere", p),
                                                             "cannot open its lock")):
        make(place)
        try:
            with pytest.raises(NvdimmError, match=why) as refused:
                MediaLock(media, "VM three")
            assert "\n" not in str(refused.value) and os.path.lexists(place)
        finally:
            os.unlink(place)
    assert not (tmp_path / "elsewhere").exists()
