"""The transparency verifier: a stock guest behaves identically with the whole emulation attached.

Each workload runs twice on the same unmodified QEMU: **plain** (no MKTME, nothing attached) and
**emulated** (a tenant key programmed through PCONFIG, the KeyID in the VM's EPT / VMM page
table / IOMMU, the TCG plugin shim attributing every access when available, the DRAM view of the
whole guest computed while it runs, and an encrypted snapshot saved — or saved and restored —
in the middle). What the guest produced is compared: its console transcript, normalised only
for documented nondeterminism (:data:`NORMALISE`), the checksums it printed, and its exit status.
Before anything runs, the guest binaries are checked to be the stock ones named in the image
manifest.

Disk workloads give each run a fresh sparse disk: the plain run's is served by QEMU's own
virtio-blk, the emulated run's by our vhost-user-blk backend with every DMA through the IOMMU
model; the two images must then be identical byte for byte.

``inject="foreign-write"`` makes the emulated run write through another KeyID into the guest's
data, as a buggy VMM or device would: the verifier must then report a difference, which proves
it can fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ImageError, QemuError
from .host.host import Host
from . import images
from .live.encrypted import EncryptedMachine
from .live.launch import launch_machine
from .qemu.devices import DiskSpec, NetSpec
from .arch.sizes import parse_size
from .qemu.machine import Machine, MachineConfig, VmState
from .live.migrate import migrate, plain_migrate
from .live.snapshot import restore_snapshot, save_snapshot
from .tenant.pki import create_pki
from .trace.tracer import Tracer

NORMALISE: list[tuple[str, str, str]] = [
    # (pattern, replacement, why)
    (r"\[\s*\d+\.\d+\] ", "", "kernel printk timestamps (also mid-line: the kernel's last words after a shell prompt)"),
    (r"(MemFree:\s+)\d+ kB", r"\1<n> kB", "free memory depends on timing of the kernel's caches"),
    (r"(free-after-fill=)\d+kB", r"\1<n>kB", "same"),
    (r"\r", "", "serial line endings"),
]
INJECT = ("foreign-write",)


@dataclass
class Run:
    transcript: str = ""
    hostfwd_port: int | None = None         # a host port forwarded to the guest's TCP 7777 (--net user)
    exit_status: int | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    disk_sha256: str | None = None


@dataclass
class Outcome:
    workload: str
    identical: bool
    plain: Run
    emulated: Run
    first_difference: str | None = None

    @property
    def time_ratio(self) -> float:
        return self.emulated.seconds / self.plain.seconds if self.plain.seconds else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {"workload": self.workload, "identical": self.identical, "first_difference": self.first_difference,
                "plain_seconds": round(self.plain.seconds, 3), "emulated_seconds": round(self.emulated.seconds, 3),
                "time_ratio": round(self.time_ratio, 3), "exit_status": [self.plain.exit_status, self.emulated.exit_status],
                "emulation": self.emulated.notes}


def normalise(text: str) -> list[str]:
    lines = []
    for line in text.split("\n"):
        for pattern, repl, _why in NORMALISE:
            line = re.sub(pattern, repl, line)
        lines.append(line)
    while lines and not lines[-1]:
        lines.pop()
    return lines


def first_difference(a: list[str], b: list[str]) -> str | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"line {i + 1}: plain {x!r} vs emulated {y!r}"
    if len(a) != len(b):
        longer, which = (a, "plain") if len(a) > len(b) else (b, "emulated")
        return f"line {min(len(a), len(b)) + 1}: only {which} has {longer[min(len(a), len(b))]!r}"
    return None


# ---------------------------------------------------------------------------------- emulation


class Emulation:
    """What the emulated run attaches: host, tenant key, shim; one per run."""

    def __init__(self, inject: str | None = None, shim: bool = True) -> None:
        if inject is not None and inject not in INJECT:
            raise ValueError(f"inject must be one of {', '.join(INJECT)}, got {inject!r}")
        self.inject = inject
        self.shim = shim
        self.host = Host(keyid_bits=6)
        key, tweak = os.urandom(16), os.urandom(16)
        self.payload = f"type=user key={key.hex()} tweak={tweak.hex()}"
        self.serial = self.host.keys.add("verify", self.payload, tenant="verify")
        self.kek = os.urandom(32)
        self.notes: list[str] = []
        self.tracers: list[Tracer] = []

    async def launch(self, stack: contextlib.AsyncExitStack, config: MachineConfig) -> EncryptedMachine:
        """The emulated machine, running: tenant key, tagged tables, and the shim attributing
        every access to the VM's KeyID."""
        tracer = await self.tracer(stack)
        vm = await launch_machine(config, tracer=tracer, machine=self._machine)
        return await stack.enter_async_context(vm)

    def _machine(self, config: MachineConfig) -> EncryptedMachine:
        return EncryptedMachine(self.host, config, key_serial=self.serial, tenant="verify")

    async def tracer(self, stack: contextlib.AsyncExitStack) -> Tracer | None:
        if not self.shim:
            return None
        tracer = await stack.enter_async_context(Tracer())
        self.tracers.append(tracer)
        return tracer

    def shim_notes(self) -> None:
        """What the shims saw, once their machines are gone."""
        for tracer in self.tracers:
            st = tracer.stats()
            self.notes.append(f"shim: {st.ram_accesses:,} guest RAM accesses attributed to KeyIDs "
                              f"(TLB hit rate {st.tlb_hit_rate:.2%}, {st.verify_mismatches + st.decode_mismatches} "
                              f"mismatches in {st.verify_checks + st.decode_checks:,} checks)")

    async def touch(self, vm: Machine) -> None:
        """Exercise the emulation on a running VM: a full DRAM view and its KeyID state."""
        if isinstance(vm, EncryptedMachine):
            nbytes = await asyncio.to_thread(lambda: sum(c.size for _, c in vm.guest.iter_dram(chunk_nbytes=16 << 20)))
            when = "while running" if vm.state is VmState.RUNNING else "while paused"
            self.notes.append(f"DRAM view of {nbytes >> 20} MiB computed {when}")
            if vm.guest.check_consistency():
                self.notes.append("KeyID tagging INCONSISTENT")

    async def foreign_write(self, vm: Machine, gpa: int, nbytes: int) -> None:
        if self.inject == "foreign-write" and isinstance(vm, EncryptedMachine):
            other = self.host.keys.add("intruder", "type=cpu", tenant="intruder")
            keyid = self.host.keys.describe(other)["keyid"]
            assert isinstance(keyid, int)
            vm.guest.write(gpa, os.urandom(nbytes), keyid=keyid)
            self.notes.append(f"injected: {nbytes} bytes written at GPA {gpa:#x} through KeyID {keyid}")


