"""Decrypting dumped DRAM with a key the user supplies.

Each 64-byte line at HPA ``h`` is one XTS data unit with tweak ``h`` (mktme.md §4), so any
line-aligned range decrypts on its own with :func:`qemu_mktme.engine.xts.decrypt_lines`.

Without integrity there is no way to tell a right key from a wrong one: a wrong key "decrypts"
to random-looking bytes without any error. What we can give is a hint: the entropy of the
decrypted pages. A guest's RAM is mostly zeros, code and text, far below the ~7.95 bits/byte
of ciphertext; if every decrypted page still looks random, the key is almost certainly wrong.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from ..arch.addresses import PAGE_SIZE
from ..engine.xts import XtsKey, decrypt_lines
from ..errors import AddressError
from ..files.dumpfile import Dump, Region
from .entropy import DEFAULT_THRESHOLD, page_entropy, sample_entropy
from .keyspec import key_algorithm, why_not_decryptable
from .layout import check_hpa, gpa_of, gpa_to_hpa
from ..files.atomic import atomic_output

CHUNK_NBYTES = 4 << 20
HINT_PAGES = 4096
"""The entropy hint looks at about this many pages at most (evenly sampled), so it stays cheap."""

U8 = npt.NDArray[np.uint8]


def require_decryptable(region: Region, key: XtsKey) -> None:
    """``ValueError`` if ``key`` cannot apply to ``region`` (not encrypted, TME key, other algorithm)."""
    reason = why_not_decryptable(region, key)
    if reason is not None:
        raise ValueError(f"cannot decrypt: {reason}")


def iter_plaintext(dump: Dump, region: Region, key: XtsKey | None, hpa: int, nbytes: int, *,
                   chunk_nbytes: int = CHUNK_NBYTES) -> Iterator[tuple[int, U8]]:
    """``(hpa, bytes)`` chunks of [hpa, hpa + nbytes) of ``region``, decrypted with ``key``
    (raw DRAM when ``key`` is None). ``hpa`` and ``nbytes`` are multiples of 64; the chunks
    share one buffer, so consume each before asking for the next."""
    if hpa % 64 or nbytes % 64 or chunk_nbytes % 64:
        raise ValueError("hpa, nbytes and chunk_nbytes must be multiples of 64")
    check_hpa(region, hpa, nbytes)
    src = dump.region_data(region)
    buf = np.empty(min(chunk_nbytes, nbytes), np.uint8) if key is not None else None
    for pos in range(hpa, hpa + nbytes, chunk_nbytes):
        n = min(chunk_nbytes, hpa + nbytes - pos)
        cipher = src[pos - region.hpa:pos - region.hpa + n]
        if key is None:
            yield pos, cipher
        else:
            assert buf is not None
            yield pos, decrypt_lines(key, cipher, pos, out=buf[:n])


def read_plaintext(dump: Dump, region: Region, key: XtsKey, hpa: int, nbytes: int) -> U8:
    """Plaintext of any byte range [hpa, hpa + nbytes) of ``region`` (the enclosing lines are
    decrypted), as a new array."""
    require_decryptable(region, key)
    check_hpa(region, hpa, nbytes)
    lo, hi = hpa - hpa % 64, -(-(hpa + nbytes) // 64) * 64
    out = decrypt_lines(key, dump.region_data(region)[lo - region.hpa:hi - region.hpa], lo)
    return out[hpa - lo:hpa - lo + nbytes]


@dataclass(frozen=True)
class Extract:
    """What :func:`extract` wrote: the range, and the entropy hint of the pages it covers."""

    path: str
    vm: str
    hpa: int
    gpa: int | None
    nbytes: int
    decrypted: bool
    pages: int               # 4 KiB pages covering the range (sampled when many)
    low_entropy_pages: int   # of those, pages below the threshold
    mean_bits: float
    threshold: float

    @property
    def looks_random(self) -> bool:
        """True when every covering page still looks like ciphertext (a wrong key, usually)."""
        return self.decrypted and self.low_entropy_pages == 0

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "vm": self.vm, "hpa": hex(self.hpa),
                "gpa": None if self.gpa is None else hex(self.gpa), "nbytes": self.nbytes,
                "decrypted": self.decrypted, "pages_checked": self.pages,
                "low_entropy_pages": self.low_entropy_pages, "mean_bits": round(self.mean_bits, 4),
                "threshold_bits": self.threshold, "looks_random": self.looks_random}


def resolve_range(dump: Dump, *, vm: str | None, gpa: int | None, hpa: int | None, nbytes: int) -> tuple[Region, int]:
    """The region and HPA of a range given by GPA (of ``vm``) or by HPA (``AddressError`` if
    it is not all in one VM's dumped DRAM)."""
    if (gpa is None) == (hpa is None):
        raise ValueError("give exactly one of gpa and hpa")
    if nbytes <= 0:
        raise ValueError(f"length must be positive, got {nbytes}")
    if gpa is not None:
        region = dump.region(vm)
        return region, gpa_to_hpa(region, gpa, nbytes)
    assert hpa is not None
    region = dump.region(vm) if vm is not None else dump.region_of_hpa(hpa)  # type: ignore[assignment]
    if region is None:
        spans = ", ".join(f"{r.vm} {r.hpa:#x}-{r.end - 1:#x}" for r in dump.regions)
        raise AddressError(f"HPA {hpa:#x} is not in the dump (it holds: {spans})", address=hpa, nbytes=nbytes)
    check_hpa(region, hpa, nbytes)
    return region, hpa


def extract(dump: Dump, path: str | os.PathLike[str], *, key: XtsKey | None, nbytes: int,
            gpa: int | None = None, hpa: int | None = None, vm: str | None = None, force: bool = False,
            threshold: float = DEFAULT_THRESHOLD) -> Extract:
    """Write the plaintext (raw DRAM when ``key`` is None) of a range to a new file ``path``.

    The range is ``nbytes`` at guest-physical ``gpa`` of ``vm`` (which may be omitted when the
    dump holds one VM) or at host-physical ``hpa``; it must lie in one VM's RAM. The file is
    written whole or not at all, mode 0600, and an existing file is kept unless ``force``.
    Raises ``AddressError`` (outside the dump), ``ValueError`` (the key cannot apply: another
    algorithm, an unencrypted VM), ``SnapshotError`` (the output exists or cannot be written).
    """
    region, start = resolve_range(dump, vm=vm, gpa=gpa, hpa=hpa, nbytes=nbytes)
    if key is not None:
        require_decryptable(region, key)
    lo = start - start % PAGE_SIZE                       # whole pages: the entropy hint needs them
    hi = -(-(start + nbytes) // PAGE_SIZE) * PAGE_SIZE  # regions are page aligned, so this stays inside
    npages = (hi - lo) // PAGE_SIZE
    stride = max(1, npages // HINT_PAGES)
    stride = 1 << (stride - 1).bit_length() if stride > 1 else 1   # a power of two divides the chunk's pages
    hints = []
    with atomic_output(path, force=force) as f:
        for pos, chunk in iter_plaintext(dump, region, key, lo, hi - lo):
            hints.append(sample_entropy(chunk, stride) if stride > 1 else page_entropy(chunk))
            a, b = max(pos, start), min(pos + chunk.size, start + nbytes)
            if a < b:
                f.write(chunk[a - pos:b - pos].data)
    ent = np.concatenate(hints)
    return Extract(str(path), region.vm, start, gpa_of(region, start), nbytes, key is not None, int(ent.size),
                   int(np.count_nonzero(ent < threshold)), float(ent.mean()), threshold)


__all__ = ["Extract", "extract", "iter_plaintext", "key_algorithm", "read_plaintext", "require_decryptable",
           "resolve_range"]
