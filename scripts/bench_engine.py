#!/usr/bin/env python3
"""Throughput of the XTS engine against raw AES-128-ECB on the same buffer, interleaved rounds.

Each round times, in rotating order, over one buffer: raw AES-128-ECB twice, no tweaks: through
``cryptography``'s ``update_into`` (the OpenSSL it bundles) and through the system libcrypto's
EVP, the one the compiled helper calls (ctypes; one call over the whole buffer); the engine's
``encrypt_lines`` and ``decrypt_lines`` (AES-XTS-128, one data unit per 64-byte line, the path
in use: compiled helper with its best kernel, or numpy), the helper's SSE2 kernel when AVX2 is
the one in use, and the numpy reference path. The baseline of the ratio is the faster ECB.
Times are the calling thread's CPU time (``time.thread_time``), so other processes on a shared
machine cost neither side; wall time is printed beside. Then, for context, the engine in 2
threads over the two halves of the buffer (wall time; the helper releases the GIL), and the
engine against ECB in 1 MiB calls (a snapshot's chunks: in cache, so the AES work, not memory,
sets the pace). Output buffers are touched before timing.

Figures are medians with (min-max) over the rounds; the last line is
``ratio=<median time of the faster ECB / median engine encrypt time>`` (engine throughput over
raw AES). Run it from a checkout: it imports the ``qemu_mktme`` beside it.

    python scripts/bench_engine.py [--mib 64] [--rounds 9] [--quick]
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's qemu_mktme

import benchlib

from qemu_mktme.engine import native, xts
from qemu_mktme.engine.xts import XtsKey, decrypt_lines, encrypt_lines

HPA = 0x1_0000_0000
CHUNK = 1 << 20


def timed(fn) -> tuple[float, float]:
    """(thread CPU seconds, wall seconds) of one call."""
    c0, w0 = time.thread_time(), time.perf_counter()
    fn()
    return time.thread_time() - c0, time.perf_counter() - w0


def system_ecb(key: bytes):
    """AES-128-ECB through the system libcrypto's EVP (the compiled helper's OpenSSL): a function
    encrypting a whole buffer into an out buffer in one EVP call."""
    lib = ctypes.CDLL(ctypes.util.find_library("crypto") or "libcrypto.so.3")
    vp, c_int = ctypes.c_void_p, ctypes.c_int
    lib.EVP_CIPHER_CTX_new.restype = vp
    lib.EVP_aes_128_ecb.restype = vp
    lib.EVP_EncryptInit_ex.argtypes = [vp, vp, vp, ctypes.c_char_p, vp]
    lib.EVP_CIPHER_CTX_set_padding.argtypes = [vp, c_int]
    lib.EVP_EncryptUpdate.argtypes = [vp, vp, ctypes.POINTER(c_int), vp, c_int]
    ctx = lib.EVP_CIPHER_CTX_new()
    if not ctx or lib.EVP_EncryptInit_ex(ctx, lib.EVP_aes_128_ecb(), None, key, None) != 1:
        raise SystemExit("bench_engine: the system libcrypto's AES-128-ECB is unavailable")
    lib.EVP_CIPHER_CTX_set_padding(ctx, 0)
    outl = c_int()

    def run(data: np.ndarray, out: np.ndarray) -> None:
        if lib.EVP_EncryptUpdate(ctx, out.ctypes.data, ctypes.byref(outl), data.ctypes.data, data.size) != 1:
            raise SystemExit("bench_engine: EVP_EncryptUpdate failed")

    lib.OpenSSL_version.restype = ctypes.c_char_p
    lib.OpenSSL_version.argtypes = [c_int]
    run.version = lib.OpenSSL_version(0).decode()  # type: ignore[attr-defined]
    return run


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
    sys_out = np.ones(nbytes, dtype=np.uint8)
    key = XtsKey(os.urandom(16), os.urandom(16))
    ecb_key = os.urandom(16)
    ecb = Cipher(algorithms.AES(ecb_key), modes.ECB()).encryptor()
    sys_ecb = system_ecb(ecb_key)
    lib = xts._helper()
    sse2_out = np.ones(nbytes, dtype=np.uint8)

    def numpy_encrypt() -> None:
        saved = xts._helper
        xts._helper = lambda: None  # the reference path, in this thread only for this call
        try:
            encrypt_lines(key, data, HPA, out=ref_out)
        finally:
            xts._helper = saved

    def sse2_encrypt() -> None:
        native.set_isa(lib, "sse2")
        try:
            encrypt_lines(key, data, HPA, out=sse2_out)
        finally:
            native.set_isa(lib, "avx2")  # the kernel in use (this runs only then)

    raw_names = ["raw AES-128-ECB", "raw ECB, libcrypto"]
    variants = {
        raw_names[0]: lambda: ecb.update_into(data, raw_out),
        raw_names[1]: lambda: sys_ecb(data, sys_out),
        "engine encrypt": lambda: encrypt_lines(key, data, HPA, out=enc_out),
        "engine decrypt": lambda: decrypt_lines(key, enc_out, HPA, out=dec_out),
    }
    if lib is not None and native.isa(lib) == "avx2":
        variants["engine sse2"] = sse2_encrypt
    variants["numpy encrypt"] = numpy_encrypt
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
    if "engine sse2" in variants and not np.array_equal(sse2_out, enc_out):
        raise SystemExit("bench_engine: the helper's SSE2 and AVX2 kernels disagree")
    if not np.array_equal(raw_out[:nbytes], sys_out):
        raise SystemExit("bench_engine: the two ECBs disagree")
    threads = {1: [], 2: []}
    for r in range(args.rounds):
        for n in benchlib.order([1, 2], r):
            threads[n].append(in_threads(key, data, enc_out, n))
    chunk = min(CHUNK, nbytes)

    def chunked(fn) -> None:
        for lo in range(0, nbytes, chunk):
            fn(lo, lo + chunk)

    small = {  # 1 MiB calls, as a snapshot's chunks: in cache, below the streaming-store size
        "ecb": lambda: chunked(lambda lo, hi: ecb.update_into(data[lo:hi], raw_out[lo:hi + 16])),
        "engine": lambda: chunked(lambda lo, hi: encrypt_lines(key, data[lo:hi], HPA + lo, out=enc_out[lo:hi])),
    }
    small_cpu: dict[str, list[float]] = {name: [] for name in small}
    for r in range(args.rounds):
        for name in benchlib.order(list(small), r):
            small_cpu[name].append(timed(small[name])[0])

    gbs = lambda xs: nbytes / benchlib.median(xs) / 1e9
    raw_name = min(raw_names, key=lambda name: benchlib.median(cpu[name]))
    raw = cpu[raw_name]
    from cryptography.hazmat.backends.openssl import backend

    print(f"buffer {args.mib} MiB, AES-XTS-128, 64-byte data units; engine: {native.status()}")
    print(f"ECB: cryptography's {backend.openssl_version_text()}; libcrypto: {sys_ecb.version}")
    print(f"{args.rounds} interleaved rounds; medians (min-max); CPU time of the calling thread, wall beside; "
          f"ratios to {raw_name} (the faster ECB)")
    for name in variants:
        ratio = "" if name == raw_name else f"  ratio {benchlib.ratio_spread(raw, cpu[name])}"
        print(f"  {name:18} {gbs(cpu[name]):6.2f} GB/s  cpu {benchlib.spread(cpu[name])} s  "
              f"wall {benchlib.spread(wall[name])} s{ratio}")
    t1, t2 = threads[1], threads[2]
    print(f"  engine, 1 thread  {gbs(t1):6.2f} GB/s wall; 2 threads {gbs(t2):6.2f} GB/s wall "
          f"(speed-up {benchlib.median(t1) / benchlib.median(t2):.2f}x, ratio to 1-thread raw AES wall "
          f"{benchlib.median(wall[raw_name]) / benchlib.median(t2):.3f}; {os.cpu_count()} CPUs, shared)")
    print(f"  {chunk >> 20} MiB calls (snapshot chunks): engine {gbs(small_cpu['engine']):.2f} GB/s, raw "
          f"AES-128-ECB {gbs(small_cpu['ecb']):.2f} GB/s, ratio {benchlib.ratio_spread(small_cpu['ecb'], small_cpu['engine'])}")
    print(f"ratio={benchlib.median(raw) / benchlib.median(cpu['engine encrypt']):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