# ---------------------------------------------------------------------------------- workloads

Driver = Callable[[Machine, "Emulation | None", Run], Awaitable[None]]


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    image: str
    boot: Callable[[images.Image], images.BootSpec]
    drive: Driver
    timeout: float = 600.0
    memory: str | None = None              # None: the image's default
    disk_mib: int = 0                      # >0: a fresh sparse disk of this size per run
    net: bool = False                      # a virtio NIC on user networking, host port -> guest 7777

    @property
    def memory_bytes(self) -> int:
        return parse_size(self.memory) if self.memory else images.default_memory(self.image)


PATTERN_GPA, PATTERN_LEN = 0x300000, 1 << 20


async def _drive_baremetal(vm: Machine, emu: Emulation | None, run: Run) -> None:
    con = vm.console
    await con.wait_for(re.escape(images.BAREMETAL.prompt), 30)
    await con.command(f"fill {PATTERN_GPA:#x} {PATTERN_LEN} 0xa5 8", r"ok fill .*\n", 60)
    await con.command(f"writehex {PATTERN_GPA + 4096:#x} 00112233445566778899aabbccddeeff", r"ok writehex .*\n")
    if emu is not None:
        await emu.touch(vm)
        await emu.foreign_write(vm, PATTERN_GPA + 8192, 64)
    await con.command(f"crc {PATTERN_GPA:#x} {PATTERN_LEN}", r"ok crc32 .*\n", 120)
    await con.command("loop 3000000", r"ok loop .*\n", 120)
    await con.command("ticks 3 100000", r"ok ticks .*\n", 60)
    await con.command("poweroff", r"ok poweroff\n", 30)
    run.exit_status = await vm.wait(60)


def _linux_driver(marker: str, save: bool = True) -> Driver:
    async def drive(vm: Machine, emu: Emulation | None, run: Run) -> None:
        await vm.console.wait_for(images.LINUX.marker(r"holding\n"), 120)
        if emu is not None:
            await emu.touch(vm)
            if save and isinstance(vm, EncryptedMachine):
                path = _tmp_snapshot(vm.name)
                try:
                    r = await save_snapshot(vm, path, emu.kek)
                    emu.notes.append(f"encrypted snapshot saved mid-run ({r.stored_nbytes >> 20} MiB RAM, {r.seconds:.2f} s)")
                finally:
                    _unlink(path)
        await vm.console.write("\n")
        await vm.console.wait_for(marker, 3600)
        run.exit_status = await vm.wait(120)
        if emu is not None and isinstance(vm, EncryptedMachine) and vm.vhost.disks:
            emu.notes += [line.strip() for line in vm.vhost.summary()]
    return drive


