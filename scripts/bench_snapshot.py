#!/usr/bin/env python3
"""Encrypted snapshot save/restore vs QEMU's own plain full-RAM migration, and dump throughput.

    .venv/bin/python scripts/bench_snapshot.py [--runs 3] [--memory 1G]

One booted stock Linux guest (1 GiB, tenant key). Interleaved runs of (a) our encrypted save
(device state through migration with x-ignore-shared + RAM as its DRAM image, sealed and
authenticated) and (b) QEMU's plain ``migrate`` of the full RAM to a file (exec:cat), on the
same guest. Then restores, and a DRAM dump. The last line is ``ratio=<median save / median plain>``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import statistics
import tempfile
import time

from qemu_mktme.host.host import Host
from qemu_mktme.files.dumpfile import write_dump
from qemu_mktme import images
from qemu_mktme.live.encrypted import EncryptedMachine
from qemu_mktme.qemu.machine import MachineConfig, VmState, parse_size
from qemu_mktme.live.snapshot import _migration_done, restore_snapshot, save_snapshot


async def plain_migrate(vm: EncryptedMachine, path: str) -> float:
    """QEMU's own migration of everything (RAM included) to a file; the VM resumes after."""
    await vm.qmp.execute("migrate-set-capabilities",
                         {"capabilities": [{"capability": "x-ignore-shared", "state": False}]})
    start = time.perf_counter()
    await vm.qmp.execute("migrate", {"uri": f"exec:cat > {shlex.quote(path)}"})
    await _migration_done(vm, "plain migration")
    elapsed = time.perf_counter() - start
    await vm.resume()
    return elapsed


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--memory", default="1G")
    args = p.parse_args()
    image = images.build("linux")
    host, kek = Host(), os.urandom(32)
    serial = host.keys.add("bench", f"type=user key={os.urandom(16).hex()} tweak={os.urandom(16).hex()}",
                           tenant="bench")
    boot = image.boot(workload="counter", params={"period": "0.5"})
    saves, plains, restores, sizes = [], [], [], []
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        snap, plain = os.path.join(tmp, "vm.snap"), os.path.join(tmp, "plain.mig")
        config = MachineConfig(boot=boot, memory=parse_size(args.memory), name="bench")
        async with EncryptedMachine(host, config, key_serial=serial, tenant="bench") as vm:
            await vm.console.wait_for(r"count 2\n", 120)
            for _ in range(args.runs):
                r = await save_snapshot(vm, snap, kek)
                saves.append(r.seconds)
                sizes.append((r.stored_nbytes, os.path.getsize(snap)))
                plains.append(await plain_migrate(vm, plain))
                sizes[-1] += (os.path.getsize(plain),)
                os.unlink(plain)
                await vm.console.wait_for(r"count \d+\n", 30)
            await vm.pause()
            start = time.perf_counter()
            view_nbytes = sum(chunk.size for _, chunk in vm.guest.iter_dram(chunk_nbytes=16 << 20))
            view_s = time.perf_counter() - start
            start = time.perf_counter()
            d = write_dump([vm.guest], os.path.join(tmp, "dump"))
            dump_s = time.perf_counter() - start
            dump_nbytes = sum(r.nbytes for r in d.regions)
            assert vm.state is VmState.PAUSED
        for _ in range(args.runs):
            start = time.perf_counter()
            async with await restore_snapshot(Host(), snap, kek) as restored:
                restores.append(time.perf_counter() - start)
                await restored.console.wait_for(r"count \d+\n", 30)
    stored, file_nbytes, plain_nbytes = sizes[-1]
    print(f"guest: stock Debian kernel, {args.memory} RAM, booted, counter workload; {args.runs} interleaved runs")
    print(f"encrypted save    median {statistics.median(saves):6.3f} s  (runs {', '.join(f'{x:.3f}' for x in saves)})"
          f"  file {file_nbytes >> 20} MiB, RAM stored {stored >> 20} MiB")
    print(f"QEMU plain migrate median {statistics.median(plains):6.3f} s  (runs {', '.join(f'{x:.3f}' for x in plains)})"
          f"  file {plain_nbytes >> 20} MiB")
    print(f"encrypted restore median {statistics.median(restores):6.3f} s  (verify all, new QEMU, RAM, device state)")
    print(f"DRAM view         {view_nbytes / view_s / 1e9:6.2f} GB/s  (whole guest encrypted on demand, in memory)")
    print(f"DRAM dump         {dump_nbytes / dump_s / 1e9:6.2f} GB/s  ({dump_nbytes >> 20} MiB written and fsynced "
          f"in {dump_s:.2f} s to {os.environ.get('TMPDIR', '/tmp')})")
    print(f"ratio={statistics.median(saves) / statistics.median(plains):.3f}")


if __name__ == "__main__":
    asyncio.run(main())
