"""``qemu-mktme demo``: the whole story in under a minute, on a stock guest and unmodified QEMU."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .. import verifier
from ..host.host import Host
from ..files.dumpfile import Dump, write_dump
from ..inspect.entropy import dump_entropy
from ..inspect.layout import keyid_map
from ..inspect.plot import map_png
from .. import images
from ..live.encrypted import EncryptedMachine
from ..qemu.machine import MachineConfig
from ..live.snapshot import restore_snapshot, save_snapshot

STEPS = 7


class Story:
    """Readable, numbered output; every claim printed is one the code just checked."""

    def __init__(self, out: Callable[[str], None]) -> None:
        self.out, self.step, self.started = out, 0, time.monotonic()

    def section(self, title: str) -> None:
        self.step += 1
        self.out(f"\n[{self.step}/{STEPS}] {title}")

    def say(self, text: str) -> None:
        for line in text.splitlines():
            self.out(f"      {line}")

    def check(self, ok: bool, text: str) -> None:
        self.say(("ok    " if ok else "FAIL  ") + text)
        if not ok:
            raise AssertionError(text)


def hexline(data: bytes) -> str:
    return " ".join(f"{b:02x}" for b in data[:16]) + "  |" + "".join(chr(b) if 32 <= b < 127 else "." for b in data[:16]) + "|"


async def run_demo(png: str | os.PathLike[str], out: Callable[[str], None] = print) -> None:
    s = Story(out)
    out("qemu-mktme demo: Intel MKTME emulated around an unmodified QEMU, a stock Debian guest")
    linux, baremetal = _images(s)
    host = _host_boots(s)
    tenant = _Tenant(secret="ACME-CARD-4111-1111-1111-1111")
    async with _tenant_vm(s, host, linux, tenant) as vm:
        gpa = await _guest_stores_secret(s, vm, tenant.secret)
        await _cpu_vs_dram(s, vm, gpa, tenant)
        tmp = Path(tempfile.mkdtemp(prefix="qemu-mktme-demo-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else None))
        try:
            await _neighbour_and_map(s, host, vm, baremetal, tenant.secret, tmp / "dump", png)
            await _snapshot_round_trip(s, host, vm, tenant.secret, tmp / "web-1.snap")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    await _transparency(s)
    out(f"\nDone in {time.monotonic() - s.started:.1f} s. Next: 'qemu-mktme run --guest linux --workload shell', "
        "'qemu-mktme verify', 'qemu-mktme inspect'.")


@dataclass(frozen=True)
class _Tenant:
    """The demo tenant's key (its own, so the demo can check DRAM independently) and secret."""

    secret: str
    data_key: bytes = field(default_factory=lambda: os.urandom(16))
    tweak_key: bytes = field(default_factory=lambda: os.urandom(16))


def _images(s: Story) -> tuple[images.Image, images.Image]:
    s.section("Guest images: built here, or stock Debian packages checked by hash")
    linux = images.build("linux")
    baremetal = images.build("baremetal")
    for line in verifier.check_stock(linux) + verifier.check_stock(baremetal):
        s.say(line)
    return linux, baremetal


def _host_boots(s: Story) -> Host:
    s.section("The host boots; its BIOS activates TME-MK (IA32_TME_ACTIVATE), Linux-style detection")
    host = Host(keyid_bits=6)
    for line in host.boot_log:
        s.say(line)
    s.say(f"x86_phys_bits reduced to {host.phys_bits}: bits {host.platform.layout.keyid_shift}.."
          f"{host.platform.maxphyaddr - 1} of a physical address carry the KeyID")
    return host


@contextlib.asynccontextmanager
async def _tenant_vm(s: Story, host: Host, linux: images.Image, tenant: _Tenant) -> AsyncIterator[EncryptedMachine]:
    s.section("A tenant's key becomes a key handle; the KeyID is programmed with PCONFIG and tagged")
    serial = host.keys.add("acme:web-1", f"type=user key={tenant.data_key.hex()} tweak={tenant.tweak_key.hex()}",
                           tenant="acme")
    boot = linux.boot(workload="secret", params={"secret": tenant.secret})
    vm = EncryptedMachine(host, MachineConfig(boot=boot, memory="512M", name="web-1"), key_serial=serial, tenant="acme")
    async with vm:
        q = vm.query()
        s.say(f"handle {q['handle']} (user space never sees a KeyID) -> KeyID {q['keyid']} "
              f"({q['algorithm']}, {host.keys.pconfig_calls} PCONFIG KEYID_SET_KEY_DIRECT)")
        s.say(f"EPT {q['eptp']}, QEMU's page table over its RAM at {q['vmm-hva']}, IOMMU {q['iommu-slptptr']}: "
              f"all tagged with KeyID {q['keyid']}")
        s.check(bool(q["consistent"]), "EPT, VMM page table and IOMMU agree on the KeyID of every page")
        yield vm


