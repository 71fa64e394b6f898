#!/usr/bin/env python3
"""Attested launch vs a launch with local key files: time to the bare-metal guest's first console
line, split into measure (swtpm start, hashing, PCR extends; beside the nonce and the image
verify), image verify (manifest and digest), attest (quote, binding-key certification), key
release (broker checks, KMIP get, seal, TPM unwrap), keys in hand, and what follows the keys
(bind, LUKS disk hot-plugged over QMP, cont, guest to its first line).

    .venv/bin/python scripts/bench_attest.py [--rounds 5]

QEMU starts paused at once, beside the attestation (no vCPU runs before the keys are there);
the local launch opens the same LUKS-in-qcow2 disk at start through an inherited fd and runs
the memory key as a ``type=user`` key read from files (the alternative at its best: no network,
no TPM, nothing hot-plugged). Everything runs in one process through the library (what ``run``
calls), in a temporary tenant with its own key server, both ways twice per round, in rotating
order: as a process's first launch ("first": what ``qemu-mktme run`` meets, nothing hashed or
probed yet; the process state is forgotten before each) and as a later launch in the same process
("again": a test harness; settled files' digests and QEMU's probes remembered). Medians of the
rounds. Last line: ``ratio=<attested/local>`` of first launches; the line above it, of later ones.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # this checkout's package

from qemu_mktme import images
from qemu_mktme.keymaterial import read_key_file
from qemu_mktme.qemu import binary, passthrough
from qemu_mktme.live.session import HostSession, VmSpec
from qemu_mktme.qemu.devices import DiskSpec
from qemu_mktme.qemu.machine import MachineConfig
from qemu_mktme.attest import digests, image
from qemu_mktme.tenant import admin, keyserver
from qemu_mktme.attest.launch import TenantLaunch, attested_session, memory_payload
from qemu_mktme.tenant.store import TenantDir

FIRST_LINE = r"mktme-baremetal \d+ ready"
VARIANTS = ["attested first", "local first", "attested again", "local again"]


def forget_process_state() -> None:
    """What a new ``qemu-mktme`` process starts without: the measured digests (kept in memory
    only, :mod:`qemu_mktme.attest.digests`) and QEMU's version/option probes."""
    digests.forget()
    binary._probe.cache_clear()
    binary.kvm_works.cache_clear()
    passthrough.qemu_options.cache_clear()


async def attested(ks: keyserver.KeyServerInfo, tenant: TenantDir, disk: Path, boot, hostdir: Path) -> dict[str, float]:
    launch = TenantLaunch(ks.url, tenant.pki.ca, image=disk, host_dir=hostdir)
    t0 = time.perf_counter()
    async with attested_session(launch, MachineConfig(boot=boot, memory="128M", name="bm"), tenant="bench",
                                control=False) as s:
        await s.machines["bm"].console.wait_for(FIRST_LINE, 60)
        total = time.perf_counter() - t0
    t = launch.timings
    return {"measure": t["measure"], "image-verify": t["image-verify"], "attest": t["attest"],
            "release": t["release"], "keys in hand": t["released"], "disk hot-plug": t["disk"],
            "launch+boot": total - t["released"], "total": total}


