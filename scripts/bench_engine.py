#!/usr/bin/env python3
"""Throughput of the XTS engine against raw AES-128-ECB, over one buffer, in one run.

Prints encrypt and decrypt GB/s of ``encrypt_lines``/``decrypt_lines`` (AES-XTS-128, one data
unit per 64-byte line), raw AES-128-ECB ``update_into`` GB/s on the same buffer, and the ratios.
The last line is ``ratio=<encrypt ratio>`` for scripts. Output buffers are touched before timing
so page faults are not measured; each figure is a single timed pass.

    python scripts/bench_engine.py [--mib 64]
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from qemu_mktme.engine.xts import XtsKey, decrypt_lines, encrypt_lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64, help="buffer size in MiB (at least 64)")
    args = parser.parse_args(argv)
    if args.mib < 64:
        parser.error("--mib must be at least 64")
    nbytes = args.mib << 20
    data = np.frombuffer(os.urandom(nbytes), dtype=np.uint8).copy()
    raw_out = np.ones(nbytes + 16, dtype=np.uint8)
    enc_out = np.ones(nbytes, dtype=np.uint8)
    dec_out = np.ones(nbytes, dtype=np.uint8)
    key = XtsKey(os.urandom(16), os.urandom(16))
    ecb = Cipher(algorithms.AES(os.urandom(16)), modes.ECB()).encryptor()
    hpa = 0x1_0000_0000

    ecb.update_into(data[: 1 << 20], raw_out[: (1 << 20) + 16])  # warm-up: contexts, code paths
    encrypt_lines(key, data[: 1 << 20], hpa, out=enc_out[: 1 << 20])
    decrypt_lines(key, enc_out[: 1 << 20], hpa, out=dec_out[: 1 << 20])

    t0 = time.perf_counter()
    ecb.update_into(data, raw_out)
    t_raw = time.perf_counter() - t0
    t0 = time.perf_counter()
    encrypt_lines(key, data, hpa, out=enc_out)
    t_enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    decrypt_lines(key, enc_out, hpa, out=dec_out)
    t_dec = time.perf_counter() - t0
    if not np.array_equal(dec_out, data):
        raise SystemExit("bench_engine: decrypt(encrypt(x)) != x")

    gbs = lambda t: nbytes / t / 1e9
    print(f"buffer            {args.mib} MiB, AES-XTS-128, 64-byte data units")
    print(f"raw AES-128-ECB   {gbs(t_raw):6.2f} GB/s")
    print(f"engine encrypt    {gbs(t_enc):6.2f} GB/s  ratio {t_raw / t_enc:.3f}")
    print(f"engine decrypt    {gbs(t_dec):6.2f} GB/s  ratio {t_raw / t_dec:.3f}")
    print(f"ratio={t_raw / t_enc:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
