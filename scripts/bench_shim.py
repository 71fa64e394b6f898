#!/usr/bin/env python3
"""Overhead of the TCG plugin shim doing full per-page attribution, and what the tracer sustains.

    .venv/bin/python scripts/bench_shim.py [--rounds 3] [--size-mb 64] [--baselines] [--hot-seconds 5] [--quick]

1. The stock Debian guest boots and checksums SIZE MiB (``--workload checksum``, 1 GiB RAM),
   wall time from launch to QEMU's exit, without a plugin and with the shim attributing every
   access (``Tracer()`` defaults), in interleaved rounds whose order rotates (none, shim; shim,
   none; ...) so machine noise hits both alike; medians with (min-max). ``--baselines`` adds the shim loaded but instrumenting nothing
   (``mode=none``), counting callbacks only (``mode=count``: the cost of QEMU calling a plugin
   on every access at all) and attributing without its software TLB (``tlb=False``: QEMU's
   get_hwaddr + phys_addr on every access, the naive design).
2. Events per second the Python tracer consumes: the bare-metal guest storing to one watched
   page (repeated 4 KiB fills; the guest's console limits the rate), then flooding 16 MiB of
   watched memory (the consumer's ceiling; what it cannot take is dropped and counted).

The last line is machine-readable: ``ratio=<median shim / median none>`` of QEMU's CPU time
(``RUSAGE_CHILDREN``: QEMU is this script's only child and runs alone), which other processes on
a shared machine do not inflate; the wall-time ratio is printed above it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import statistics
import time
from typing import AsyncIterator

import numpy as np

import benchlib
from qemu_mktme import images
from qemu_mktme.trace.accesses import ACCESS_DTYPE, TracerStats, accesses
from qemu_mktme.qemu.machine import Machine, MachineConfig
from qemu_mktme.trace.tracer import Tracer

VARIANTS: dict[str, dict[str, object] | None] = {
    "none": None,                                   # no plugin
    "shim": {},                                     # full attribution (the defaults)
    "loaded": {"mode": "none"},                     # the shim loaded, instrumenting nothing
    "count": {"mode": "count"},                     # callbacks that only count
    "naive": {"tlb": False},                        # hwaddr lookup on every access
}


@contextlib.asynccontextmanager
async def machine(config: MachineConfig, options: dict[str, object] | None) -> AsyncIterator[tuple[Machine, Tracer | None]]:
    if options is None:
        async with Machine(config) as vm:
            yield vm, None
        return
    tracer = Tracer(**options)                                       # type: ignore[arg-type]
    async with tracer, Machine(tracer.configure(config)) as vm:
        await tracer.start(vm)
        yield vm, tracer


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's reaped children: QEMU, run one at a time."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


async def linux_run(size_mb: int, options: dict[str, object] | None) -> tuple[float, float, TracerStats | None]:
    """(wall seconds, QEMU's CPU seconds, the shim's counters) of one boot + checksum."""
    boot = images.load("linux").boot(workload="checksum", params={"size_mb": size_mb})
    start, cpu = time.perf_counter(), children_cpu()
    async with machine(MachineConfig(boot=boot, memory="1G"), options) as (vm, tracer):
        await vm.console.wait_for(r"mktme-linux: checksum bytes=\d+ sha256=\w{64}", 1800)
        rc = await vm.wait(120)
        elapsed = time.perf_counter() - start
        if rc != 0:
            raise SystemExit(f"guest exited with {rc}")
        stats = tracer.stats() if tracer is not None else None
    return elapsed, children_cpu() - cpu, stats


async def watched_traffic(seconds: float) -> list[str]:
    """What the consumer takes from the bare-metal guest storing to watched memory (lines)."""
    page = 0x400_0000
    line = ";".join(f"fill {page:#x} 4096 {i & 0xff} 1" for i in range(150))   # 614,400 stores
    flood = 16 << 20
    boot = images.load("baremetal").boot()
    out = []
    async with machine(MachineConfig(boot=boot, memory="512M"), {}) as (vm, tracer):
        assert tracer is not None
        await vm.console.wait_for("mktme> ", 30)
        for what, nbytes, command, expect, repeat in (
                ("hot page", 4096, line, rf"ok fill {page:#x} 4096 0x95 1\n", True),
                ("flood", flood, f"fill {page:#x} {flood} 7 1", rf"ok fill {page:#x} {flood} 0x7 1\n", False)):
            consumed = 0
            watch = tracer.watch(page, nbytes, on="store")

            async def consume() -> None:
                nonlocal consumed
                async for batch in watch.batches():
                    consumed += len(batch)

            consumer = asyncio.create_task(consume())
            lost = tracer.stats().overflow
            stored_before = sum(p.traffic.stores for p in tracer.page_counters(page, nbytes))
            start = time.perf_counter()
            while True:
                await vm.console.command(command, expect, 120)
                if not repeat or time.perf_counter() - start >= seconds:
                    break
            guest = time.perf_counter() - start
            await tracer.flush()
            elapsed = time.perf_counter() - start
            watch.close()
            await consumer
            stored = sum(p.traffic.stores for p in tracer.page_counters(page, nbytes)) - stored_before
            dropped = tracer.stats().overflow - lost
            out.append(f"  {what:8} ({nbytes >> 10} KiB watched): guest stored {stored:,} in {guest:.2f} s "
                       f"({stored / guest / 1e6:.1f} M/s); consumed {consumed:,} = "
                       f"{consumed / elapsed / 1e6:.1f} M events/s; dropped {dropped:,} (counted)")
        rows = np.zeros(200_000, dtype=ACCESS_DTYPE)
        start = time.perf_counter()
        n = sum(1 for _ in accesses(rows))
        out.append(f"  per-event Access objects (async for): {n / (time.perf_counter() - start) / 1e6:.2f} M/s")
    return out


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):7.2f} s  ({min(xs):.2f}-{max(xs):.2f})"


def per_round(times: dict[str, list[float]], v: str) -> str:
    ratios = [a / b for a, b in zip(times[v], times["none"])]
    return f"rounds x{min(ratios):.2f}-{max(ratios):.2f}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    benchlib.add_common(parser, rounds=3)
    parser.add_argument("--size-mb", type=int, default=64, help="checksum workload size (default 64)")
    parser.add_argument("--baselines", action="store_true", help="also mode=none, mode=count and tlb=False")
    parser.add_argument("--hot-seconds", type=float, default=5.0, help="hot-page test length (0: skip)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.size_mb, args.hot_seconds = min(args.rounds, 1), min(args.size_mb, 8), 0
    images.build("linux")
    images.build("baremetal")
    variants = ["none", "shim"] + (["loaded", "count", "naive"] if args.baselines else [])
    times: dict[str, list[float]] = {v: [] for v in variants}
    cpus: dict[str, list[float]] = {v: [] for v in variants}
    last_stats: dict[str, TracerStats] = {}
    for run in range(args.rounds):
        for v in benchlib.order(variants, run):
            elapsed, cpu, stats = await linux_run(args.size_mb, VARIANTS[v])
            times[v].append(elapsed)
            cpus[v].append(cpu)
            if stats is not None:
                last_stats[v] = stats
            print(f"  round {run + 1} {v:6} {elapsed:7.2f} s wall {cpu:7.2f} s QEMU CPU", flush=True)
    base, cbase = statistics.median(times["none"]), statistics.median(cpus["none"])
    print(f"\nLinux boot + {args.size_mb} MiB checksum, 1 GiB, TCG, medians (min-max) of {args.rounds} interleaved rounds;")
    print("QEMU's CPU time (user + system, all its threads) is what the shim adds work to; wall time also "
          "counts the guest's idle waits and, on a shared machine, other processes:")
    for v in variants:
        print(f"  {v:6} CPU {fmt(cpus[v])}   x{statistics.median(cpus[v]) / cbase:.2f} ({per_round(cpus, v)})   "
              f"wall {fmt(times[v])}   x{statistics.median(times[v]) / base:.2f}")
    s = last_stats["shim"]
    print(f"  shim: {s.ram_accesses / 1e6:.0f} M RAM accesses attributed, software-TLB hit rate "
          f"{s.tlb_hit_rate:.3%} ({s.tlb_misses:,} misses, {s.tlb_flushes:,} flushes), verified "
          f"{s.verify_checks:,} hits with {s.verify_mismatches} mismatches, {s.decode_checks:,} decodings "
          f"with {s.decode_mismatches} mismatches")
    if args.hot_seconds > 0:
        print("\nwatched stores, bare metal, 1-byte fills, consumed as numpy batches:")
        for line in await watched_traffic(args.hot_seconds):
            print(line)
    print(f"wall ratio {statistics.median(times['shim']) / base:.3f}")
    print(f"ratio={statistics.median(cpus['shim']) / cbase:.3f}")


if __name__ == "__main__":
    asyncio.run(main())