async def _guest_stores_secret(s: Story, vm: EncryptedMachine, secret: str) -> int:
    s.section("The stock Debian guest boots under QEMU and stores a secret in its RAM")
    m = await vm.console.wait_for(images.LINUX.marker(r"boot kernel=(\S+) busybox=(\S+)\n"), 120)
    s.say(f"guest: Linux {m[1]}, busybox {m[2]} (unmodified), QEMU pid {vm.pid}")
    m = await vm.console.wait_for(r"secret at (0x[0-9a-f]+) len=\d+\n", 60)
    gpa = int(m[1], 16)
    await vm.console.wait_for("waiting for host\n", 30)
    s.say(f"the guest wrote {secret!r} at GPA {gpa:#x} (dd to /dev/mem)")
    return gpa


async def _cpu_vs_dram(s: Story, vm: EncryptedMachine, gpa: int, tenant: _Tenant) -> None:
    s.section("What the CPU sees vs what DRAM holds")
    await vm.pause()
    line_gpa = gpa - gpa % 64
    plain = vm.ram.read(line_gpa, 64)
    dram = vm.guest.dram(line_gpa, 64)
    hpa = vm.guest.hpa_of(line_gpa)
    s.say(f"CPU view  GPA {line_gpa:#x}: {hexline(plain)}")
    s.say(f"DRAM view HPA {hpa:#x}: {hexline(dram)}")
    enc = Cipher(algorithms.AES(tenant.data_key + tenant.tweak_key), modes.XTS(hpa.to_bytes(16, "little"))).encryptor()
    s.check(dram == enc.update(plain) + enc.finalize(),
            "that line equals AES-XTS(tenant key, tweak = HPA) computed independently with `cryptography`")
    t0 = time.monotonic()
    s.check(vm.guest.find_in_dram(tenant.secret.encode()) is None,
            f"the secret appears nowhere in all {vm.ram.size >> 20} MiB of DRAM "
            f"(scanned in {time.monotonic() - t0:.1f} s)")


async def _neighbour_and_map(s: Story, host: Host, vm: EncryptedMachine, baremetal: images.Image, secret: str,
                             dump_path: Path, png: str | os.PathLike[str]) -> None:
    """A neighbour whose KeyID stores plaintext (KEYID_NO_ENCRYPT), for contrast in the map."""
    plain_serial = host.keys.add("lab:scratch", "type=no-encrypt", tenant="lab")
    scratch = EncryptedMachine(host, MachineConfig(boot=baremetal.boot(commands=[
        "fill 0x400000 0x800000 0x41 8", f"write 0x200000 {secret}"]), memory="256M", name="scratch"),
        key_serial=plain_serial, tenant="lab")
    async with scratch:
        await scratch.console.wait_for(r"ok write .*\n", 30)
        await scratch.pause()
        s.check(scratch.guest.find_in_dram(secret.encode()) is not None,
                f"a neighbour VM on a no-encrypt KeyID ({scratch.keyid}) leaves the same secret in DRAM as plaintext")
        dump = write_dump([vm.guest, scratch.guest], dump_path, host_info={"keyid_bits": 6})
    s.say(f"DRAM map and entropy of both VMs: {write_demo_png(dump, png)}")
    await vm.resume()


async def _snapshot_round_trip(s: Story, host: Host, vm: EncryptedMachine, secret: str, path: Path) -> None:
    s.section("An encrypted snapshot: save, quit, restore into a fresh QEMU, the guest carries on")
    kek = os.urandom(32)
    r = await save_snapshot(vm, path, kek)
    raw = path.read_bytes()
    s.say(f"saved {len(raw) >> 20} MiB in {r.seconds:.2f} s ({r.stored_nbytes >> 20} MiB of RAM as its DRAM image, "
          f"{r.skipped_nbytes >> 20} MiB zero); key wrapped under a key-encryption key")
    s.check(secret.encode() not in raw, "the secret is not in the snapshot file")
    await vm.close()
    async with await restore_snapshot(host, path, kek, name="web-1") as restored:
        await restored.console.write("go\n")
        m = await restored.console.wait_for(r"secret-region sha256=(\w{64})\n", 60)
        s.check(m[1] == hashlib.sha256(secret.encode()).hexdigest(),
                f"restored guest (QEMU pid {restored.pid}, KeyID {restored.keyid}) continued its workload "
                "and read its secret back intact")
        await restored.wait(60)


async def _transparency(s: Story) -> None:
    s.section("Transparency: the bare-metal workload, plain QEMU vs full emulation")
    outcomes, _ = await verifier.verify(["baremetal"])
    o = outcomes[0]
    s.check(o.identical, f"console, CRC-32 of a 1 MiB pattern and exit status identical "
                         f"(plain {o.plain.seconds:.2f} s, emulated {o.emulated.seconds:.2f} s)")


def write_demo_png(dump: Dump, png: str | os.PathLike[str]) -> str:
    """The KeyID map beside per-page entropy of ``dump``, as a PNG; a one-line summary."""
    emap = dump_entropy(dump)
    width, height = map_png(png, keyid_map(dump), emap, force=True)
    low = sum(int((e < emap.threshold).sum()) for e in emap.entropy)
    return f"{png} ({width}x{height}): {low} low-entropy page(s) in {sum(e.size for e in emap.entropy)}"


def main(png: str = "mktme-demo.png") -> int:
    try:
        asyncio.run(run_demo(png))
    except AssertionError as err:
        print(f"\nqemu-mktme demo: a check failed: {err}", file=sys.stderr)
        return 1
    return 0