async def _drive_snapshot_restore(vm: Machine, emu: Emulation | None, run: Run) -> None:
    """Counter to 30; the emulated run is saved at count 8, killed, restored, and finishes."""
    await vm.console.wait_for(r"^count 8\n", 120)
    if emu is None or not isinstance(vm, EncryptedMachine):
        await vm.console.wait_for(r"workload counter exit=", 600)
        run.exit_status = await vm.wait(120)
        return
    # Held at count 8 while the DRAM view is computed and the snapshot saved: on a busy machine
    # those take longer than the rest of the count, and the guest must not finish meanwhile.
    await vm.pause()
    await emu.touch(vm)
    path = _tmp_snapshot(vm.name)
    try:
        await save_snapshot(vm, path, emu.kek)
        before = vm.console.transcript
        await vm.close()                                       # the original is gone for good
        async with contextlib.AsyncExitStack() as stack:
            tracer = await emu.tracer(stack)
            restored = await restore_snapshot(emu.host, path, emu.kek, name=f"{vm.name}-restored", tracer=tracer)
            await stack.enter_async_context(restored)
            await restored.resume()                            # saved paused: it carries on from here
            await restored.console.wait_for(r"workload counter exit=", 600)
            run.exit_status = await restored.wait(120)
            run.transcript = before + restored.console.transcript
        emu.notes.append("saved at count 8, original closed, restored into a fresh QEMU")
    finally:
        _unlink(path)


async def _drive_migrate(vm: Machine, emu: Emulation | None, run: Run) -> None:
    """Counter to 30, live-migrated at count 8: plain QEMU into a fresh plain QEMU (no TLS); the
    emulated VM over TLS (a throwaway CA) to a second host model, which picks its own KeyID."""
    await vm.console.wait_for(r"^count 8\n", 120)
    with tempfile.TemporaryDirectory(prefix="qemu-mktme-verify-") as tmp:
        if emu is None or not isinstance(vm, EncryptedMachine):
            moved, _ = await plain_migrate(vm, tls=None)
        else:
            await emu.touch(vm)
            create_pki(tmp, client_cn="verify")
            dest = Host(keyid_bits=6)
            dest.keys.add("other", "type=cpu", tenant="other")     # the destination's KeyID 1 is taken
            payload = emu.host.keys.payload(vm.key_serial, vm.tenant)
            moved, result = await migrate(vm, dest, payload, tls=Path(tmp))
            emu.notes.append(f"migrated at count 8 over TLS: KeyID {result.source_keyid} -> {result.dest_keyid} on a "
                             f"second host, {result.transferred >> 20} MiB in {result.total_ms} ms, "
                             f"downtime {result.downtime_ms} ms (destination not traced)")
    before = vm.console.transcript
    async with moved:
        await moved.console.wait_for(r"workload counter exit=", 600)
        run.exit_status = await moved.wait(120)
        run.transcript = before + moved.console.transcript


def _tmp_disk(name: str, mib: int) -> str:
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"qemu-mktme-verify-{name}-{os.getpid()}.img")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, mib << 20)
    finally:
        os.close(fd)
    return path


async def _hash_disk(path: str, run: Run) -> None:
    """The disk image's sha256, once the machine is gone (runs before the file is removed)."""
    def digest() -> str:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    run.disk_sha256 = await asyncio.to_thread(digest)
DEBIAN_LOGIN = r"debian login: "


