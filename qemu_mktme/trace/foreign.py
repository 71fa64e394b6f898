"""Which bytes of guest RAM hold garbage left by a write through another KeyID.

When a host or DMA write goes through a KeyID other than the guest's, every 64-byte line it
touched is garbage to the guest (the memory controller encrypted whole lines under the other
key). The guest's own later stores repair bytes: a partial store leaves the rest of the line
garbage, as MKTME hardware does (the line is read, decrypted with the guest's key, merged and
written back). So the state is byte-exact: one 64-bit mask of still-garbage bytes per line.
A guest load that reads any garbage byte is a *foreign read*; each marked line is reported
once, on the first such load, until it is marked again.

Lines are addressed by guest-RAM backend offset (like the shim's page table). This module is
pure numpy; :class:`~qemu_mktme.trace.tracer.Tracer` feeds it the shim's records in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..arch.addresses import CACHE_LINE_SHIFT as LINE_SHIFT
from ..arch.addresses import CACHE_LINE_SIZE as LINE_SIZE
from ..arch.addresses import PAGE_SHIFT
from .layout import KIND_LOAD, KIND_STORE, WATCH_LOAD, WATCH_STORE

LINES_PER_PAGE = 1 << (PAGE_SHIFT - LINE_SHIFT)
ALL_BYTES = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
_BYTE_MASKS = np.array([(1 << n) - 1 for n in range(LINE_SIZE + 1)], dtype=np.uint64)


@dataclass(frozen=True)
class ForeignHit:
    """A load that read garbage: the record's index in its batch, the line, its foreign KeyID."""

    index: int
    line_offset: int
    keyid: int
    garbage_bytes: int


class _Page:
    __slots__ = ("garbage", "keyid", "reported")

    def __init__(self) -> None:
        self.garbage = np.zeros(LINES_PER_PAGE, dtype=np.uint64)
        self.keyid = np.zeros(LINES_PER_PAGE, dtype=np.int32)
        self.reported = np.zeros(LINES_PER_PAGE, dtype=bool)

    def watch_flags(self) -> int:
        """Stores matter while any line is garbage; loads while an unreported one is."""
        marked = self.garbage != 0
        return (WATCH_STORE if marked.any() else 0) | (WATCH_LOAD if (marked & ~self.reported).any() else 0)


