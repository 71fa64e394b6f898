#!/usr/bin/env python3
"""Wall time from launching QEMU to the guest's boot marker, for both guests (median of N runs).

    .venv/bin/python scripts/bench_boot.py [--runs 5]

Runs are interleaved (baremetal, linux, baremetal, ...) so that machine noise hits both alike.
The last line is machine-readable: ``baremetal_s=<median> linux_s=<median>``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from qemu_mktme import images
from qemu_mktme.qemu.machine import Machine, MachineConfig

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


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 runs: a smoke test")
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
    print(" ".join(f"{n}_s={statistics.median([r[0] for r in runs]):.3f}" for n, runs in results.items()))


if __name__ == "__main__":
    asyncio.run(main())