async def _drive_debian(vm: Machine, emu: Emulation | None, run: Run) -> None:
    """The Debian system from its disk to the login prompt; then logged in on the serial console
    (root has no password in this test image), its hello workload run, and powered off. (No
    snapshot: machines with disks are not snapshotted, their disk would not be in it.)"""
    await vm.console.wait_for(DEBIAN_LOGIN, 1200)
    if emu is not None:
        await emu.touch(vm)
    if run.hostfwd_port is not None:      # the guest's banner through virtio-net, slirp and hostfwd
        banner = await _read_banner(run.hostfwd_port, 300)
        if not banner.startswith(images.DEBIAN.tag + "banner host=debian"):
            raise QemuError(f"{vm.name}: the guest's TCP banner through hostfwd was {banner!r}")
        if emu is not None:
            emu.notes.append("virtio-net: the guest's banner read through QEMU's user networking (hostfwd)")
    await vm.console.command("root", r"root@debian:~# ", 300)
    # bash wraps its prompt in bracketed-paste switches (ESC [?2004h): \S* steps over them
    await vm.console.command("mktme-workload hello", r"os-release sha256=\w+\s+\S*root@debian:~# ", 300)
    # Compared up to here: after "poweroff" the shell's next prompt and the kernel's last line
    # ("reboot: Power down") race each other onto the console; the exit status is compared instead.
    run.transcript = vm.console.transcript[:vm.console.mark()]
    await vm.console.write("poweroff\r")
    run.exit_status = await vm.wait(600)