class ForeignLines:
    """Garbage bytes per line, by backend offset."""

    def __init__(self) -> None:
        self._pages: dict[int, _Page] = {}

    def __bool__(self) -> bool:
        return bool(self._pages)

    @property
    def pages(self) -> np.ndarray:
        """Page numbers (backend offset >> 12) that have marked lines, sorted."""
        return np.array(sorted(self._pages), dtype=np.uint64)

    def mark(self, offset: int, nbytes: int, keyid: int) -> list[int]:
        """Every line overlapping ``[offset, offset + nbytes)`` is garbage of ``keyid``; the pages."""
        first, last = offset >> LINE_SHIFT, (offset + nbytes - 1) >> LINE_SHIFT
        touched = []
        for page in range(first >> (PAGE_SHIFT - LINE_SHIFT), (last >> (PAGE_SHIFT - LINE_SHIFT)) + 1):
            p = self._pages.setdefault(page, _Page())
            lo = max(first - page * LINES_PER_PAGE, 0)
            hi = min(last - page * LINES_PER_PAGE, LINES_PER_PAGE - 1) + 1
            p.garbage[lo:hi] = ALL_BYTES
            p.keyid[lo:hi] = keyid
            p.reported[lo:hi] = False
            touched.append(page)
        return touched

    def garbage(self, offset: int, nbytes: int) -> np.ndarray:
        """Per byte of ``[offset, offset + nbytes)``: still garbage (for tests and inspection)."""
        out = np.zeros(nbytes, dtype=bool)
        for i in range(nbytes):
            o = offset + i
            p = self._pages.get(o >> PAGE_SHIFT)
            if p is not None:
                line = (o >> LINE_SHIFT) & (LINES_PER_PAGE - 1)
                out[i] = bool((int(p.garbage[line]) >> (o & (LINE_SIZE - 1))) & 1)
        return out

    def watch_flags(self, page: int) -> int:
        p = self._pages.get(page)
        return p.watch_flags() if p is not None else 0

    def process(self, offsets: np.ndarray, sizes: np.ndarray, kinds: np.ndarray) -> tuple[list[ForeignHit], set[int]]:
        """Apply one vCPU's accesses in order; the foreign reads and the pages whose state changed.

        Stores clear the bytes they write; the first load of a marked, unreported line that
        reads a garbage byte is a hit. Vectorised per line: one cumulative OR of store masks.
        An access that crosses a line boundary counts for both lines; one that crosses a page
        boundary only for its first page (the shim attributes it to that page).
        """
        hits: list[ForeignHit] = []
        changed: set[int] = set()
        if not self._pages or not len(offsets):
            return hits, changed
        offsets = offsets.astype(np.uint64)
        pages = offsets >> np.uint64(PAGE_SHIFT)
        relevant = np.isin(pages, self.pages)
        if not relevant.any():
            return hits, changed
        index = np.flatnonzero(relevant)
        off = offsets[index]
        size = np.minimum(sizes[index].astype(np.uint64), np.uint64(LINE_SIZE))
        kind = kinds[index]
        start = off & np.uint64(LINE_SIZE - 1)
        first_len = np.minimum(size, np.uint64(LINE_SIZE) - start)
        # rows: (record index, line offset, byte mask); a second row where an access spills over
        line = off & ~np.uint64(LINE_SIZE - 1)
        mask = _BYTE_MASKS[first_len.astype(np.intp)] << start
        spill = (size > first_len) & (((line + np.uint64(LINE_SIZE)) >> np.uint64(PAGE_SHIFT)) == (off >> np.uint64(PAGE_SHIFT)))
        rows_idx = np.concatenate([index, index[spill]])
        rows_line = np.concatenate([line, line[spill] + np.uint64(LINE_SIZE)])
        rows_mask = np.concatenate([mask, _BYTE_MASKS[(size - first_len)[spill].astype(np.intp)]])
        rows_kind = np.concatenate([kind, kind[spill]])
        order = np.lexsort((rows_idx, rows_line))            # by line, then in access order
        rows_idx, rows_line, rows_mask, rows_kind = (a[order] for a in (rows_idx, rows_line, rows_mask, rows_kind))
        bounds = np.flatnonzero(np.diff(rows_line)) + 1
        for lo, hi in zip(np.concatenate([[0], bounds]), np.concatenate([bounds, [len(rows_line)]])):
            line_off = int(rows_line[lo])
            page = self._pages.get(line_off >> PAGE_SHIFT)
            if page is None:
                continue
            slot = (line_off >> LINE_SHIFT) & (LINES_PER_PAGE - 1)
            g0 = page.garbage[slot]
            if not g0:
                continue
            m, k = rows_mask[lo:hi], rows_kind[lo:hi]
            stored = np.where(k == KIND_STORE, m, np.uint64(0))
            written = np.bitwise_or.accumulate(stored)
            before = g0 & ~np.concatenate([[np.uint64(0)], written[:-1]])  # garbage as each access saw it
            if not page.reported[slot]:
                read = (k == KIND_LOAD) & ((m & before) != 0)
                if read.any():
                    j = int(np.argmax(read))
                    hits.append(ForeignHit(int(rows_idx[lo + j]), line_off, int(page.keyid[slot]),
                                           int(m[j] & before[j]).bit_count()))
                    page.reported[slot] = True
                    changed.add(line_off >> PAGE_SHIFT)
            g1 = g0 & ~written[-1]
            if g1 != g0:
                page.garbage[slot] = g1
                changed.add(line_off >> PAGE_SHIFT)
        for p in list(changed):
            if not self._pages[p].garbage.any():
                del self._pages[p]
        hits.sort(key=lambda h: h.index)
        return hits, changed
