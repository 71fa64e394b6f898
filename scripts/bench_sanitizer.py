#!/usr/bin/env python3
"""Cost of the KeyID-aliasing sanitizer: the shim alone vs the shim with the sanitizer on.

    .venv/bin/python scripts/bench_sanitizer.py [--runs 3] [--size-mb 64]

The stock Debian guest boots and checksums SIZE MiB (``--workload checksum``, 1 GiB RAM) under
the emulated MKTME host (a CPU-generated key; KeyID-tagged EPT, VMM page table and IOMMU) with
the TCG plugin shim attributing every access, wall time from launch to QEMU's exit. The two
variants differ only in ``Host(sanitizer=Sanitizer())``: its memory observer, table, PCONFIG
and DMA hooks and the tracer's foreign-read forwarding. Runs are interleaved (shim, sanitizer,
shim, ...) so machine noise hits both alike; medians are compared. Every run must end with no
sanitizer report (a correct host is silent).

The last line is machine-readable: ``ratio=<median sanitizer / median shim>`` (target <= 1.2).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import time

from qemu_mktme import images
from qemu_mktme.host.host import Host
from qemu_mktme.host.sanitizer import Sanitizer
from qemu_mktme.live.encrypted import EncryptedMachine
from qemu_mktme.live.launch import launch_machine
from qemu_mktme.qemu.machine import MachineConfig
from qemu_mktme.trace.tracer import Tracer


async def linux_run(size_mb: int, sanitize: bool) -> tuple[float, int]:
    """Wall time of one run and the number of sanitizer reports (0 expected)."""
    sanitizer = Sanitizer() if sanitize else None
    host = Host(keyid_bits=6, sanitizer=sanitizer)
    serial = host.keys.add("bench", "type=cpu", tenant="bench")
    boot = images.load("linux").boot(workload="checksum", params={"size_mb": size_mb})
    config = MachineConfig(boot=boot, memory="1G", name="bench")
    machine = functools.partial(EncryptedMachine, host, key_serial=serial, tenant="bench")
    start = time.perf_counter()
    async with Tracer() as tracer, await launch_machine(config, tracer=tracer, machine=machine) as vm:
        await vm.console.wait_for(r"mktme-linux: checksum bytes=\d+ sha256=\w{64}", 1800)
        rc = await vm.wait(120)
        elapsed = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"guest exited with {rc}")
    return elapsed, len(sanitizer.reports) if sanitizer is not None else 0


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):7.2f} s  ({min(xs):.2f}-{max(xs):.2f})"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each variant (default 3)")
    parser.add_argument("--size-mb", type=int, default=64, help="checksum workload size (default 64)")
    parser.add_argument("--quick", action="store_true", help="one run of each, 16 MiB (a smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.size_mb = 1, 16
    images.build("linux")
    times: dict[str, list[float]] = {"shim": [], "sanitizer": []}
    reports = 0
    for run in range(args.runs):
        for variant in (list(times) if run % 2 == 0 else list(times)[::-1]):     # rotate: no variant always first
            elapsed, n = await linux_run(args.size_mb, variant == "sanitizer")
            times[variant].append(elapsed)
            reports += n
            print(f"  run {run + 1} {variant:9} {elapsed:7.2f} s", flush=True)
    print(f"\nLinux boot + {args.size_mb} MiB checksum, 1 GiB, TCG, shim on, median of {args.runs} interleaved runs:")
    base = statistics.median(times["shim"])
    for variant, xs in times.items():
        print(f"  {variant:9} {fmt(xs)}   x{statistics.median(xs) / base:.2f}")
    print(f"  sanitizer reports over all runs: {reports} (a correct host is silent)")
    print(f"ratio={statistics.median(times['sanitizer']) / base:.3f}")


if __name__ == "__main__":
    asyncio.run(main())