async def _read_banner(port: int, timeout: float) -> str:
    """The first line from 127.0.0.1:port; retried while the guest's network comes up (slirp
    accepts at once and closes when the guest does not answer yet)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                line = await asyncio.wait_for(reader.readline(), 30)
            finally:
                writer.close()
            if line:
                return line.decode(errors="replace").strip()
        if time.monotonic() > deadline:
            return ""
        await asyncio.sleep(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tmp_snapshot(name: str) -> str:
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    return os.path.join(base or os.environ.get("TMPDIR", "/tmp"), f"qemu-mktme-verify-{name}-{os.getpid()}.snap")


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


WORKLOADS: dict[str, Workload] = {w.name: w for w in [
    Workload("baremetal", "bare-metal guest: 1 MiB pattern, CRC-32, compute loop, ticks", "baremetal",
             lambda im: im.boot(), _drive_baremetal),
    Workload("linux-boot", "stock Debian kernel + busybox boot, hello workload", "linux",
             lambda im: im.boot(workload="hello", params={"hold": 1}), _linux_driver(r"workload hello exit=")),
    Workload("linux-compress", "gzip/gunzip of 16 MiB with checksums", "linux",
             lambda im: im.boot(workload="compress", params={"hold": 1}), _linux_driver(r"workload compress exit=")),
    Workload("linux-memstress", "256 MiB of guest RAM filled and checksummed", "linux",
             lambda im: im.boot(workload="memstress", params={"size_mb": 256, "hold": 1}), _linux_driver(r"workload memstress exit=")),
    Workload("linux-disk", "4 MiB written to a virtio disk with direct I/O, flushed, read back (QEMU's "
             "virtio-blk vs our vhost-user-blk through the IOMMU); disk images compared", "linux",
             lambda im: im.boot(workload="disk", params={"size_mb": 4, "hold": 1}),
             _linux_driver(r"workload disk exit=", save=False), disk_mib=64),
    Workload("linux-snapshot", "counter with an encrypted save/restore in the middle", "linux",
             lambda im: im.boot(workload="counter", params={"count": 30, "period": 0.1}), _drive_snapshot_restore),
    Workload("debian-boot", "full Debian system (systemd) from its qcow2 disk to the login prompt, "
             "banner over virtio-net, logged in, hello, poweroff", "debian", lambda im: im.boot(), _drive_debian,
             timeout=1800, net=True),
    Workload("linux-migrate", "counter live-migrated mid-run: plain QEMU vs TLS to a second emulated host", "linux",
             lambda im: im.boot(workload="counter", params={"count": 30, "period": 0.1}), _drive_migrate),
]}



# ---------------------------------------------------------------------------------- running


def check_stock(image: images.Image) -> list[str]:
    """The guest's binaries are the stock ones of the manifest; what was checked, or ImageError.

    An image we build ourselves (bare metal) has no stock files: its kernel is reported with the
    toolchain and the hash that :func:`images.load` already checked against the manifest.
    """
    checked = []
    if image.disk is not None:             # the Debian system: every file is from a package mmdebstrap installed
        release = image.manifest.get("kernel_release")
        pkg = next((p for p in image.manifest.get("packages", []) if p["name"] == f"linux-image-{release}"), None)
        artifacts = dict(image.manifest.get("artifacts", {}))
        return [f"{image.kernel.name}: stock linux-image-{release} {pkg['version'] if pkg else '?'} (installed by "
                f"mmdebstrap), sha256 {str(artifacts.get(image.kernel.name))[:16]}...",
                f"{image.disk.name}: {len(image.manifest.get('packages', []))} stock packages, sha256 "
                f"{str(artifacts.get(image.disk.name))[:16]}..."]
    if not image.manifest.get("stock_files"):
        built = dict(image.manifest.get("artifacts", {})).get(image.kernel.name, "?")
        return [f"{image.kernel.name}: built here from guest_images/{image.name} with "
                f"{image.manifest.get('toolchain', 'the system toolchain')}, sha256 {str(built)[:16]}..."]
    for name, rec in dict(image.manifest.get("stock_files", {})).items():
        digest = hashlib.sha256(images.read_stock_file(image, name)).hexdigest()
        if digest != rec["sha256"]:
            raise ImageError(f"{image.name}: {name} is not the stock file of {rec['package']} "
                             f"(sha256 {digest} != {rec['sha256']})", image=image.name)
        pkg = next((p for p in image.manifest.get("packages", []) if p["name"] == rec["package"]), None)
        checked.append(f"{name}: stock {rec['package']} {pkg['version'] if pkg else ''} sha256 {digest[:16]}...")
    return checked


async def run_once(work: Workload, emu: Emulation | None) -> Run:
    image = images.load(work.image)
    run = Run()
    async with contextlib.AsyncExitStack() as stack:
        name = f"verify-{work.name}-{'emulated' if emu else 'plain'}"
        disks: tuple[DiskSpec, ...] = ()
        if image.disk is not None:                    # a throwaway overlay: each run boots the same disk
            overlays = stack.enter_context(tempfile.TemporaryDirectory(prefix="qemu-mktme-verify-"))
            disks = (images.overlay_disk(image, overlays),)
        if work.disk_mib:
            disk = _tmp_disk(name, work.disk_mib)
            stack.callback(_unlink, disk)
            # plain: QEMU's virtio-blk; emulated: the default under emulation, our backend
            disks += (DiskSpec(Path(disk), dma="qemu" if emu is None else None),)
            stack.push_async_callback(_hash_disk, disk, run)
        nets: tuple[NetSpec, ...] = ()
        if work.net:
            run.hostfwd_port = _free_port()
            nets = (NetSpec("user", (f"tcp:127.0.0.1:{run.hostfwd_port}-:7777",)),)
        config = images.machine_config(work.image, image=image, boot=work.boot(image), memory=work.memory_bytes,
                                       disks=disks, nets=nets, name=name)
        start = time.perf_counter()
        if emu is None:
            vm: Machine = await stack.enter_async_context(Machine(config))
        else:
            vm = await emu.launch(stack, config)
        await asyncio.wait_for(work.drive(vm, emu, run), work.timeout)
        if not run.transcript:
            run.transcript = vm.console.transcript
    run.seconds = time.perf_counter() - start
    if emu is not None:
        emu.shim_notes()
        run.notes = list(emu.notes)
    return run


async def verify(names: list[str] | None = None, *, inject: str | None = None, shim: bool = True,
                 progress: Callable[[str], None] | None = None) -> tuple[list[Outcome], list[str]]:
    """Run the workloads plain and emulated; (outcomes, stock-file checks)."""
    say = progress or (lambda _m: None)
    chosen = names or list(WORKLOADS)
    unknown = [n for n in chosen if n not in WORKLOADS]
    if unknown:
        raise ValueError(f"unknown workload {unknown[0]!r} (known: {', '.join(WORKLOADS)})")
    stock: list[str] = []
    for image_name in sorted({WORKLOADS[n].image for n in chosen}):
        stock += check_stock(images.build(image_name))
    outcomes = []
    for name in chosen:
        work = WORKLOADS[name]
        say(f"{name}: plain run")
        plain = await run_once(work, None)
        say(f"{name}: emulated run")
        emulated = await run_once(work, Emulation(inject=inject, shim=shim))
        diff = first_difference(normalise(plain.transcript), normalise(emulated.transcript))
        if diff is None and plain.exit_status != emulated.exit_status:
            diff = f"exit status: plain {plain.exit_status} vs emulated {emulated.exit_status}"
        if diff is None and plain.disk_sha256 != emulated.disk_sha256:
            diff = f"disk images differ: plain sha256 {plain.disk_sha256} vs emulated {emulated.disk_sha256}"
        elif plain.disk_sha256 is not None:
            emulated.notes.append(f"disk images identical byte for byte (sha256 {plain.disk_sha256[:16]}...)")
        outcomes.append(Outcome(name, diff is None, plain, emulated, diff))
    return outcomes, stock


__all__ = ["INJECT", "NORMALISE", "WORKLOADS", "Emulation", "Outcome", "check_stock", "first_difference",
           "normalise", "verify"]
