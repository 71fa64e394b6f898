#!/usr/bin/env python3
"""Encrypted snapshot save vs QEMU's own full-RAM migration to a file, made fair; its stages.

    .venv/bin/python scripts/bench_snapshot.py [--rounds 5] [--memory 512M] [--data-mb 256] [--quick]

One booted stock Linux guest (tenant key) whose shell fills DATA MiB of tmpfs. Interleaved rounds
(order rotating) of:

* ``save``: our encrypted, authenticated save (device state through migration with
  x-ignore-shared, RAM as its DRAM image sealed under the per-snapshot key, fsync, rename);
* ``migrate``: QEMU's plain ``migrate`` of the same guest, RAM included, to a file
  (``exec:cat``) with ``max-bandwidth`` raised as ``virsh save`` does (QEMU 7.2's default is
  128 MiB/s), then ``fsync`` of the file: the same durability as our save;
* the same two without any fsync (ours with ``os.fsync`` stubbed for the call), and QEMU's
  migration at its default 128 MiB/s (context: the throttled baseline this used to compare with).

Each side writes a new file (the previous one is removed untimed). Every save also records its stages: device state, DRAM view (the engine encrypting RAM; zero
chunks skipped), sealing (AES-GCM), writing, finish (device state, manifest), fsync and the rest
(pause, resume, rename). Then restores, a DRAM dump and the chunk-sealing costs in the same run.
Medians with (min-max); the last line is ``ratio=<median save / median fsynced unthrottled migrate>``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import tempfile
import time
from collections import defaultdict
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import benchlib
from qemu_mktme import images
from qemu_mktme.files import snapfile
from qemu_mktme.files.dumpfile import write_dump
from qemu_mktme.host.guest import EncryptedGuest
from qemu_mktme.host.host import Host
from qemu_mktme.live import snapshot
from qemu_mktme.live.encrypted import EncryptedMachine
from qemu_mktme.live.snapshot import _migration_done, restore_snapshot, save_snapshot
from qemu_mktme.arch.sizes import parse_size
from qemu_mktme.qemu.machine import MachineConfig, VmState

UNTHROTTLED = 1 << 40  # bytes/s: what virsh save sets (libvirt: "unlimited")
QEMU_DEFAULT_BANDWIDTH = 128 << 20


class Stages:
    """Seconds per save stage, gathered by wrapping the functions a save calls (bench only)."""

    def __init__(self) -> None:
        self.current: dict[str, float] = defaultdict(float)
        self.rounds: list[dict[str, float]] = []

    def add(self, stage: str, seconds: float) -> None:
        self.current[stage] += seconds

    def close_round(self, total: float) -> None:
        known = sum(self.current.values())
        self.current["other (pause, resume, rename)"] = total - known
        self.rounds.append(dict(self.current))
        self.current = defaultdict(float)


@contextlib.contextmanager
def instrumented(stages: Stages):
    """Time device state, DRAM view, seal, write, finish and fsync inside save_snapshot."""
    orig_ds, orig_iter = snapshot._save_device_state, EncryptedGuest.iter_dram
    orig_init, orig_add, orig_finish, orig_fsync = snapfile.Writer.__init__, snapfile.Writer.add_chunk, \
        snapfile.Writer.finish, os.fsync

    async def device_state(vm: Any) -> bytes:
        t = time.perf_counter()
        try:
            return await orig_ds(vm)
        finally:
            stages.add("device state", time.perf_counter() - t)

    def iter_dram(self: Any, *args: Any, **kwargs: Any):
        it = orig_iter(self, *args, **kwargs)
        while True:
            t = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                stages.add("DRAM view", time.perf_counter() - t)
                return
            stages.add("DRAM view", time.perf_counter() - t)
            yield item

    class TimedFile:
        def __init__(self, f: Any) -> None:
            self._f = f

        def write(self, data: Any) -> int:
            t = time.perf_counter()
            try:
                return self._f.write(data)
            finally:
                stages.add("write", time.perf_counter() - t)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._f, name)

    def init(self: Any, f: Any, kek: bytes) -> None:
        orig_init(self, TimedFile(f), kek)

    def add_chunk(self: Any, offset: int, data: Any) -> None:
        t, w = time.perf_counter(), stages.current["write"]
        orig_add(self, offset, data)
        stages.add("seal (AES-GCM)", time.perf_counter() - t - (stages.current["write"] - w))

    def finish(self: Any, *args: Any) -> None:
        t, w = time.perf_counter(), stages.current["write"]
        orig_finish(self, *args)
        stages.add("finish (device state, manifest)", time.perf_counter() - t - (stages.current["write"] - w))

    def fsync(fd: int) -> None:
        t = time.perf_counter()
        try:
            orig_fsync(fd)
        finally:
            stages.add("fsync", time.perf_counter() - t)

    snapshot._save_device_state, EncryptedGuest.iter_dram = device_state, iter_dram
    snapfile.Writer.__init__, snapfile.Writer.add_chunk, snapfile.Writer.finish = init, add_chunk, finish
    os.fsync = fsync
    try:
        yield
    finally:
        snapshot._save_device_state, EncryptedGuest.iter_dram = orig_ds, orig_iter
        snapfile.Writer.__init__, snapfile.Writer.add_chunk, snapfile.Writer.finish = orig_init, orig_add, orig_finish
        os.fsync = orig_fsync


@contextlib.contextmanager
def no_fsync():
    orig = os.fsync
    os.fsync = lambda fd: None
    try:
        yield
    finally:
        os.fsync = orig


async def plain_migrate(vm: EncryptedMachine, path: str, bandwidth: int, sync: bool) -> float:
    """QEMU's own migration of everything (RAM included) to a file, fsynced if ``sync``; the
    VM resumes after (not timed)."""
    await vm.qmp.execute("migrate-set-capabilities",
                         {"capabilities": [{"capability": "x-ignore-shared", "state": False}]})
    await vm.qmp.execute("migrate-set-parameters", {"max-bandwidth": bandwidth})
    start = time.perf_counter()
    await vm.qmp.execute("migrate", {"uri": f"exec:cat > {shlex.quote(path)}"})
    await _migration_done(vm, "plain migration")
    if sync:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    elapsed = time.perf_counter() - start
    await vm.resume()
    os.unlink(path)
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
    p.add_argument("--memory", default="512M")
    p.add_argument("--data-mb", type=int, default=256, help="MiB of tmpfs data the guest writes (default 256)")
    benchlib.add_common(p, rounds=5)
    args = p.parse_args()
    if args.quick:
        args.rounds, args.data_mb = min(args.rounds, 2), min(args.data_mb, 32)
    image = images.build("linux")
    host, kek = Host(), os.urandom(32)
    serial = host.keys.add("bench", f"type=user key={os.urandom(16).hex()} tweak={os.urandom(16).hex()}",
                           tenant="bench")
    boot = image.boot(workload="shell")
    stages = Stages()
    restores: list[float] = []
    tmpdir = tempfile.gettempdir()  # on a real disk (tmpfs makes fsync free): set TMPDIR
    with tempfile.TemporaryDirectory(dir=tmpdir) as tmp:
        snap, plain = os.path.join(tmp, "vm.snap"), os.path.join(tmp, "plain.mig")
        config = MachineConfig(boot=boot, memory=parse_size(args.memory), name="bench")
        async with EncryptedMachine(host, config, key_serial=serial, tenant="bench") as vm:
            await vm.console.wait_for(r"mktme-linux: shell", 120)
            # 1 MiB of text by doubling, then DATA copies of it: busybox tools, few system calls
            fill = ("echo qemu-mktme-bench > /tmp/m; i=0; while [ $i -lt 16 ]; do cat /tmp/m /tmp/m > /tmp/n; "
                    f"mv /tmp/n /tmp/m; i=$((i+1)); done; i=0; while [ $i -lt {args.data_mb} ]; do cat /tmp/m; "
                    "i=$((i+1)); done > /tmp/fill; rm /tmp/m; echo fi''ll-done")
            await vm.console.command(fill, r"fill-done", 300)

            def fresh() -> None:
                """Both sides write a new file: replacing an old one would add its deletion to
                the save's rename (QEMU's side writes to a path removed after each round)."""
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(snap)

            async def save() -> float:
                fresh()
                start = time.perf_counter()
                with instrumented(stages):
                    await save_snapshot(vm, snap, kek)
                elapsed = time.perf_counter() - start
                stages.close_round(elapsed)
                return elapsed

            async def save_nosync() -> float:
                fresh()
                start = time.perf_counter()
                with no_fsync():
                    await save_snapshot(vm, snap, kek)
                return time.perf_counter() - start

            variants = {
                "save": save,
                "migrate": lambda: plain_migrate(vm, plain, UNTHROTTLED, True),
                "save nosync": save_nosync,
                "migrate nosync": lambda: plain_migrate(vm, plain, UNTHROTTLED, False),
            }
            if not args.quick:
                variants["migrate 128MiB/s"] = lambda: plain_migrate(vm, plain, QEMU_DEFAULT_BANDWIDTH, True)
            times = await benchlib.ainterleave(variants, args.rounds)
            stored = os.path.getsize(snap)
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
        for _ in range(1 if args.quick else args.rounds):
            start = time.perf_counter()
            async with await restore_snapshot(Host(), snap, kek) as restored:
                restores.append(time.perf_counter() - start)
                await restored.console.command("echo restored-ok", r"restored-ok", 60)
    print(f"\nguest: stock Debian kernel, {args.memory} RAM, {args.data_mb} MiB of tmpfs data, shell; snapshot file "
          f"{stored >> 20} MiB in {tmpdir}; {args.rounds} interleaved rounds, medians (min-max), seconds")
    for name, xs in times.items():
        print(f"  {name:17} {benchlib.spread(xs)}")
    print(f"  save / migrate, both fsynced       {benchlib.ratio_spread(times['save'], times['migrate'])}")
    print(f"  save / migrate, neither fsynced    {benchlib.ratio_spread(times['save nosync'], times['migrate nosync'])}")
    print("save stages (median over the 'save' rounds):")
    for stage in stages.rounds[0]:
        xs = [r.get(stage, 0.0) for r in stages.rounds]
        print(f"  {stage:33} {benchlib.spread(xs)}")
    print(f"restore           {benchlib.spread(restores)} s (checks, new QEMU, each chunk read once, authenticated "
          "and decrypted into RAM, device state)")
    print(f"DRAM view         {view_nbytes / view_s / 1e9:6.2f} GB/s  (whole guest encrypted on demand, in memory)")
    print(f"DRAM dump         {dump_nbytes / dump_s / 1e9:6.2f} GB/s  ({dump_nbytes >> 20} MiB written and fsynced "
          f"in {dump_s:.2f} s to {tmpdir})")
    gmac, gcm, gcm_open, sealed_nbytes = sealing
    print(f"chunk sealing     format 1 GMAC tag {sealed_nbytes / gmac / 1e9:5.2f} GB/s, format 2 AES-GCM encrypt "
          f"{sealed_nbytes / gcm / 1e9:5.2f} GB/s, decrypt {sealed_nbytes / gcm_open / 1e9:5.2f} GB/s "
          f"({sealed_nbytes >> 20} MiB of DRAM image)")
    print(f"ratio={benchlib.median(times['save']) / benchlib.median(times['migrate']):.3f}")


if __name__ == "__main__":
    asyncio.run(main())
