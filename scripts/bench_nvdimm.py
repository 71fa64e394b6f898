#!/usr/bin/env python3
"""Launch-to-prompt and shutdown of the Linux guest with a 256 MiB NVDIMM: encrypted (its media
image verified, decrypted into the private backend through the VM's KeyID at launch, the DRAM
view written back as a new image at shutdown) vs the same NVDIMM unencrypted (stock QEMU's file
backend on a plain file, which QEMU reads and writes itself).

    .venv/bin/python scripts/bench_nvdimm.py [--rounds 5] [--size-mb 256] [--quick]

Both variants run under the host model (user key, KeyID-tagged EPT/VMM/IOMMU for RAM), so the
difference is the NVDIMM's: two AES-XTS passes through the engine's native helper and the
SHA-256 digests of the media image. Rounds are interleaved (benchlib). Launch-to-prompt is from
the start to the guest's boot marker (``mktme-linux: boot``: /init ran, the nfit/nd_pmem modules
are loaded); shutdown from the guest's poweroff marker until the VM is closed (QEMU gone, the
media image on disk). By default the guest leaves the module alone (workload hello): shutdown
computes the DRAM view and its digests and, every unit being unchanged, writes nothing;
``--guest-writes`` has the guest write 4 MiB (workload pmem) so that shutdown writes the changed
unit back (in place, through the media's redo journal). The last line is machine-readable:
``launch_s=<enc> launch_plain_s=<plain> shutdown_s=<enc> shutdown_plain_s=<plain> ratio=<(launch+shutdown) enc/plain>``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from qemu_mktme import images  # noqa: E402
from qemu_mktme.host.host import Host  # noqa: E402
from qemu_mktme.live.encrypted import EncryptedMachine  # noqa: E402
from qemu_mktme.live.nvdimm import NvdimmMedia  # noqa: E402
from qemu_mktme.qemu.machine import MachineConfig  # noqa: E402
from qemu_mktme.qemu.nvdimm import NvdimmBackend  # noqa: E402

BOOTED = r"mktme-linux: boot kernel="
DONE = r"mktme-linux: poweroff"
KEY = os.urandom(16).hex()
TWEAK = os.urandom(16).hex()


async def one(directory: Path, size: int, encrypted: bool, writes: bool = False) -> tuple[float, float]:
    host = Host(keyid_bits=6)
    serial = host.keys.add("bench:vm", f"type=user algorithm=aes-xts-128 key={KEY} tweak={TWEAK}", tenant="bench")
    image = images.load("linux")
    boot = image.boot(workload="pmem", params={"mode": "write", "size_mb": 4}) if writes else image.boot(workload="hello")
    config = MachineConfig(name="bench", memory="1G", boot=boot)
    if encrypted:
        vm = EncryptedMachine(host, config, key_serial=serial, tenant="bench",
                              nvdimms=[NvdimmMedia(directory / "media.img", size)], warn=lambda _line: None)
    else:
        plain = NvdimmBackend(size, path=directory / "plain.img")
        vm = EncryptedMachine(host, dataclasses.replace(config, nvdimms=(plain,)),
                              key_serial=serial, tenant="bench")
    start = time.perf_counter()
    async with vm:
        await vm.console.wait_for(BOOTED, 120)
        launched = time.perf_counter() - start
        await vm.console.wait_for(DONE, 120)
        stop = time.perf_counter()
        await vm.wait(60)
    return launched, time.perf_counter() - stop


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    benchlib.add_common(parser, rounds=5)
    parser.add_argument("--size-mb", type=int, default=256, help="NVDIMM size (default 256)")
    parser.add_argument("--guest-writes", action="store_true",
                        help="the guest writes 4 MiB to /dev/pmem0 (workload pmem): shutdown writes the changed unit "
                             "(default: workload hello, the module unchanged: shutdown checks it, writes nothing)")
    args = parser.parse_args()
    rounds, size = (2, 32 << 20) if args.quick else (args.rounds, args.size_mb << 20)
    images.build("linux")
    with tempfile.TemporaryDirectory(prefix="bench-nvdimm-", dir=os.environ.get("BENCH_DIR")) as tmp:
        directory = Path(tmp)
        # a full module on both sides: random bytes (ciphertext-like) in the plain file, and a
        # media image the first encrypted run writes from the same amount of data
        with open(directory / "plain.img", "wb") as f:
            f.write(np.random.default_rng(1).bytes(size))
        await one(directory, size, True)        # creates the media image (and warms both paths)
        await one(directory, size, False)
        figures: dict[str, list[tuple[float, float]]] = {"encrypted": [], "plain": []}

        def variant(name: str):
            async def run() -> float:
                launched, shutdown = await one(directory, size, name == "encrypted", args.guest_writes)
                figures[name].append((launched, shutdown))
                return launched + shutdown
            return run
        times = await benchlib.ainterleave({name: variant(name) for name in figures}, rounds)
    enc, plain = figures["encrypted"], figures["plain"]
    for label, idx in (("launch-to-prompt", 0), ("shutdown", 1)):
        print(f"{label:17} encrypted {benchlib.spread([x[idx] for x in enc])} s, "
              f"plain {benchlib.spread([x[idx] for x in plain])} s")
    ratio = benchlib.median(times["encrypted"]) / benchlib.median(times["plain"])
    print(f"launch+shutdown   encrypted {benchlib.spread(times['encrypted'])} s, plain {benchlib.spread(times['plain'])} s, "
          f"ratio {benchlib.ratio_spread(times['encrypted'], times['plain'])} (target <= 1.3), "
          f"{size >> 20} MiB NVDIMM, {'guest writes' if args.guest_writes else 'module unchanged'}, "
          f"load {os.getloadavg()[0]:.1f}")
    print(f"launch_s={benchlib.median([x[0] for x in enc]):.3f} launch_plain_s={benchlib.median([x[0] for x in plain]):.3f} "
          f"shutdown_s={benchlib.median([x[1] for x in enc]):.3f} shutdown_plain_s={benchlib.median([x[1] for x in plain]):.3f} "
          f"ratio={ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
