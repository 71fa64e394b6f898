"""Encrypted snapshots of running MKTME guests: save, verify, restore (format: :mod:`.snapfile`).

Save pauses the VM, has QEMU write its **device state** into a pipe through migration with the
``x-ignore-shared`` capability (shared guest RAM stays out of the stream; the stream is a few
hundred KiB and never touches a file unsealed), then stores guest RAM as its DRAM image (ciphertext under the VM key, tweak =
HPA), seals the device state, writes everything to a temporary file in the target's directory
and renames it over the target: a save killed at any point leaves the previous snapshot intact.
The VM then resumes.

Restore authenticates the manifest, every RAM chunk and the device state **before** starting
QEMU, checks that the kernel/initrd are the ones saved, starts a fresh QEMU with
``-incoming defer`` bound to the host with the tenant key unwrapped from the snapshot, decrypts
RAM into it, loads the device state and continues: the guest carries on where it was.

Only VMs with a tenant (``user``) key can be saved: a CPU-generated key never leaves the CPU,
so nothing could ever decrypt the image.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.xts import XtsKey, decrypt_lines
from ..errors import IntegrityError, QemuError, SnapshotError
from ..host.host import Host
from ..host.payload import algorithm_name
from .encrypted import EncryptedMachine
from ..images import sha256_file
from ..qemu.boot import BootSpec
from ..qemu.machine import MachineConfig, VmState
from ..files.snapfile import Writer, open_snapshot
from ..trace.tracer import Tracer

log = logging.getLogger(__name__)

CHUNK_NBYTES = 1 << 20
MIGRATION_TIMEOUT = 300.0
Progress = Callable[[int, int], None]


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


def _boot_record(boot: BootSpec | None) -> dict[str, Any] | None:
    if boot is None:
        return None
    return {"kernel": str(boot.kernel), "kernel_sha256": sha256_file(Path(boot.kernel)),
            "initrd": str(boot.initrd) if boot.initrd else None,
            "initrd_sha256": sha256_file(Path(boot.initrd)) if boot.initrd else None,
            "append": boot.append, "image": boot.image, "min_memory": boot.min_memory}


def _cleanup_partials(target: Path) -> None:
    """Remove temporary files of earlier saves whose process is gone (e.g. killed with -9)."""
    for p in target.parent.glob(f".{target.name}.partial-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            with contextlib.suppress(OSError):
                p.unlink()


async def save_snapshot(vm: EncryptedMachine, path: str | os.PathLike[str], kek: bytes, *,
                        progress: Progress | None = None) -> SaveResult:
    """Save ``vm`` to ``path`` (replacing an existing snapshot atomically). See the module doc."""
    started = time.monotonic()
    target = Path(path).absolute()
    payload = vm.host.keys.payload(vm.key_serial, vm.tenant)
    if payload.type.value != "user" or not payload.key or not payload.tweak:
        raise SnapshotError(f"{vm.name}: only VMs with a tenant (user) key can be saved; a "
                            f"{payload.type.value} key never leaves the CPU")
    if not target.parent.is_dir():
        raise SnapshotError(f"{target.parent} is not a directory")
    _cleanup_partials(target)
    was_running = vm.state is VmState.RUNNING
    guest, ram = vm.guest, vm.ram
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        if was_running:
            await vm.pause()
        device_state = await _save_device_state(vm)
        qom_type = await vm.qmp.execute("qom-get", {"path": "/machine", "property": "type"})
        machine_type = str(qom_type).removesuffix("-machine")     # pc-q35-7.2-machine -> pc-q35-7.2
        stored = skipped = 0
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            writer = Writer(f, kek)
            buf = np.empty(CHUNK_NBYTES, np.uint8)
            backend = np.frombuffer(ram.backend, np.uint8)
            extents = ram.data_extents(0, ram.size)          # one pass: SEEK_DATA is O(data) per call
            for off in range(0, ram.size, CHUNK_NBYTES):
                n = min(CHUNK_NBYTES, ram.size - off)
                if not _overlaps(extents, off, off + n) or not backend[off:off + n].any():
                    skipped += n                                  # hole or all zero: not stored
                else:
                    writer.add_chunk(off, memoryview(guest.dram_array(off, n, out=buf[:n])))
                    stored += n
                if progress:
                    progress(off + n, ram.size)
            manifest = {
                "format": "qemu-mktme-snapshot",
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "vm": {"name": vm.name, "tenant": vm.tenant, "memory": ram.size, "cpus": vm.config.cpus,
                       "machine": machine_type, "cpu": vm.config.cpu, "accel": vm.accel,
                       "qemu_version": vm.qemu.version_str if vm.qemu else None,
                       "was_running": was_running},
                "ram": {"hpa": hex(guest.hpa_base), "chunk_nbytes": CHUNK_NBYTES,
                        "ranges": [[r.gpa, r.size, r.offset] for r in guest.ranges]},
                "key": {"type": "user", "algorithm": algorithm_name(payload.algorithm)},
            }
            writer.finish(manifest, device_state, payload.key + payload.tweak,
                          private={"boot": _boot_record(vm.config.boot)})
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, target)
        dfd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as err:
        raise SnapshotError(f"cannot write snapshot {target}: {err.strerror or err}") from err
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        if was_running and vm.state is not VmState.EXITED:
            with contextlib.suppress(QemuError):
                await vm.resume()
    return SaveResult(str(target), len(writer.chunks), stored, skipped, len(device_state), time.monotonic() - started)


def _overlaps(extents: list[tuple[int, int]], start: int, end: int) -> bool:
    i = bisect.bisect_right(extents, (start, 1 << 62)) - 1
    return any(s < end and e > start for s, e in extents[max(i, 0):i + 2])


def verify_snapshot(path: str | os.PathLike[str], kek: bytes) -> dict[str, Any]:
    """Authenticate everything in a snapshot without restoring it; its manifest (no key)."""
    snap = open_snapshot(path, kek)
    with open(snap.path, "rb") as f:
        snap.verify_chunks(f)
        snap.device_state(f)
    snap.vm_key()
    snap.private()
    return {k: v for k, v in snap.manifest.items() if k not in ("wrapped_key", "private")}


async def restore_snapshot(host: Host, path: str | os.PathLike[str], kek: bytes, *, name: str | None = None,
                           memory: int | None = None, qemu: str | None = None,
                           progress: Progress | None = None, tracer: Tracer | None = None) -> EncryptedMachine:
    """Restore a snapshot into a fresh QEMU bound to ``host``; the machine returned is running
    (or paused, if it was paused at save) and owned by the caller (``async with`` it).

    ``tracer`` (a fresh :class:`Tracer`) is loaded into the new QEMU and started before the guest
    runs again. Raises ``IntegrityError`` before anything starts if any part fails authentication (wrong
    KEK included), ``SnapshotError`` if the kernel/initrd changed or ``memory`` differs from the
    snapshot's, and the launch errors of :class:`Machine`.
    """
    snap = open_snapshot(path, kek)
    m = snap.manifest
    if m.get("format") != "qemu-mktme-snapshot":
        raise IntegrityError(f"{snap.path}: not a snapshot manifest")
    vmi = m["vm"]
    if memory is not None and memory != int(vmi["memory"]):
        raise SnapshotError(f"{snap.path} holds a {int(vmi['memory']) >> 20} MiB guest; "
                            f"cannot restore into {memory >> 20} MiB")
    with open(snap.path, "rb") as f:
        snap.verify_chunks(f)
        device_state = snap.device_state(f)
    data_key, tweak_key = snap.vm_key()
    boot = _check_boot(snap.private().get("boot"))
    alg = m["key"]["algorithm"]
    payload = f"type=user algorithm={alg} key={data_key.hex()} tweak={tweak_key.hex()}"
    vm_name = name or vmi["name"]
    serial = host.keys.add(f"{vmi['tenant']}:{vm_name}:restored", payload, tenant=vmi["tenant"])
    config = MachineConfig(boot=boot, memory=int(vmi["memory"]), cpus=int(vmi["cpus"]), machine=vmi["machine"],
                           cpu=vmi.get("cpu"), name=vm_name, incoming=True, qemu=qemu,
                           accel=vmi.get("accel") or "tcg")
    if tracer is not None:
        config = tracer.configure(config)
    vm = EncryptedMachine(host, config, key_serial=serial, tenant=vmi["tenant"], revoke_key_on_close=True)
    try:
        await vm.launch()
        if tracer is not None:
            await vm.trace(tracer)
        _write_ram(snap, vm, XtsKey(data_key, tweak_key), int(m["ram"]["hpa"], 16), progress)
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
    """Decrypt every stored chunk (DRAM image at the saved HPA) into the new VM's RAM."""
    backend = np.frombuffer(vm.ram.backend, np.uint8)
    if backend.size != int(snap.manifest["vm"]["memory"]):
        raise SnapshotError(f"{vm.name}: the new QEMU's RAM is {backend.size} bytes, the snapshot's "
                            f"{snap.manifest['vm']['memory']}")
    chunks = snap.chunks()
    with open(snap.path, "rb") as f:
        for i, (off, n, fo, _tag) in enumerate(chunks):
            data = snap.read_at(f, fo, n)
            decrypt_lines(key, data, saved_hpa + off, out=backend[off:off + n])
            if progress:
                progress(i + 1, len(chunks))


def snapshot_summary(path: str | os.PathLike[str], kek: bytes) -> dict[str, Any]:
    """What ``qemu-mktme snapshot verify`` prints: sizes and layout, no key material."""
    m = verify_snapshot(path, kek)
    stored = sum(int(c[1]) for c in m["chunks"])
    return {"path": os.fspath(path), "vm": m["vm"], "key": m["key"], "created": m["created"],
            "chunks": len(m["chunks"]), "stored_nbytes": stored, "file_nbytes": os.path.getsize(path),
            "device_state_nbytes": m["device_state"]["length"], "snapshot_id": m["snapshot_id"],
            "algorithm": m["key"]["algorithm"]}

