"""The indirect-table fast decode (``Virtqueue._linear``, byte-string checks) against the
entry-by-entry walk: for any table, linear or not, well-formed or hostile, both give the same
chain (segments and error)."""

from __future__ import annotations

import random
import struct

import pytest

from qemu_mktme.host.dma import DmaFault
from qemu_mktme.vhost.virtqueue import Chain, Virtqueue

F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4


class Ram:
    def __init__(self, size: int) -> None:
        self.b = bytearray(size)

    def read(self, iova: int, n: int) -> bytes:
        if iova + n > len(self.b):
            raise DmaFault("outside", address=iova)
        return bytes(self.b[iova:iova + n])


def walk(ram: Ram, *, fast: bool) -> tuple:
    vq = Virtqueue.__new__(Virtqueue)
    vq.mem, vq.num, vq.desc, vq.indirect, vq.max_bytes = ram, 8, 0, True, 1 << 20   # type: ignore[assignment]
    if not fast:
        vq._linear = lambda *a: False          # type: ignore[method-assign]
    chain = Chain(0)
    try:
        vq._walk(chain)
    except DmaFault:
        return ("fault",)
    return chain.readable, chain.writable, chain.error


@pytest.mark.parametrize("seed", range(4))
def test_the_fast_decode_agrees_with_the_walk(seed):
    rng = random.Random(seed)
    linear = 0
    for _ in range(2500):
        n = rng.choice([1, 2, 3, 4, 17, 130, 300])
        descs = []
        for i in range(n):
            flags = F_NEXT if i + 1 < n else 0
            if i and (i >= n // 2 or rng.random() < 0.2):
                flags |= F_WRITE
            if rng.random() < 0.03:
                flags ^= rng.choice([F_NEXT, F_WRITE, F_INDIRECT, 8, 0x100])
            nxt = i + 1 if rng.random() > 0.02 else rng.randrange(0, n + 300)
            descs.append((rng.randrange(0, 1 << 30), rng.choice([16, 4096, 1, 0, 512, 1 << 19]), flags, nxt))
        table = b"".join(struct.pack("<QIHH", *d) for d in descs)
        ram = Ram(0x1000 + len(table))
        ram.b[0x1000:] = table
        ram.b[0:16] = struct.pack("<QIHH", 0x1000, len(table), F_INDIRECT, 0)
        fast = walk(ram, fast=True)
        assert fast == walk(ram, fast=False), descs
        linear += fast[-1] is None
    assert linear > 500                        # the fast path was taken, not only the fallback
