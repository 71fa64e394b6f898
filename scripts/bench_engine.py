#!/usr/bin/env python3
"""Throughput of the XTS engine against raw AES-128-ECB on the same buffer, interleaved rounds.

Each round times, in rotating order, over one buffer: raw AES-128-ECB (``cryptography``'s
``update_into``: OpenSSL at its best, no tweaks), the engine's ``encrypt_lines`` and
``decrypt_lines`` (AES-XTS-128, one data unit per 64-byte line, the path in use: compiled
helper or numpy), and the numpy reference path. Times are the calling thread's CPU time
(``time.thread_time``), so other processes on a shared machine cost neither side; wall time is
printed beside. Then, for context, the engine in 2 threads over the two halves of the buffer
(wall time; the helper releases the GIL). Output buffers are touched before timing.

Figures are medians with (min-max) over the rounds; the last line is
``ratio=<median ECB time / median engine encrypt time>`` (engine throughput over raw AES).

    python scripts/bench_engine.py [--mib 64] [--rounds 9] [--quick]
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

import benchlib
from qemu_mktme.engine import native, xts
from qemu_mktme.engine.xts import XtsKey, decrypt_lines, encrypt_lines

HPA = 0x1_0000_0000


def timed(fn) -> tuple[float, float]:
    """(thread CPU seconds, wall seconds) of one call."""
    c0, w0 = time.thread_time(), time.perf_counter()
    fn()
    return time.thread_time() - c0, time.perf_counter() - w0


def in_threads(key: XtsKey, data: np.ndarray, out: np.ndarray, n: int) -> float:
    """Wall seconds for n threads each encrypting 1/n of the buffer."""
    step = data.size // n // 64 * 64
    parts = [(i * step, data.size if i == n - 1 else (i + 1) * step) for i in range(n)]
    barrier = threading.Barrier(n + 1)

    def work(lo: int, hi: int) -> None:
        encrypt_lines(key, data[lo:lo + 64], HPA + lo, out=out[lo:lo + 64])  # this thread's context
        barrier.wait()
        encrypt_lines(key, data[lo:hi], HPA + lo, out=out[lo:hi])

    threads = [threading.Thread(target=work, args=p) for p in parts]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="buffer size in MiB (default 64)")
    benchlib.add_common(parser, rounds=9)
    args = parser.parse_args(argv)
    if args.quick:
        args.mib, args.rounds = min(args.mib, 8), min(args.rounds, 3)
    if args.mib < 1 or args.rounds < 1:
        parser.error("--mib and --rounds must be positive")
    nbytes = args.mib << 20
    data = np.frombuffer(os.urandom(nbytes), dtype=np.uint8).copy()
    raw_out = np.ones(nbytes + 16, dtype=np.uint8)
    enc_out = np.ones(nbytes, dtype=np.uint8)
    dec_out = np.ones(nbytes, dtype=np.uint8)
    ref_out = np.ones(nbytes, dtype=np.uint8)
    key = XtsKey(os.urandom(16), os.urandom(16))
    ecb = Cipher(algorithms.AES(os.urandom(16)), modes.ECB()).encryptor()

    def numpy_encrypt() -> None:
        saved = xts._helper
        xts._helper = lambda: None  # the reference path, in this thread only for this call
        try:
            encrypt_lines(key, data, HPA, out=ref_out)
        finally:
            xts._helper = saved

    variants = {
        "raw AES-128-ECB": lambda: ecb.update_into(data, raw_out),
        "engine encrypt": lambda: encrypt_lines(key, data, HPA, out=enc_out),
        "engine decrypt": lambda: decrypt_lines(key, enc_out, HPA, out=dec_out),
        "numpy encrypt": numpy_encrypt,
    }
    for fn in variants.values():  # warm-up: contexts, code paths, the helper's build
        fn()
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    wall: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name in benchlib.order(list(variants), r):
            c, w = timed(variants[name])
            cpu[name].append(c)
            wall[name].append(w)
    if not np.array_equal(dec_out, data):
        raise SystemExit("bench_engine: decrypt(encrypt(x)) != x")
    if not np.array_equal(ref_out, enc_out):
        raise SystemExit("bench_engine: the engine and the numpy reference disagree")
    threads = {1: [], 2: []}
    for r in range(args.rounds):
        for n in benchlib.order([1, 2], r):
            threads[n].append(in_threads(key, data, enc_out, n))

    gbs = lambda xs: nbytes / benchlib.median(xs) / 1e9
    raw = cpu["raw AES-128-ECB"]
    print(f"buffer {args.mib} MiB, AES-XTS-128, 64-byte data units; engine: {native.status()}")
    print(f"{args.rounds} interleaved rounds; medians (min-max); CPU time of the calling thread, wall beside")
    for name in variants:
        ratio = "" if name == "raw AES-128-ECB" else f"  ratio {benchlib.ratio_spread(raw, cpu[name])}"
        print(f"  {name:16} {gbs(cpu[name]):6.2f} GB/s  cpu {benchlib.spread(cpu[name])} s  "
              f"wall {benchlib.spread(wall[name])} s{ratio}")
    t1, t2 = threads[1], threads[2]
    print(f"  engine, 1 thread  {gbs(t1):6.2f} GB/s wall; 2 threads {gbs(t2):6.2f} GB/s wall "
          f"(speed-up {benchlib.median(t1) / benchlib.median(t2):.2f}x, ratio to 1-thread raw AES wall "
          f"{benchlib.median(wall['raw AES-128-ECB']) / benchlib.median(t2):.3f}; {os.cpu_count()} CPUs, shared)")
    print(f"ratio={benchlib.median(raw) / benchlib.median(cpu['engine encrypt']):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
