#!/usr/bin/env python3
"""Disk throughput of the stock Linux guest on three data paths (medians of interleaved rounds):

(a) our vhost-user-blk backend, every DMA through the host model's IOMMU (VT-d walk + KeyID);
(b) the same backend with the model BYPASSED (the memfd mapped directly): the baseline for (a);
(c) QEMU's own virtio-blk on a plain QEMU (no emulation): the alternative at its best.

The guest (workload ``diskbench``) writes then reads SIZE MiB sequentially with dd (direct I/O,
1 MiB requests) and does COUNT random 4 KiB direct reads (one dd each: busybox has no fio, so
IOPS include the guest's process start-up, identically for every path). Phases are timed on the
host from the guest's console markers.

    .venv/bin/python scripts/bench_dma.py [--rounds 3] [--size-mb 256] [--count 2000]

Last line: ``ratio=<(a)/(b) sequential read>``; targets: ratio >= 0.8, (a) within 2x of (c).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time

from qemu_mktme import images
from qemu_mktme.host.host import Host
from qemu_mktme.live.encrypted import EncryptedMachine
from qemu_mktme.qemu.devices import DiskSpec
from qemu_mktme.qemu.machine import Machine, MachineConfig

MODES = {"a": "vhost + IOMMU model", "b": "vhost, model bypassed", "c": "QEMU virtio-blk"}
PHASES = ("seqwrite", "seqread", "randread")


async def one(mode: str, disk: str, size_mb: int, count: int) -> dict[str, float]:
    image = images.load("linux")
    boot = image.boot(workload="diskbench", params={"size_mb": size_mb, "count": count})
    spec = DiskSpec.parse(f"{disk},format=raw,dma={'qemu' if mode == 'c' else 'vhost'}")
    config = MachineConfig(boot=boot, memory="1G", name=f"bench-dma-{mode}", disks=(spec,))
    if mode == "c":
        vm: Machine = Machine(config)
    else:
        host = Host(keyid_bits=6)
        serial = host.keys.add("bench", "type=cpu", tenant="bench")
        vm = EncryptedMachine(host, config, key_serial=serial, tenant="bench", dma_bypass=mode == "b")
    times: dict[str, float] = {}
    async with vm:
        for phase in PHASES:
            await vm.console.wait_for(f"mktme-linux: bench {phase} start", 600)
            start = time.perf_counter()
            await vm.console.wait_for(f"mktme-linux: bench {phase} done", 3600)
            times[phase] = time.perf_counter() - start
        await vm.wait(120)
        if isinstance(vm, EncryptedMachine):
            c = vm.dma_counters()["disk0"]
            assert c.get("sanitizer", 0) == 0, "DMA through a foreign KeyID during the benchmark"
    return times


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="one round, 32 MiB, 200 random reads (a smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.size_mb, args.count = 1, 32, 200
    images.build("linux")
    results: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="bench-dma-") as tmp:
        disk = os.path.join(tmp, "disk.img")
        with open(disk, "wb") as f:
            f.truncate((args.size_mb + 16) << 20)
        for _ in range(args.rounds):
            for mode in MODES:
                results[mode].append(await one(mode, disk, args.size_mb, args.count))
    med = {m: {p: statistics.median(r[p] for r in runs) for p in PHASES} for m, runs in results.items()}
    print(f"{'path':32} {'seq write MB/s':>15} {'seq read MB/s':>14} {'rand 4K IOPS':>13}   "
          f"rounds={args.rounds} size={args.size_mb} MiB count={args.count}")
    mb = args.size_mb * (1 << 20) / 1e6
    for m, t in med.items():
        print(f"({m}) {MODES[m]:28} {mb / t['seqwrite']:>15.1f} {mb / t['seqread']:>14.1f} {args.count / t['randread']:>13.1f}")
    ratio = med["b"]["seqread"] / med["a"]["seqread"]            # (a)/(b) in throughput
    a_vs_c = med["a"]["seqread"] / med["c"]["seqread"]
    print(f"(a) vs (c): seq read {a_vs_c:.2f}x the time of QEMU's virtio-blk, seq write "
          f"{med['a']['seqwrite'] / med['c']['seqwrite']:.2f}x, rand read {med['a']['randread'] / med['c']['randread']:.2f}x")
    print(f"ratio={ratio:.3f}")


if __name__ == "__main__":
    asyncio.run(main())
