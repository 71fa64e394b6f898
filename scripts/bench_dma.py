#!/usr/bin/env python3
"""Disk speed and cost of the stock Linux guest on three data paths (medians of interleaved rounds):

(a) our vhost-user-blk backend, every DMA through the host model's IOMMU (VT-d walk + KeyID);
(b) the same backend with the model BYPASSED (the memfd mapped directly): the baseline for (a);
(c) QEMU's own virtio-blk on a plain QEMU (no emulation): what a user would otherwise run.

The guest's shell (workload ``shell``) is driven over the console, phases timed on the host:
SIZE MiB sequential write then read with dd (direct I/O, 1 MiB requests; the write ends with
fsync, i.e. a FLUSH), then COUNT random 4 KiB direct reads, COUNT random 4 KiB direct writes and
COUNT mixed ones (70 % reads) at queue depth 1, and COUNT random reads by 4 jobs at once (up to
4 requests in flight), after an untimed 32 MiB warm-up read; the host's page cache is written
back (sync) before each phase, untimed. The random phases run
``scripts/guest_rio.c`` (fio's psync engine in miniature; busybox has no fio, and a dd per I/O
would time the guest's process start-up), built static with the host's gcc and appended to the
guest's initramfs as a second cpio archive. Both paths use the same host cache mode
(``--cache writeback``, QEMU's default, or ``--cache none``: O_DIRECT on both).

Cost: CPU seconds per MiB moved, of the backend (this process, which runs it for (a) and (b),
its queue threads' polling of an empty ring included; it only reads the console for (c)) and of
QEMU's threads other than its vCPUs (the main loop and I/O workers that run QEMU's virtio-blk for
(c)). Also printed: the ratios round by round (their spread), the requests our backend found by
polling (no kick) and the time it watched per request, the guest's virtio-blk interrupts per
request, and how busy QEMU's vCPU thread was (CPU time / phase time: below 1, it waited, e.g.
for QEMU's big lock).

    .venv/bin/python scripts/bench_dma.py [--rounds 3] [--size-mb 256] [--count 3000] [--cache none]
        [--phases randread,randread4] [--modes a,c] [--image-dir /dev/shm] [--poll-max-ns 0]

``--image-dir /dev/shm`` takes the host's storage out of the comparison (tmpfs takes O_DIRECT
since Linux 6.6); ``--poll-max-ns 0`` measures our backend without polling.

Last line: ``ratio=<worst (a)/(c) throughput of the six phases>``; targets (issue 27): every
(a)/(c) >= 0.9 and (a)/(b) >= 0.95.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from qemu_mktme import images
from qemu_mktme.images import cpio
from qemu_mktme.host.host import Host
from qemu_mktme.live.encrypted import EncryptedMachine
from qemu_mktme.qemu.devices import DiskSpec
from qemu_mktme.qemu.machine import Machine, MachineConfig
from qemu_mktme.vhost import native
from qemu_mktme.vhost.blk import POLL_MAX_NS

MODES = {"a": "vhost + IOMMU model", "b": "vhost, model bypassed", "c": "QEMU virtio-blk"}
PHASES = ("seqwrite", "seqread", "randread", "randwrite", "mixed", "randread4")
LABELS = ("seq write", "seq read", "rand read", "rand write", "mixed", "rread x4")
DONE = "done=42"                      # what $((6*7)) prints: the typed command's echo never matches
RIO = Path(__file__).with_name("guest_rio.c")


def commands(size_mb: int, count: int) -> dict[str, str]:
    blocks = size_mb * 256
    rio = f"rio /dev/vda {{op}} {count} {blocks} 7 {{jobs}} >/dev/null"
    return {
        "seqwrite": f"dd if=/dev/zero of=/dev/vda bs=1M count={size_mb} oflag=direct conv=fsync 2>/dev/null",
        "seqread": f"dd if=/dev/vda of=/dev/null bs=1M count={size_mb} iflag=direct 2>/dev/null",
        "randread": rio.format(op="r", jobs=1),
        "randwrite": rio.format(op="w", jobs=1),
        "mixed": rio.format(op="m", jobs=1),
        "randread4": rio.format(op="r", jobs=4),
    }


def initrd_with_rio(boot_initrd: str, tmp: str) -> str:
    """The guest's initramfs with ``bin/rio`` appended (a second newc archive, which the kernel
    unpacks over the first)."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise SystemExit("bench_dma: gcc is needed to build the guest's I/O tool (scripts/guest_rio.c)")
    binary = os.path.join(tmp, "rio")
    subprocess.run([gcc, "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", binary, str(RIO)], check=True)
    out = os.path.join(tmp, "initrd-rio")
    with open(out, "wb") as f:
        with open(boot_initrd, "rb") as src:
            shutil.copyfileobj(src, f)
        f.write(b"\0" * (-f.tell() % 4))
        cpio.write(f, [cpio.file("bin/rio", Path(binary).read_bytes(), 0o755)])
    return out