async def local(memory_key: Path, disk_key: Path, disk: Path, boot) -> dict[str, float]:
    t0 = time.perf_counter()
    mem = bytes.fromhex(read_key_file(memory_key).strip())
    pw = read_key_file(disk_key).strip()
    with image.secret_pipe(pw) as fd:
        fd_img = os.open(disk, os.O_RDONLY)
        try:
            cfg = MachineConfig(boot=boot, memory="128M", name="bm", pass_fds=(fd_img, fd),
                                disks=(DiskSpec(Path(f"/dev/fd/{fd_img}"), "qcow2", dma="qemu", readonly=True,
                                                secret_fd=fd),))
            async with HostSession([VmSpec(cfg, "bench", memory_payload(mem))], control=False) as s:
                await s.machines["bm"].console.wait_for(FIRST_LINE, 60)
                total = time.perf_counter() - t0
        finally:
            os.close(fd_img)
    return {"launch+boot": total, "total": total}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="two rounds (a smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.rounds = 2
    boot = images.build("baremetal").boot()
    with tempfile.TemporaryDirectory(prefix="bench-attest-") as tmp:
        base = Path(tmp)
        tenant = TenantDir(base / "tenant")
        tenant.init("bench")
        ks = keyserver.start(tenant)
        try:
            admin.add_key(tenant, "vm")
            hostdir = base / "hosts" / "host0"
            admin.make_policy(tenant, boot, hosts=["host0"], host_dirs={"host0": hostdir})
            raw = base / "disk.raw"
            raw.write_bytes(os.urandom(1 << 20))
            admin.encrypt_image(tenant, raw, base / "disk.qcow2", key_name="disk")
            raw.unlink()
            # the local baseline's key files (0600, in the temporary directory, removed with it)
            kmip = keyserver.kmip_client(tenant, ks)
            for name, text in (("vm", kmip.get_key(tenant.key_uid("vm")).hex()),
                               ("disk", image.passphrase(kmip.get_key(tenant.key_uid("disk"))))):
                fd = os.open(base / f"{name}.key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.write(fd, text.encode())
                os.close(fd)
            runs: dict[str, list[dict[str, float]]] = {k: [] for k in VARIANTS}
            launch = {"attested": lambda: attested(ks, tenant, base / "disk.qcow2", boot, hostdir),
                      "local": lambda: local(base / "vm.key", base / "disk.key", base / "disk.qcow2", boot)}
            for kind in launch:                                        # the page cache warm, both ways
                await launch[kind]()
            for i in range(args.rounds):
                order = VARIANTS[i % len(VARIANTS):] + VARIANTS[:i % len(VARIANTS)]
                for variant in order:
                    kind, when = variant.split()
                    if when == "first":
                        forget_process_state()
                    runs[variant].append(await launch[kind]())
        finally:
            keyserver.stop(tenant)

    def med(variant: str, k: str) -> float:
        return statistics.median(r[k] for r in runs[variant])

    def spread(variant: str) -> str:
        totals = [r["total"] for r in runs[variant]]
        return f"(min {min(totals):.3f}, max {max(totals):.3f})"
    print(f"bare-metal guest, 128 MiB, LUKS qcow2 disk; median of {args.rounds} interleaved rounds (seconds)")
    notes = {"measure": "(swtpm start, hashing, PCR extends; beside the nonce and image verify)",
             "keys in hand": "(from the start: measure || nonce + image verify, then attest, release;"
                             " QEMU starts paused beside)",
             "disk hot-plug": "(secret, blockdev-add with the LUKS open, device_add)",
             "launch+boot": "(after the keys: bind, disk hot-plug, cont, guest to its first line)"}
    for when, what in (("first", "a process's first launch, as 'run --tenant-server' meets it: nothing hashed or "
                                 "probed yet"),
                       ("again", "a later launch in the same process (a test harness, a long-running host): "
                                 "settled files' digests and QEMU's probe remembered")):
        print(f"{when}: {what}")
        for k in ("measure", "image-verify", "attest", "release", "keys in hand", "disk hot-plug", "launch+boot"):
            print(f"  attested  {k:14} {med(f'attested {when}', k):7.3f}   {notes.get(k, '')}")
        for kind in ("attested", "local"):
            print(f"  {kind:9} {'total':14} {med(f'{kind} {when}', 'total'):7.3f}   {spread(f'{kind} {when}')}")
    again = med("attested again", "total") / med("local again", "total")
    first = med("attested first", "total") / med("local first", "total")
    print(f"ratio again={again:.3f} (a later launch in the same process)")
    print(f"ratio={first:.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main())
