#!/usr/bin/env python3
"""What freshness costs: the SGX-MEE-like counter tree mode vs MKTME as shipped (``none``).

    .venv/bin/python scripts/bench_attack.py [--rounds 5] [--accesses 20000] [--quick]

The same stream of CPU accesses goes through the engine on two platforms that differ only in
``mitigation``: whole 64-byte lines through a private KeyID (a tenant's key, KEYID_SET_KEY_RANDOM)
over a 4 MiB working set, 70 % loads and 30 % stores, half sequential and half random (a seeded
stream: both platforms get the same addresses). Under ``freshness`` every line has a version in
the tweak and the MAC, checked on loads and moved on by stores, and the counter tree
(:class:`qemu_mktme.engine.integrity.CounterTree`: MAC line, version line and tree nodes up to
the on-die root, an on-chip cache of node lines) counts the extra memory accesses each access
costs. Rounds are interleaved (benchlib), times are the calling thread's CPU time.

Printed: extra modelled memory accesses per guest access (loads, stores, all), time per access
in each mode, and last ``ratio=<median freshness time / median none time>``.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's qemu_mktme

import benchlib

from qemu_mktme.arch import pconfig as pc
from qemu_mktme.engine.platform import Platform

BASE = 0x4000_0000
WORKING_SET = 4 << 20
LINE = 64


def platform(mitigation: str) -> Platform:
    p = Platform(mitigation=mitigation)
    p.bios_activate(keyid_bits=6)
    s = pc.KeyProgramStruct.for_algorithm(1, pc.Command.KEYID_SET_KEY_RANDOM, p.algorithms[0])
    p.memory.write(0x1000, s.pack())
    if p.pconfig(0, 0x1000).zf:
        raise SystemExit("PCONFIG failed")
    return p


def stream(n: int, seed: int = 26) -> list[tuple[int, bool]]:
    """(line address, is_store) pairs: half sequential, half random over the working set."""
    rng = random.Random(seed)
    lines = WORKING_SET // LINE
    out, cursor = [], 0
    for i in range(n):
        if i % 2:
            line = rng.randrange(lines)
        else:
            line, cursor = cursor, (cursor + 1) % lines
        out.append((BASE + line * LINE, rng.random() < 0.3))
    return out


def run(p: Platform, accesses: list[tuple[int, bool]]) -> float:
    """Thread CPU seconds for the stream (every line written once first, untimed)."""
    keyid_bits = p.layout
    data = bytes(range(64))
    for hpa, _ in accesses:
        p.memory.write(keyid_bits.compose(hpa, 1), data)
    t0 = time.thread_time()
    for hpa, store in accesses:
        pa = keyid_bits.compose(hpa, 1)
        if store:
            p.memory.write(pa, data)
        else:
            p.memory.read(pa, LINE)
    return time.thread_time() - t0


def extra_by_kind(accesses: list[tuple[int, bool]]) -> tuple[float, float, float]:
    """Extra modelled accesses per load, per store and per access, on a fresh freshness platform."""
    p = platform("freshness")
    layout = p.layout
    for hpa, _ in accesses:
        p.memory.write(layout.compose(hpa, 1), bytes(64))
    tree = p.memory.integrity.freshness
    assert tree is not None
    loads = stores = 0
    extra_loads = extra_stores = 0
    for hpa, store in accesses:
        before = tree.extra
        if store:
            p.memory.write(layout.compose(hpa, 1), bytes(64))
            stores += 1
            extra_stores += tree.extra - before
        else:
            p.memory.read(layout.compose(hpa, 1), LINE)
            loads += 1
            extra_loads += tree.extra - before
    return extra_loads / max(loads, 1), extra_stores / max(stores, 1), (extra_loads + extra_stores) / len(accesses)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    benchlib.add_common(parser, rounds=5)
    parser.add_argument("--accesses", type=int, default=20000, help="line accesses per round (default 20000)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.accesses = 2, 2000
    accesses = stream(args.accesses)
    per_load, per_store, per_access = extra_by_kind(accesses)
    times = benchlib.interleave({m: (lambda m=m: run(platform(m), accesses)) for m in ("none", "freshness")},
                                args.rounds)
    tree = platform("freshness").memory.integrity.freshness
    assert tree is not None
    print(f"{args.accesses} line accesses (70 % loads, half random) over {WORKING_SET >> 20} MiB through a private KeyID, "
          f"{args.rounds} interleaved rounds, thread CPU time")
    print(f"counter tree: {tree.levels} levels above the version lines, {tree.cache_lines} node lines cached on chip")
    print(f"extra modelled memory accesses per guest access: loads {per_load:.2f}, stores {per_store:.2f}, "
          f"all {per_access:.2f} (a guest access is 1)")
    for mode, xs in times.items():
        us = [x / args.accesses * 1e6 for x in xs]
        print(f"  {mode:9} {benchlib.spread(xs)} s   {benchlib.median(us):.1f} us per access")
    print(f"freshness / none time: {benchlib.ratio_spread(times['freshness'], times['none'])}")
    print(f"ratio={benchlib.median(times['freshness']) / benchlib.median(times['none']):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
