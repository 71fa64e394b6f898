"""Encrypted snapshots of running MKTME guests: save, verify, restore (format: :mod:`.snapfile`).

Save pauses the VM, has QEMU write its **device state** into a pipe through migration with the
``x-ignore-shared`` capability (shared guest RAM stays out of the stream; the stream is a few
hundred KiB and never touches a file unsealed), then stores guest RAM as its DRAM image (ciphertext
under the VM key, tweak = HPA) sealed again under a per-snapshot key, seals the device state, writes
everything to a temporary file in the target's directory, resumes the VM and renames the file over
the target: a save killed at any point leaves the previous snapshot intact, and once the rename
has happened the save reports success. Each save first removes the temporary files of earlier
saves in that directory whose writer is provably dead (``kill -9``).

Restore opens the file once and authenticates its header and manifest, the device state and the
wrapped key before starting QEMU, checks that the kernel/initrd are the ones saved, starts a
fresh QEMU with ``-incoming defer`` bound to the host with the tenant key unwrapped from the
snapshot, then reads every RAM chunk **once**, authenticates it in that buffer and hands that
buffer to the host model, which writes it back into DRAM (at the saved HPA) or re-keys it (elsewhere). Any failure tears the new QEMU down before a vCPU has run: the guest only
ever runs on RAM that authenticated. The device state is loaded last and the guest carries on.
The kernel command line, sealed in the snapshot because it may hold secrets, reaches the new
QEMU through a pipe it reads with ``-readconfig``, not through its argv (``ps``), as on every launch.

Only VMs with a tenant (``user``) key can be saved: a CPU-generated key never leaves the CPU,
so nothing could ever decrypt the image.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from ..engine.xts import XtsKey
from ..errors import IntegrityError, QemuError, SnapshotError
from ..host.host import Host
from ..keymaterial import algorithm_name
from .encrypted import EncryptedMachine
from .launch import launch_machine
from ..files import Progress
from ..files.atomic import atomic_output, check_target, starts_with
from ..files.snapfile import MAGIC, Writer, open_snapshot
from ..keymaterial import check_kek
from ..images import sha256_file
from ..qemu.boot import BootSpec
from ..qemu.machine import MachineConfig, VmState
from ..trace.tracer import Tracer

log = logging.getLogger(__name__)

CHUNK_NBYTES = 1 << 20
MIGRATION_TIMEOUT = 300.0
UNTHROTTLED = 1 << 40
"""``max-bandwidth`` (bytes/s) for saves: in effect unlimited."""


@dataclass(frozen=True)
class SaveResult:
    path: str
    chunks: int
    stored_nbytes: int
    skipped_nbytes: int
    device_state_nbytes: int
    seconds: float


async def _save_device_state(vm: EncryptedMachine) -> bytes:
    """QEMU's device state (x-ignore-shared: without guest RAM), through a pipe: CPU registers
    and device memory are guest secrets too, so they never touch a file in plaintext."""
    r, w = os.pipe()
    try:
        await vm.qmp.pass_fd(w, "mktme-snap")
        os.close(w)
        w = -1
        reader = asyncio.create_task(asyncio.to_thread(_read_all, r))
        await _set_ignore_shared(vm)
        # QEMU 7.2 throttles migration to 128 MiB/s by default; a save to a local pipe is not
        # a live migration over a shared link (virsh save lifts the limit the same way)
        await vm.qmp.execute("migrate-set-parameters", {"max-bandwidth": UNTHROTTLED})
        await vm.qmp.execute("migrate", {"uri": "fd:mktme-snap"})
        await _migration_done(vm, "device-state migration")
        return await reader
    finally:
        for fd in (r, w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


async def _load_device_state(vm: EncryptedMachine, state: bytes) -> None:
    r, w = os.pipe()
    try:
        await vm.qmp.pass_fd(r, "mktme-snap")
        os.close(r)
        r = -1
        await _set_ignore_shared(vm)
        await vm.qmp.execute("migrate-incoming", {"uri": "fd:mktme-snap"})
        await asyncio.to_thread(_write_all, w, state)
        os.close(w)
        w = -1
        await _migration_done(vm, "device-state load")
    finally:
        for fd in (r, w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


def _read_all(fd: int) -> bytes:
    parts = []
    while chunk := os.read(fd, 1 << 20):
        parts.append(chunk)
    return b"".join(parts)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


async def _migration_done(vm: EncryptedMachine, what: str) -> None:
    deadline = time.monotonic() + MIGRATION_TIMEOUT
    while True:
        info = await vm.qmp.execute("query-migrate")
        status = info.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise SnapshotError(f"{vm.name}: QEMU {what} {status}: {info.get('error-desc', '')}".rstrip(": "))
        if time.monotonic() > deadline:
            raise SnapshotError(f"{vm.name}: QEMU {what} did not finish in {MIGRATION_TIMEOUT:g} s")
        await asyncio.sleep(0.01)


async def _set_ignore_shared(vm: EncryptedMachine) -> None:
    await vm.qmp.execute("migrate-set-capabilities",
                         {"capabilities": [{"capability": "x-ignore-shared", "state": True}]})


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, identity: tuple[int, int, int, int]) -> str:
    return sha256_file(Path(path))


def _digest(path: str | os.PathLike[str]) -> str:
    """sha256 of a boot file, hashed again only when its identity (device, inode, size, mtime)
    changes: every save records it, and an initrd is tens of MiB."""
    st = os.stat(path)
    return _sha256_of(str(path), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))


def _boot_record(boot: BootSpec | None) -> dict[str, Any] | None:
    if boot is None:
        return None
    return {"kernel": str(boot.kernel), "kernel_sha256": _digest(boot.kernel),
            "initrd": str(boot.initrd) if boot.initrd else None,
            "initrd_sha256": _digest(boot.initrd) if boot.initrd else None,
            "append": boot.append, "image": boot.image, "min_memory": boot.min_memory}


async def save_snapshot(vm: EncryptedMachine, path: str | os.PathLike[str], kek: bytes, *,
                        progress: Progress | None = None) -> SaveResult:
    """Save ``vm`` to ``path`` (replacing an existing snapshot atomically). See the module doc."""
    started = time.monotonic()
    check_kek(kek)
    vm.refuse_nvdimm("a snapshot")
    target = check_target(Path(path).absolute(), force=True)
    payload = vm.host.keys.payload(vm.key_serial, vm.tenant)
    if payload.type.value != "user" or not payload.key or not payload.tweak:
        raise SnapshotError(f"{vm.name}: only VMs with a tenant (user) key can be saved; a "
                            f"{payload.type.value} key never leaves the CPU")
    if not vm.owned:
        raise SnapshotError(f"{vm.name}: an attached VM cannot be saved: a restore starts QEMU with "
                            "qemu-mktme's own command line, not the one that started this VM (dump it instead)")
    if vm.host.platform.mitigation == "freshness":
        raise SnapshotError(f"{vm.name}: a freshness platform's DRAM holds each line under a version kept on "
                            "the die (as SGX's memory encryption engine): its DRAM image cannot be restored")
    if vm.config.disks:
        raise SnapshotError(f"{vm.name}: a VM with disks cannot be saved yet: a snapshot holds RAM and "
                            "device state, not the disks' contents, and a restore beside a changed disk "
                            "would corrupt it")
    was_running = vm.state is VmState.RUNNING
    if not was_running and (await vm.qmp.execute("query-status"))["status"] == "postmigrate":
        raise SnapshotError(f"{vm.name}: QEMU will not migrate a VM again while it stays paused after a "
                            "save (its state is 'postmigrate'); resume it, then save")
    try:
        if was_running:
            await vm.pause()
        device_state = await _save_device_state(vm)
        manifest = await _manifest(vm, payload, was_running)
        with atomic_output(target, force=True, what="snapshot", proof=starts_with(MAGIC)) as f:
            writer = Writer(f, kek)
            stored = _write_chunks(writer, vm, progress)
            writer.finish(manifest, device_state, payload.key + payload.tweak)
            if was_running:                     # the guest runs on while the file is synced and renamed
                was_running = False
                await _resume(vm)
    finally:
        if was_running:
            await _resume(vm)
    return SaveResult(str(target), len(writer.chunks), stored, vm.ram.size - stored, len(device_state),
                      time.monotonic() - started)


async def _resume(vm: EncryptedMachine) -> None:
    if vm.state is not VmState.EXITED:
        with contextlib.suppress(QemuError):
            await vm.resume()


async def _manifest(vm: EncryptedMachine, payload: Any, was_running: bool) -> dict[str, Any]:
    """What the snapshot says of the VM: enough to start the same machine again (all sealed)."""
    qom_type = await vm.qmp.execute("qom-get", {"path": "/machine", "property": "type"})
    guest, ram = vm.guest, vm.ram
    return {
        "format": "qemu-mktme-snapshot",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "vm": {"name": vm.name, "tenant": vm.tenant, "memory": ram.size, "cpus": vm.config.cpus,
               "machine": str(qom_type).removesuffix("-machine"),     # pc-q35-7.2-machine -> pc-q35-7.2
               "cpu": vm.config.cpu, "accel": vm.accel,
               "qemu_version": vm.qemu.version_str if vm.qemu else None, "was_running": was_running},
        "ram": {"hpa": hex(guest.hpa_base), "chunk_nbytes": CHUNK_NBYTES,
                "ranges": [[r.gpa, r.size, r.offset] for r in guest.ranges]},
        "key": {"type": "user", "algorithm": algorithm_name(payload.algorithm)},
        "boot": _boot_record(vm.config.boot),
    }


def _write_chunks(writer: Writer, vm: EncryptedMachine, progress: Progress | None) -> int:
    """The DRAM image of every chunk of RAM that holds data (holes and zero chunks are not stored);
    the bytes stored."""
    stored = 0
    for offset, dram in vm.guest.iter_dram(chunk_nbytes=CHUNK_NBYTES, skip_zero=True):
        writer.add_chunk(offset, dram.data)
        stored += dram.size
        if progress:
            progress(offset + dram.size, vm.ram.size)
    if progress:
        progress(vm.ram.size, vm.ram.size)
    return stored


def verify_snapshot(path: str | os.PathLike[str], kek: bytes) -> dict[str, Any]:
    """Authenticate everything in a snapshot without restoring it; its manifest (no key, no boot
    record: a kernel command line may hold secrets)."""
    with open_snapshot(path, kek) as snap:
        snap.verify_all()
        return {k: v for k, v in snap.manifest.items() if k not in ("wrapped_key", "boot")}


async def restore_snapshot(host: Host, path: str | os.PathLike[str], kek: bytes, *, name: str | None = None,
                           memory: int | None = None, qemu: str | None = None,
                           progress: Progress | None = None, tracer: Tracer | None = None) -> EncryptedMachine:
    """Restore a snapshot into a fresh QEMU bound to ``host``; the machine returned is running
    (or paused, if it was paused at save) and owned by the caller (``async with`` it).

    ``tracer`` (a fresh :class:`Tracer`) is loaded into the new QEMU and started before the guest
    runs again. Raises ``IntegrityError`` if any part fails authentication (wrong KEK included):
    before QEMU starts for the header, manifest, device state and key, and for a RAM chunk with
    the new QEMU torn down before any vCPU ran; ``SnapshotError`` if the kernel/initrd changed or
    ``memory`` differs from the snapshot's, and the launch errors of :class:`Machine`.
    """
    with open_snapshot(path, kek) as snap:
        m = snap.manifest
        if m.get("format") != "qemu-mktme-snapshot":
            raise IntegrityError(f"{snap.path}: not a snapshot manifest")
        vmi = m["vm"]
        if memory is not None and memory != int(vmi["memory"]):
            raise SnapshotError(f"{snap.path} holds a {int(vmi['memory']) >> 20} MiB guest; "
                                f"cannot restore into {memory >> 20} MiB")
        device_state = snap.device_state()
        data_key, tweak_key = snap.vm_key()
        boot = _check_boot(m.get("boot"))
        alg = m["key"]["algorithm"]
        payload = f"type=user algorithm={alg} key={data_key.hex()} tweak={tweak_key.hex()}"
        vm_name = name or vmi["name"]
        config = MachineConfig(boot=boot, memory=int(vmi["memory"]), cpus=int(vmi["cpus"]), machine=vmi["machine"],
                               cpu=vmi.get("cpu"), name=vm_name, incoming=True, qemu=qemu,
                               accel=vmi.get("accel") or "tcg")
        serial = host.keys.add(f"{vmi['tenant']}:{vm_name}:restored", payload, tenant=vmi["tenant"])
        saved_hpa = int(m["ram"]["hpa"], 16)
        at_saved_hpa = host.hpa_ranges.is_free(saved_hpa, int(vmi["memory"]))
        vm = await launch_machine(config, tracer=tracer, machine=functools.partial(
            EncryptedMachine, host, key_serial=serial, tenant=vmi["tenant"], revoke_key_on_close=True,
            hpa=saved_hpa if at_saved_hpa else None))
        try:
            _write_ram(snap, vm, XtsKey(data_key, tweak_key), saved_hpa, progress)
            await _load_device_state(vm, device_state)
            if vmi.get("was_running", True):
                await vm.resume()
        except BaseException:
            await vm.close()
            raise
    return vm


def _check_boot(rec: dict[str, Any] | None) -> BootSpec | None:
    if rec is None:
        return None
    for kind in ("kernel", "initrd"):
        if rec.get(kind) is None:
            continue
        p = Path(rec[kind])
        if not p.is_file():
            raise SnapshotError(f"the snapshot's {kind} {p} is gone; restore needs the same guest image")
        if sha256_file(p) != rec[f"{kind}_sha256"]:
            raise SnapshotError(f"the snapshot's {kind} {p} has changed since the save; restore needs the "
                                "same guest image")
    return BootSpec(Path(rec["kernel"]), Path(rec["initrd"]) if rec.get("initrd") else None,
                    rec.get("append", ""), int(rec.get("min_memory", 0)), rec.get("image"))


def _write_ram(snap: Any, vm: EncryptedMachine, key: XtsKey, saved_hpa: int, progress: Progress | None) -> None:
    """Read each stored chunk once, authenticate it, and hand that same buffer (the DRAM image at
    the saved HPA) to the host model, which brings it into the new VM's memory. The vCPUs are
    held: on ``IntegrityError`` the caller tears the VM down and no guest code has run on it."""
    if vm.ram.size != int(snap.manifest["vm"]["memory"]):
        raise SnapshotError(f"{vm.name}: the new QEMU's RAM is {vm.ram.size} bytes, the snapshot's "
                            f"{snap.manifest['vm']['memory']}")
    total = len(snap.chunks)
    for c, dram in snap.iter_chunks():
        vm.guest.load_dram_image(c.offset, dram, saved_hpa + c.offset, key)
        if progress:
            progress(c.index + 1, total)


def snapshot_summary(path: str | os.PathLike[str], kek: bytes) -> dict[str, Any]:
    """What ``qemu-mktme snapshot verify`` prints: sizes and layout, no key material."""
    m = verify_snapshot(path, kek)
    stored = sum(int(c[1]) for c in m["chunks"])
    return {"path": os.fspath(path), "vm": m["vm"], "key": m["key"], "created": m["created"],
            "chunks": len(m["chunks"]), "stored_nbytes": stored, "file_nbytes": os.path.getsize(path),
            "device_state_nbytes": m["device_state"]["length"], "snapshot_id": m["snapshot_id"],
            "algorithm": m["key"]["algorithm"], "format_version": m["version"]}
