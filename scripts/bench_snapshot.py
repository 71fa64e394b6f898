#!/usr/bin/env python3
"""Encrypted snapshot save/restore vs QEMU's own plain full-RAM migration, and dump throughput.

    .venv/bin/python scripts/bench_snapshot.py [--runs 3] [--memory 1G]

One booted stock Linux guest (1 GiB, tenant key). Interleaved runs of (a) our encrypted save
(device state through migration with x-ignore-shared + RAM as its DRAM image, sealed and
authenticated) and (b) QEMU's plain ``migrate`` of the full RAM to a file (exec:cat), on the
same guest. Then restores, and a DRAM dump. Then the cost of format 2's chunk sealing in the
same run: over the guest's stored chunks (their DRAM images, computed once), format 1's GMAC tag
(AES-GCM with the chunk as associated data, no ciphertext) against format 2's AES-GCM encryption
and, for restore, decryption. The last line is ``ratio=<median save / median plain>``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import statistics
import tempfile
import time

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

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


def seal_costs(vm: EncryptedMachine, chunk_nbytes: int = 1 << 20) -> tuple[float, float, float, int]:
    """Seconds to seal the guest's non-zero 1 MiB chunks as format 1 (GMAC) and format 2 (AES-GCM
    encrypt, then decrypt), best of 3 each, and the bytes sealed."""
    ram = np.frombuffer(vm.ram.backend, np.uint8)
    chunks = [bytes(vm.guest.dram_array(off, chunk_nbytes)) for off in range(0, vm.ram.size, chunk_nbytes)
              if ram[off:off + chunk_nbytes].any()]
    aead, aad = AESGCM(os.urandom(32)), b"chunk" + bytes(40)
    nonces = [i.to_bytes(12, "little") for i in range(len(chunks))]

    def best(fn) -> float:
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    gmac = best(lambda: [aead.encrypt(n, b"", aad + c) for n, c in zip(nonces, chunks)])
    gcm = best(lambda: [aead.encrypt(n, c, aad) for n, c in zip(nonces, chunks)])
    sealed = [aead.encrypt(n, c, aad) for n, c in zip(nonces, chunks)]
    gcm_open = best(lambda: [aead.decrypt(n, c, aad) for n, c in zip(nonces, sealed)])
    return gmac, gcm, gcm_open, sum(len(c) for c in chunks)


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
            sealing = seal_costs(vm)
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
    print(f"encrypted restore median {statistics.median(restores):6.3f} s  (checks, new QEMU, each chunk read once, authenticated and decrypted into RAM, device state)")
    print(f"DRAM view         {view_nbytes / view_s / 1e9:6.2f} GB/s  (whole guest encrypted on demand, in memory)")
    print(f"DRAM dump         {dump_nbytes / dump_s / 1e9:6.2f} GB/s  ({dump_nbytes >> 20} MiB written and fsynced "
          f"in {dump_s:.2f} s to {os.environ.get('TMPDIR', '/tmp')})")
    gmac, gcm, gcm_open, sealed_nbytes = sealing
    print(f"chunk sealing     format 1 GMAC tag {sealed_nbytes / gmac / 1e9:5.2f} GB/s, format 2 AES-GCM encrypt "
          f"{sealed_nbytes / gcm / 1e9:5.2f} GB/s, decrypt {sealed_nbytes / gcm_open / 1e9:5.2f} GB/s "
          f"({sealed_nbytes >> 20} MiB of DRAM image: +{(gcm - gmac) * 1e3:.0f} ms per save)")
    print(f"ratio={statistics.median(saves) / statistics.median(plains):.3f}")


if __name__ == "__main__":
    asyncio.run(main())
