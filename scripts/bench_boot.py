#!/usr/bin/env python3
"""Wall time from launching QEMU to the guest's boot marker, for both guests (median of N runs),
and the disk-booted Debian system to its login prompt: plain QEMU vs the full emulation.

    .venv/bin/python scripts/bench_boot.py [--runs 5] [--debian-runs 3 | --debian-runs 0]

Runs are interleaved (baremetal, linux, baremetal, ...) so that machine noise hits both alike;
so are the Debian rounds (plain, emulated, emulated with the shim, plain, ...). Emulated is the
whole host model (tenant key, KeyID-tagged EPT/VMM/IOMMU: what ``qemu-mktme run`` does without
``--trace``); with the shim, every guest access is attributed too. The last line is
machine-readable: ``baremetal_s=<median> linux_s=<median> ratio_debian=<emulated/plain>
ratio_debian_shim=<emulated with shim/plain>``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import tempfile
import time

from qemu_mktme import images
from qemu_mktme.host.host import Host
from qemu_mktme.live.encrypted import EncryptedMachine
from qemu_mktme.live.launch import launch_machine
from qemu_mktme.qemu.machine import Machine, MachineConfig
from qemu_mktme.trace.tracer import Tracer

DEBIAN_MODES = ("plain", "emulated", "shim")
DEBIAN_LOGIN = r"debian login: "

GUESTS = {
    # name: (memory, marker meaning "booted", marker meaning "workload done")
    "baremetal": ("512M", r"ready mailbox=", r"ok poweroff"),
    "linux": ("1G", r"mktme-linux: boot kernel=", r"mktme-linux: poweroff"),
}


async def one(name: str) -> tuple[float, float]:
    memory, booted, done = GUESTS[name]
    image = images.load(name)
    boot = image.boot(commands=["poweroff"]) if name == "baremetal" else image.boot(workload="hello")
    start = time.perf_counter()
    async with Machine(MachineConfig(boot=boot, memory=memory)) as vm:
        await vm.console.wait_for(booted, 120)
        t_boot = time.perf_counter() - start
        await vm.console.wait_for(done, 120)
        await vm.wait(30)
        t_done = time.perf_counter() - start
    return t_boot, t_done


async def debian(mode: str) -> float:
    """Seconds from launch to the Debian system's login prompt, booted from a fresh overlay."""
    image = images.load("debian")
    with tempfile.TemporaryDirectory(prefix="bench-debian-") as overlays:
        config = MachineConfig(boot=image.boot(), memory="1G", disks=(images.overlay_disk(image, overlays),),
                               name=f"bench-debian-{mode}")
        async with contextlib.AsyncExitStack() as stack:
            machine = Machine
            tracer = None
            if mode != "plain":
                host = Host(keyid_bits=6)
                serial = host.keys.add("bench", f"type=user key={os.urandom(16).hex()} tweak={os.urandom(16).hex()}",
                                       tenant="bench")
                machine = lambda c: EncryptedMachine(host, c, key_serial=serial, tenant="bench")  # noqa: E731
            if mode == "shim":
                tracer = await stack.enter_async_context(Tracer())
            start = time.perf_counter()
            vm = await stack.enter_async_context(await launch_machine(config, tracer=tracer, machine=machine))
            await vm.console.wait_for(DEBIAN_LOGIN, 1800)
            return time.perf_counter() - start


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 runs: a smoke test")
    parser.add_argument("--debian-runs", type=int, default=3, help="Debian rounds (0: skip the Debian system)")
    args = parser.parse_args()
    if args.quick:
        args.runs = min(args.runs, 2)
    for name in GUESTS:
        images.build(name)
    results: dict[str, list[tuple[float, float]]] = {n: [] for n in GUESTS}
    for _ in range(args.runs):
        for name in GUESTS:
            results[name].append(await one(name))
    print(f"{'guest':10} {'to marker (median, min-max)':>30} {'to poweroff (median)':>22}   runs={args.runs}")
    for name, runs in results.items():
        boots, dones = [r[0] for r in runs], [r[1] for r in runs]
        print(f"{name:10} {statistics.median(boots):>14.3f} s ({min(boots):.3f}-{max(boots):.3f})"
              f" {statistics.median(dones):>20.3f} s")
    last = " ".join(f"{n}_s={statistics.median([r[0] for r in runs]):.3f}" for n, runs in results.items())
    if args.debian_runs > 0:
        images.build("debian")
        deb: dict[str, list[float]] = {m: [] for m in DEBIAN_MODES}
        for _ in range(args.debian_runs):
            for mode in DEBIAN_MODES:
                deb[mode].append(await debian(mode))
        print(f"debian system to login prompt, runs={args.debian_runs}:")
        for mode, times in deb.items():
            print(f"  {mode:9} {statistics.median(times):8.2f} s ({min(times):.2f}-{max(times):.2f})")
        plain = statistics.median(deb["plain"])
        last += (f" ratio_debian={statistics.median(deb['emulated']) / plain:.3f}"
                 f" ratio_debian_shim={statistics.median(deb['shim']) / plain:.3f}")
    print(last)


if __name__ == "__main__":
    asyncio.run(main())
