#!/usr/bin/env python3
"""Every scripts/bench_*.py in turn (their output streams through), then one table of the figures.

Each benchmark prints its own medians; the table takes the last ``ratio=`` word of those that
compare against a baseline, with the target the project holds them to. ``--quick`` passes
``--quick`` on (a smoke run: the figures are not worth comparing). Exit status 1 if a
benchmark failed, not if a target is missed: the table says that.

    python scripts/bench_all.py [--quick] [--only engine,shim]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# name, what the ratio compares, target (op, value); None: no baseline, no ratio
BENCHES: list[tuple[str, str, tuple[str, float] | None]] = [
    ("boot", "launch -> boot marker (no ratio)", None),
    ("engine", "XTS engine encrypt / raw AES-128-ECB throughput, 1 thread", (">=", 0.6)),
    ("shim", "Linux boot + checksum with the shim / without, QEMU CPU time", ("<=", 1.5)),
    ("snapshot", "encrypted save / QEMU migrate unthrottled, both fsynced", ("<=", 1.2)),
    ("inspect", "dump inspection throughput (no ratio)", None),
    ("dma", "disk through our vhost-user-blk + IOMMU model / QEMU virtio-blk, worst of 6 phases", (">=", 0.9)),
    ("attest", "attested launch / launch with local key files, bare-metal guest", ("<=", 1.5)),
    ("sanitizer", "Linux boot + checksum with shim + sanitizer / shim alone", ("<=", 1.2)),
    ("migrate", "TLS live migration, emulated + attestation + key / plain QEMU", ("<=", 1.2)),
    ("attack", "engine line accesses, freshness mode / none, CPU time (extra accesses printed)", None),
    ("nvdimm", "encrypted vNVDIMM launch + shutdown / the same NVDIMM on a plain file backend", ("<=", 1.3)),
    ("fleet", "libvirt migration between namespaced machines, opted-in / plain domain", ("<=", 1.2)),
]
RATIO_LINE = {"fleet": "migrate-ratio="}
"""The line a benchmark prints its ratio on, when not ``ratio=`` (bench_fleet prints two)."""


def run(name: str, quick: bool) -> tuple[int, str | None, float]:
    key = RATIO_LINE.get(name, "ratio=")
    cmd = [sys.executable, str(HERE / f"bench_{name}.py")] + (["--quick"] if quick else [])
    print(f"\n=== {' '.join(cmd[1:])}", flush=True)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    ratio = None
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        for word in line.split():                       # "ratio=X", alone or among other KEY=VALUE words
            if word.startswith(key):
                ratio = word.removeprefix(key)
    return proc.wait(), ratio, time.monotonic() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke run: few rounds, small inputs")
    p.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(b[0] for b in BENCHES))
    args = p.parse_args()
    only = {x for x in args.only.split(",") if x}
    rows, failed = [], False
    for name, what, target in BENCHES:
        if only and name not in only:
            continue
        rc, ratio, seconds = run(name, args.quick)
        failed |= rc != 0
        verdict = ""
        if rc != 0:
            verdict = f"FAILED (exit {rc})"
        elif target and ratio is not None:
            op, value = target
            met = float(ratio) >= value if op == ">=" else float(ratio) <= value
            verdict = f"target {op} {value}: {'met' if met else 'NOT met'}"
        rows.append((name, what, ratio or "-", verdict, seconds))
    print(f"\n{'benchmark':10} {'ratio':>7}  {'verdict':26} {'took':>6}  what")
    for name, what, ratio, verdict, seconds in rows:
        print(f"{name:10} {ratio:>7}  {verdict:26} {seconds:5.0f}s  {what}")
    if args.quick:
        print("(--quick: smoke run, figures not comparable)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
