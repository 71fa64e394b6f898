#!/usr/bin/env python3
"""Throughput of the dump inspection tools on a dump of at least 512 MiB.

Builds the dump the way a capture does (the host model over numpy RAM, ``write_dump``): one VM
whose RAM is random bytes with 1% text pages, 1% zero pages and a secret, under a user key;
then a second dump after the guest changed 4096 scattered lines. Times, best and median of
``--repeat`` runs, with the dumps in the page cache:

    entropy           per-page entropy of the whole dump
    search raw        a literal (absent) and a regex over the ciphertext
    search decrypted  a literal over the plaintext under the VM's key (decrypt + find + hint)
    diff              the two dumps, 16-byte blocks
    decrypt           the whole VM range decrypted in memory (the XTS engine over the mapped dump),
                      and to a file (+ write and fsync: bound by the disk)

    .venv/bin/python scripts/bench_inspect.py [--size-mib 512] [--repeat 3] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qemu_mktme.engine.xts import XtsKey  # noqa: E402
from qemu_mktme.arch.guestmap import GuestRange  # noqa: E402
from qemu_mktme.host.host import Host  # noqa: E402
from qemu_mktme.inspect.decrypt import extract, iter_plaintext  # noqa: E402
from qemu_mktme.inspect.diff import diff_dumps  # noqa: E402
from qemu_mktme.files.dumpfile import Dump, write_dump  # noqa: E402
from qemu_mktme.inspect.entropy import dump_entropy  # noqa: E402
from qemu_mktme.inspect.search import Pattern, search  # noqa: E402

MIB = 1 << 20
TEXT = (b"It was a bright cold day in April, and the clocks were striking thirteen. " * 60)[:4096]
SECRET = b"BENCH-SECRET-7f3a9c"


def build(base: Path, size: int) -> tuple[Dump, Dump, XtsKey]:
    rng = np.random.default_rng(2024)
    key, tweak = rng.bytes(16), rng.bytes(16)
    host = Host(keyid_bits=6)
    serial = host.keys.add("bench", f"type=user key={key.hex()} tweak={tweak.hex()}", tenant="bench")
    ram = np.frombuffer(bytearray(rng.bytes(size)), np.uint8)
    pages = ram.reshape(-1, 4096)
    chosen = rng.choice(pages.shape[0], size // 4096 // 50, replace=False)
    pages[chosen[::2]] = np.frombuffer(TEXT, np.uint8)             # 1% text
    pages[chosen[1::2]] = 0                                         # 1% zeros
    ram[size // 2 + 123:size // 2 + 123 + len(SECRET)] = np.frombuffer(SECRET, np.uint8)
    guest = host.add_guest("vm", ram, [GuestRange(0, size, 0)], key_serial=serial, tenant="bench")
    d1 = write_dump([guest], base / "d1")
    lines = rng.choice(size // 64, 4096, replace=False) * 64
    for line in lines:
        ram[line:line + 16] ^= 0xFF
    d2 = write_dump([guest], base / "d2")
    return d1, d2, XtsKey(key, tweak)


def measure(label: str, nbytes: int, repeat: int, fn) -> None:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    best, med = min(times), statistics.median(times)
    print(f"{label:<28} {nbytes / best / 1e9:6.2f} GB/s best  {nbytes / med / 1e9:6.2f} GB/s median  "
          f"({best:.3f} s for {nbytes >> 20} MiB)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=512, help="VM RAM in MiB (default 512, the minimum that counts)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--dir", default=tempfile.gettempdir(), help="where to write the dumps (default: the temp dir)")
    p.add_argument("--quick", action="store_true", help="64 MiB, 1 repeat: a smoke test")
    args = p.parse_args()
    if args.quick:
        args.size_mib, args.repeat = min(args.size_mib, 64), 1
    size = args.size_mib * MIB
    base = Path(tempfile.mkdtemp(prefix="bench-inspect-", dir=args.dir))
    try:
        t0 = time.perf_counter()
        d1, d2, key = build(base, size)
        print(f"built two dumps of {args.size_mib} MiB in {time.perf_counter() - t0:.1f} s ({os.cpu_count()} CPUs, "
              f"numpy {np.__version__})")
        measure("entropy", size, args.repeat, lambda: dump_entropy(d1))
        measure("search raw, literal", size, args.repeat,
                lambda: search(d1, Pattern(SECRET.decode()), max_matches=None))
        measure("search raw, regex", size, args.repeat,
                lambda: search(d1, Pattern(r"BENCH-SECRET-[0-9a-f]{6}", regex=True), max_matches=None))
        found = search(d1, Pattern(SECRET.decode()), key=key)
        assert [m.gpa for m in found.matches] == [size // 2 + 123], found.matches
        measure("search decrypted, literal", size, args.repeat,
                lambda: search(d1, Pattern(SECRET.decode()), key=key, max_matches=None))
        changed = diff_dumps(d1, d2).regions[0].changed_blocks
        assert changed == 4096, changed
        measure("diff", size, args.repeat, lambda: diff_dumps(d1, d2))
        region = d1.region()
        measure("decrypt, in memory", size, args.repeat,
                lambda: [None for _ in iter_plaintext(d1, region, key, region.hpa, region.nbytes)])
        out = base / "plain.bin"
        measure("decrypt to file (fsync)", size, args.repeat,
                lambda: extract(d1, out, key=key, gpa=0, nbytes=size, vm="vm", force=True))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