def qemu_io_cpu(pid: int, vcpus: set[int], *, of_vcpus: bool = False) -> float:
    """CPU seconds of QEMU's threads other than its vCPUs (thread ids from query-cpus-fast), or of
    its vCPUs (``of_vcpus``)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        if (int(task.name) in vcpus) != of_vcpus:
            continue
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


async def interrupts(vm: Machine) -> int:
    """Interrupts the guest's virtio-blk queues have taken (its /proc/interrupts)."""
    found = await vm.console.command("echo irq=$(awk '/virtio.*req/ {for (i = 2; i < NF; i++) if ($i ~ /^[0-9]+$/) "
                                     "s += $i} END {print s + 0}' /proc/interrupts)", re.compile(r"irq=(\d+)\s"), 60)
    return int(found.group(1))


async def one(mode: str, disk: str, initrd: str, size_mb: int, count: int, cache: str,
              phases: tuple[str, ...], poll: int | None, cpus: int = 1) -> dict[str, float]:
    image = images.load("linux")
    boot = dataclasses.replace(image.boot(workload="shell"), initrd=Path(initrd))
    spec = DiskSpec.parse(f"{disk},format=raw,dma={'qemu' if mode == 'c' else 'vhost'},cache={cache}"
                          + (f",poll-max-ns={poll}" if poll is not None and mode != "c" else ""))
    config = MachineConfig(boot=boot, memory="1G", name=f"bench-dma-{mode}", disks=(spec,), cpus=cpus)
    if mode == "c":
        vm: Machine = Machine(config)
    else:
        host = Host(keyid_bits=6)
        serial = host.keys.add("bench", "type=cpu", tenant="bench")
        vm = EncryptedMachine(host, config, key_serial=serial, tenant="bench", dma_bypass=mode == "b")
    out: dict[str, float] = {}
    cmds = commands(size_mb, count)
    async with vm:
        await vm.console.wait_for("mktme-linux: shell", 600)
        await vm.console.command("while [ ! -b /dev/vda ]; do sleep 0.1; done; rio /dev/vda r 1 1 1 >/dev/null "
                                 "&& echo done=$((6*7))", DONE, 600)
        # untimed warm-up: this process maps the dd buffers' guest pages on first touch (QEMU's
        # own mapping was populated while the guest booted)
        await vm.console.command(f"{commands(min(size_mb, 32), 0)['seqread']}; echo done=$((6*7))", DONE, 600)
        assert vm.pid is not None
        vcpus = {int(c["thread-id"]) for c in await vm.qmp.execute("query-cpus-fast")}
        cpu0, io0 = time.process_time(), qemu_io_cpu(vm.pid, vcpus)
        for phase in phases:
            # untimed: the host writes back what the last phase dirtied now, not during this one
            await asyncio.to_thread(os.sync)
            irq0 = await interrupts(vm)
            vcpu0 = qemu_io_cpu(vm.pid, vcpus, of_vcpus=True)
            before = vm.dma_counters()["disk0"] if isinstance(vm, EncryptedMachine) else {}
            start = time.perf_counter()
            await vm.console.command(f"{cmds[phase]}; echo done=$((6*7))", DONE, 3600)
            out[phase] = time.perf_counter() - start
            out[f"{phase}_vcpu"] = (qemu_io_cpu(vm.pid, vcpus, of_vcpus=True) - vcpu0) / out[phase]
            out[f"{phase}_irqs"] = await interrupts(vm) - irq0
            if isinstance(vm, EncryptedMachine):      # requests the guest sent, and merged into one I/O
                after = vm.dma_counters()["disk0"]
                for key in ("requests", "merged"):
                    out[f"{phase}_{key}"] = after[key] - before[key]
        out["backend_cpu"] = time.process_time() - cpu0
        out["qemu_io_cpu"] = qemu_io_cpu(vm.pid, vcpus) - io0
        if isinstance(vm, EncryptedMachine):
            c = vm.dma_counters()["disk0"]
            assert c.get("sanitizer", 0) == 0, "DMA through a foreign KeyID during the benchmark"
            assert c.get("faults", 0) == 0 and c["errors"] == 0, f"DMA faults or request errors: {c}"
            out["native_share"] = c["native"] / max(1, c["requests"])
            out["poll_share"] = c["poll_hits"] / max(1, c["requests"])
            out["poll_us"] = c["poll_us"] / max(1, c["requests"])
            out["poll_backoffs"] = c["poll_backoffs"]
        await vm.console.write("exit\r")
        await vm.wait(120)
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--cache", choices=("writeback", "none"), default="writeback")
    parser.add_argument("--quick", action="store_true", help="one round, 32 MiB, 100 random I/Os (a smoke test)")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    parser.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of a,b,c (a is needed)")
    parser.add_argument("--poll-max-ns", type=int, help="our backend's polling bound for (a) and (b) "
                        f"(default: the backend's, {POLL_MAX_NS}; 0: never poll)")
    parser.add_argument("--cpus", type=int, default=1, help="the guest's vCPUs (and queues of each path)")
    parser.add_argument("--image-dir", help="where the disk image lives (default: a temporary directory under "
                        "TMPDIR; /dev/shm takes the host's storage out of the comparison)")
    args = parser.parse_args()
    phases = tuple(p for p in args.phases.split(",") if p)
    modes = tuple(m for m in args.modes.split(",") if m)
    if not phases or set(phases) - set(PHASES):
        parser.error(f"--phases: choose from {','.join(PHASES)}")
    if "a" not in modes or set(modes) - set(MODES) or len(set(modes)) != len(modes):
        parser.error("--modes: a, with b and/or c")
    if args.quick:
        args.rounds, args.size_mb, args.count = 1, 32, 300
    images.build("linux")
    boot_initrd = images.load("linux").boot(workload="shell").initrd
    assert boot_initrd is not None
    results: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-dma-") as tmp, \
            tempfile.TemporaryDirectory(prefix="bench-dma-", dir=args.image_dir) as image_dir:
        initrd = initrd_with_rio(str(boot_initrd), tmp)
        disk = os.path.join(image_dir, "disk.img")
        with open(disk, "wb") as f:                 # allocated, not sparse: every path rewrites blocks
            for _ in range(args.size_mb + 16):
                f.write(bytes(1 << 20))
            os.fsync(f.fileno())
        for r in range(args.rounds):                  # interleaved, each round starting elsewhere
            for mode in modes[r % len(modes):] + modes[:r % len(modes)]:
                results[mode].append(await one(mode, disk, initrd, args.size_mb, args.count, args.cache, phases,
                                               args.poll_max_ns, args.cpus))
    keys = (*phases, "backend_cpu", "qemu_io_cpu")
    med = {m: {k: statistics.median(r[k] for r in runs) for k in keys} for m, runs in results.items()}
    mb = args.size_mb * (1 << 20) / 1e6
    moved_mib = sum(args.size_mb if p.startswith("seq") else args.count * 4096 / (1 << 20) for p in phases)
    labels = {p: label for p, label in zip(PHASES, LABELS)}

    def speed(m: str, phase: str, t: float | None = None) -> float:
        return (mb if phase.startswith("seq") else args.count) / (med[m][phase] if t is None else t)

    print(f"{'path':26} " + " ".join(f"{labels[p]:>10}" for p in phases) + f" {'backend':>9} {'QEMU I/O':>9}")
    print(f"{'':26} " + " ".join(f"{'MB/s' if p.startswith('seq') else 'IOPS':>10}" for p in phases)
          + f" {'ms/MiB':>9} {'ms/MiB':>9}")
    for m in modes:
        print(f"({m}) {MODES[m]:22} " + " ".join(f"{speed(m, p):>10.1f}" for p in phases)
              + f" {1000 * med[m]['backend_cpu'] / moved_mib:>9.3f} {1000 * med[m]['qemu_io_cpu'] / moved_mib:>9.3f}")
    worst = []
    for other in modes[1:]:
        ratios = {p: speed("a", p) / speed(other, p) for p in phases}
        print(f"(a)/({other}): " + ", ".join(f"{p} {r:.2f}" for p, r in ratios.items()))
        # the same ratio round by round (a round runs each path once, back to back): the spread
        spread = {p: sorted(b[p] / a[p] for a, b in zip(results["a"], results[other])) for p in phases}
        print("  per round: " + ", ".join(f"{p} {v[0]:.2f}-{v[-1]:.2f} (median {statistics.median(v):.2f})"
                                         for p, v in spread.items()))
        if other == "c":
            worst.append(min(ratios.values()))
    print(f"rounds={args.rounds} size={args.size_mb} MiB count={args.count} cache={args.cache} cpus={args.cpus} "
          f"image in {args.image_dir or tempfile.gettempdir()} "
          f"load before={load[0]:.2f} after={os.getloadavg()[0]:.2f}")
    print(f"vhost backend: {native.status()}; requests it served: "
          + ", ".join(f"({m}) {100 * statistics.median(r['native_share'] for r in results[m]):.0f} %"
                      for m in modes if m != "c"))
    print("requests found by polling (no kick needed), and the time spent watching a request: " + ", ".join(
        f"({m}) {100 * statistics.median(r['poll_share'] for r in results[m]):.0f} % "
        f"{statistics.median(r['poll_us'] for r in results[m]):.0f} us "
        f"({statistics.median(r['poll_backoffs'] for r in results[m]):.0f} back-offs: CPU wanted)"
        for m in modes if m != "c")
          + f" (poll-max-ns={POLL_MAX_NS if args.poll_max_ns is None else args.poll_max_ns})")
    print("(a) requests a phase (of them served by a preceding adjacent one's I/O): " + ", ".join(
        f"{labels[p]} {statistics.median(r[p + '_requests'] for r in results['a']):.0f} "
        f"({statistics.median(r[p + '_merged'] for r in results['a']):.0f})" for p in phases))
    print("interrupts a request: " + "; ".join(f"({m}) " + ", ".join(
        f"{labels[p]} {statistics.median(r[p + '_irqs'] for r in results[m]) / (args.count if not p.startswith('seq') else max(1, statistics.median(r[p + '_requests'] for r in results['a']))):.2f}"
        for p in phases) for m in modes))
    print("vCPU busy (CPU time / phase time): " + "; ".join(f"({m}) " + ", ".join(
        f"{labels[p]} {statistics.median(r[p + '_vcpu'] for r in results[m]):.2f}" for p in phases) for m in modes))
    if worst:
        print(f"ratio={min(worst):.3f}")


if __name__ == "__main__":
    asyncio.run(main())
