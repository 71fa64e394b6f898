"""Diff two dumps of the same VM at 16-byte-block granularity: what deterministic XTS reveals.

AES-XTS with tweak = HPA is deterministic per 16-byte block: a block whose plaintext changed
has a new ciphertext, and only that block (the tweak chain stays within its data unit, and each
block's whitening depends on its position only), while a block whose plaintext did not change
keeps its ciphertext exactly. A bus observer who takes two snapshots of DRAM therefore learns
*which* 16-byte blocks, 64-byte lines and pages the VM wrote between them, without any key.

How it is fast: both files are memory-mapped and compared in 8 MiB chunks as uint64 words
(two per block); only the pages with a change are looked at further, so an unchanged GiB costs
one vectorised compare.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ..arch.addresses import CACHE_LINE_SIZE, PAGE_SIZE
from ..files.dumpfile import Dump, Region
from .layout import BLOCK_NBYTES, gpa_boundaries, hpa_to_gpa, runs

CHUNK_NBYTES = 8 << 20
BLOCKS_PER_LINE = CACHE_LINE_SIZE // BLOCK_NBYTES
BLOCKS_PER_PAGE = PAGE_SIZE // BLOCK_NBYTES
KEY_CHANGE_FRACTION = 0.5
"""Above this fraction of changed blocks, the VM's key (not its data) most likely changed."""

I64 = npt.NDArray[np.int64]


@dataclass(frozen=True)
class BlockRun:
    """Consecutive changed 16-byte blocks [hpa, hpa + nbytes) with one GPA mapping."""

    hpa: int
    gpa: int | None
    nbytes: int

    @property
    def first_line(self) -> int:
        return self.hpa - self.hpa % CACHE_LINE_SIZE

    @property
    def lines(self) -> int:
        return -(-(self.hpa + self.nbytes) // CACHE_LINE_SIZE) - self.hpa // CACHE_LINE_SIZE

    def edge_masks(self) -> list[tuple[int, int]]:
        """(line HPA, changed-block mask) of the run's partially changed lines (bit j = block j)."""
        out = []
        first, end = self.hpa // BLOCK_NBYTES, (self.hpa + self.nbytes) // BLOCK_NBYTES
        for line in sorted({first // BLOCKS_PER_LINE, (end - 1) // BLOCKS_PER_LINE}):
            lo, hi = max(first, line * BLOCKS_PER_LINE), min(end, (line + 1) * BLOCKS_PER_LINE)
            mask = ((1 << (hi - lo)) - 1) << (lo - line * BLOCKS_PER_LINE)
            if mask != (1 << BLOCKS_PER_LINE) - 1:
                out.append((line * CACHE_LINE_SIZE, mask))
        return out

    def to_json(self) -> dict[str, Any]:
        return {"hpa": hex(self.hpa), "gpa": None if self.gpa is None else hex(self.gpa), "nbytes": self.nbytes,
                "blocks": self.nbytes // BLOCK_NBYTES, "first_line": hex(self.first_line), "lines": self.lines,
                "partial_lines": [{"hpa": hex(h), "gpa": None if self.gpa is None else hex(self.gpa - self.hpa + h),
                                   "blocks": _mask_list(m)} for h, m in self.edge_masks()]}


@dataclass(frozen=True)
class LineRun:
    """Consecutive changed 64-byte lines [hpa, hpa + 64 * nlines) with one GPA mapping, holding
    ``nblocks`` changed blocks; ``partial`` lists the lines not wholly changed, as (line HPA,
    mask of changed blocks, bit j = block j)."""

    hpa: int
    gpa: int | None
    nlines: int
    nblocks: int
    partial: tuple[tuple[int, int], ...]

    def to_json(self) -> dict[str, Any]:
        def gpa(h: int) -> str | None:
            return None if self.gpa is None else hex(self.gpa + h - self.hpa)
        return {"hpa": hex(self.hpa), "gpa": gpa(self.hpa), "lines": self.nlines, "nbytes": self.nlines * CACHE_LINE_SIZE,
                "blocks": self.nblocks,
                "partial_lines": [{"hpa": hex(h), "gpa": gpa(h), "blocks": _mask_list(m)} for h, m in self.partial]}


def _mask_list(mask: int) -> list[int]:
    return [j for j in range(BLOCKS_PER_LINE) if mask >> j & 1]


@dataclass
class RegionDiff:
    """The changes of one VM between two dumps (``region`` from the first, ``other`` from the second).

    ``page_blocks[i]`` counts the changed blocks of page ``i`` (0..256). The changed blocks are
    kept as coalesced runs (``run_starts``/``run_blocks`` in block indices from the region start),
    at most ``limit`` of them; ``truncated`` says some were left out (the counts stay exact).
    """

    region: Region
    other: Region
    changed_blocks: int = 0
    changed_lines: int = 0
    changed_pages: int = 0
    page_blocks: npt.NDArray[np.uint16] = field(default_factory=lambda: np.zeros(0, np.uint16))
    run_starts: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    run_blocks: I64 = field(default_factory=lambda: np.zeros(0, np.int64))
    run_total: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def vm(self) -> str:
        return self.region.vm

    @property
    def total_blocks(self) -> int:
        return self.region.nbytes // BLOCK_NBYTES

    @property
    def truncated(self) -> bool:
        return self.run_starts.size < self.run_total

    def block_runs(self) -> list[BlockRun]:
        """The changed blocks coalesced into runs (cut where the GPA jumps), as held."""
        hpas = self.region.hpa + self.run_starts * BLOCK_NBYTES
        gpas = hpa_to_gpa(self.region, hpas)
        return [BlockRun(int(h), None if g < 0 else int(g), int(n) * BLOCK_NBYTES)
                for h, g, n in zip(hpas, gpas, self.run_blocks)]

    def changed_block_hpas(self) -> I64:
        """HPA of every changed block held in the runs (all of them unless ``truncated``)."""
        if not self.run_starts.size:
            return np.zeros(0, np.int64)
        total = int(self.run_blocks.sum())
        offsets = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(self.run_blocks) - self.run_blocks,
                                                               self.run_blocks)
        return self.region.hpa + (np.repeat(self.run_starts, self.run_blocks) + offsets) * BLOCK_NBYTES

    def line_masks(self) -> dict[int, int]:
        """Changed line HPA -> mask of its changed blocks (bit j = block j), from the runs."""
        blocks = (self.changed_block_hpas() - self.region.hpa) // BLOCK_NBYTES
        lines, inverse = np.unique(blocks // BLOCKS_PER_LINE, return_inverse=True)
        masks = np.zeros(lines.size, np.int64)
        np.bitwise_or.at(masks, inverse, 1 << (blocks % BLOCKS_PER_LINE))
        return {int(self.region.hpa + line * CACHE_LINE_SIZE): int(m) for line, m in zip(lines, masks)}

    def line_runs(self) -> list[LineRun]:
        """The changed lines coalesced into runs (cut where the GPA jumps), from the block runs
        held (all of them unless ``truncated``)."""
        s, c = self.run_starts, self.run_blocks
        if not s.size:
            return []
        first, last = s // BLOCKS_PER_LINE, (s + c - 1) // BLOCKS_PER_LINE        # lines, inclusive
        breaks = gpa_boundaries(self.region, CACHE_LINE_SIZE)
        new = np.ones(s.size, bool)
        new[1:] = (first[1:] > last[:-1] + 1) | (np.isin(first[1:], breaks) & (first[1:] > last[:-1]))
        heads = np.flatnonzero(new)
        tails = np.append(heads[1:], s.size) - 1
        nblocks = np.add.reduceat(c, heads)
        # partial lines sit at the ends of block runs; a line shared by two runs ORs their masks
        full = (1 << BLOCKS_PER_LINE) - 1
        lo_mask = (full << (s % BLOCKS_PER_LINE)) & full
        hi_mask = full >> (BLOCKS_PER_LINE - 1 - (s + c - 1) % BLOCKS_PER_LINE)
        one = first == last
        lines = np.concatenate((first, last[~one]))
        masks = np.concatenate((np.where(one, lo_mask & hi_mask, lo_mask), hi_mask[~one]))
        order = np.argsort(lines, kind="stable")
        lines, masks = lines[order], masks[order]
        uniq, idx = np.unique(lines, return_index=True)
        merged = np.bitwise_or.reduceat(masks, idx) if idx.size else masks
        keep = merged != full
        p_lines, p_masks = uniq[keep], merged[keep]
        owner = np.searchsorted(first[heads], p_lines, side="right") - 1        # line run of each partial line
        cuts = np.searchsorted(owner, np.arange(heads.size + 1))
        hpas = self.region.hpa + first[heads] * CACHE_LINE_SIZE
        gpas = hpa_to_gpa(self.region, hpas)
        nlines = last[tails] - first[heads] + 1
        out = []
        for i, (h, g, n, b) in enumerate(zip(hpas.tolist(), gpas.tolist(), nlines.tolist(), nblocks.tolist())):
            lo, hi = cuts[i], cuts[i + 1]
            partial = tuple((self.region.hpa + line * CACHE_LINE_SIZE, m)
                            for line, m in zip(p_lines[lo:hi].tolist(), p_masks[lo:hi].tolist()))
            out.append(LineRun(h, None if g < 0 else g, n, b, partial))
        return out

    def to_json(self, limit: int | None = None) -> dict[str, Any]:
        """Counts, and the changed ranges: ``line_runs`` (coalesced lines, with the blocks of
        partially changed ones) and ``block_runs``, at most ``limit`` of each."""
        blocks, lines = self.block_runs(), self.line_runs()
        if limit is not None:
            blocks, lines = blocks[:limit], lines[:limit]
        return {"vm": self.vm, "hpa": hex(self.region.hpa), "nbytes": self.region.nbytes,
                "keyid": [self.region.keyid, self.other.keyid],
                "blocks": self.total_blocks, "changed_blocks": self.changed_blocks,
                "changed_lines": self.changed_lines, "changed_pages": self.changed_pages,
                "line_runs": [r.to_json() for r in lines], "block_runs": [r.to_json() for r in blocks],
                "block_runs_total": self.run_total, "truncated": len(blocks) < self.run_total, "notes": self.notes}


@dataclass
class DumpDiff:
    a: Dump
    b: Dump
    regions: list[RegionDiff]

    def to_json(self, limit: int | None = None) -> dict[str, Any]:
        return {"dumps": [str(self.a.path), str(self.b.path)], "block_nbytes": BLOCK_NBYTES,
                "vms": [r.to_json(limit) for r in self.regions]}


def pair_regions(a: Dump, b: Dump, vm: str | None = None) -> list[tuple[Region, Region]]:
    """The regions of ``a`` and ``b`` that hold the same VM with the same layout.

    ``ValueError`` when the dumps hold different VMs (without ``vm``), or when a VM's HPA range
    or guest-physical layout differs: such dumps are not two pictures of one VM's memory.
    """
    if vm is None:
        names_a, names_b = [r.vm for r in a.regions], [r.vm for r in b.regions]
        if sorted(names_a) != sorted(names_b):
            raise ValueError(f"the dumps hold different VMs ({a.path}: {', '.join(names_a) or 'none'}; "
                             f"{b.path}: {', '.join(names_b) or 'none'}); choose one present in both with --vm")
        pairs = [(r, b.region(r.vm)) for r in a.regions]
    else:
        pairs = []
        for d in (a, b):
            if vm not in [r.vm for r in d.regions]:
                raise ValueError(f"{d.path} holds no VM {vm!r} (it has: {', '.join(r.vm for r in d.regions)})")
        pairs = [(a.region(vm), b.region(vm))]
    for ra, rb in pairs:
        if (ra.hpa, ra.nbytes) != (rb.hpa, rb.nbytes):
            raise ValueError(f"{ra.vm}: the dumps hold different DRAM ranges (HPA {ra.hpa:#x}+{ra.nbytes:#x} vs "
                             f"{rb.hpa:#x}+{rb.nbytes:#x}): not the same VM layout")
        if sorted(ra.gpa_ranges) != sorted(rb.gpa_ranges):
            raise ValueError(f"{ra.vm}: the dumps map guest-physical memory differently: not the same VM layout")
    return pairs


def diff_dumps(a: Dump, b: Dump, vm: str | None = None, *, limit: int | None = None) -> DumpDiff:
    """Compare every VM of ``a`` with the same VM in ``b`` (or ``vm`` only); see :func:`diff_region`."""
    return DumpDiff(a, b, [diff_region(a, ra, b, rb, limit=limit) for ra, rb in pair_regions(a, b, vm)])


def diff_region(a: Dump, ra: Region, b: Dump, rb: Region, *, limit: int | None = None,
                chunk_nbytes: int = CHUNK_NBYTES) -> RegionDiff:
    """Changed 16-byte blocks of one VM between dumps ``a`` and ``b`` (same layout: see
    :func:`pair_regions`). Keeps at most ``limit`` runs of changed blocks; counts are exact."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if chunk_nbytes % PAGE_SIZE or chunk_nbytes <= 0:
        raise ValueError("chunk_nbytes must be a positive multiple of 4096")
    out = RegionDiff(ra, rb, page_blocks=np.zeros(ra.nbytes // PAGE_SIZE, np.uint16))
    da, db = a.region_data(ra), b.region_data(rb)
    breaks = gpa_boundaries(ra, BLOCK_NBYTES)
    starts: list[I64] = []
    counts: list[I64] = []
    stored = 0
    prev_end, prev_stored = -1, False   # the last run seen: where it ends, whether it is kept
    words = np.empty(chunk_nbytes // 8, bool)
    for off in range(0, ra.nbytes, chunk_nbytes):
        n = min(chunk_nbytes, ra.nbytes - off)
        ne = np.not_equal(da[off:off + n].view(np.uint64), db[off:off + n].view(np.uint64), out=words[:n // 8])
        blocks = ne[0::2] | ne[1::2]
        per_page = blocks.reshape(-1, BLOCKS_PER_PAGE)
        page_counts = np.count_nonzero(per_page, axis=1)
        first_page = off // PAGE_SIZE
        out.page_blocks[first_page:first_page + page_counts.size] = page_counts
        pages = np.flatnonzero(page_counts)
        if not pages.size:
            continue
        changed = per_page[pages]
        out.changed_blocks += int(page_counts.sum())
        out.changed_pages += int(pages.size)
        out.changed_lines += int(np.count_nonzero(changed.reshape(pages.size, -1, BLOCKS_PER_LINE).any(axis=2)))
        rows, cols = np.nonzero(changed)
        s, c = runs((first_page + pages[rows]) * BLOCKS_PER_PAGE + cols, breaks)
        if s[0] == prev_end and not np.isin(s[0], breaks):     # continues the previous chunk's last run
            if prev_stored:
                counts[-1][-1] += c[0]
            prev_end = int(s[0] + c[0])
            s, c = s[1:], c[1:]
            if not s.size:
                continue
        out.run_total += int(s.size)
        room = s.size if limit is None else max(0, min(s.size, limit - stored))
        if room:
            starts.append(s[:room].copy())
            counts.append(c[:room].copy())
            stored += room
        prev_end, prev_stored = int(s[-1] + c[-1]), room == s.size
    if starts:
        out.run_starts, out.run_blocks = np.concatenate(starts), np.concatenate(counts)
    _annotate(out)
    return out


def _annotate(d: RegionDiff) -> None:
    ra, rb = d.region, d.other
    if ra.keyid != rb.keyid:
        d.notes.append(f"the VM's KeyID changed ({ra.keyid} -> {rb.keyid})")
    if (ra.key_type, ra.algorithm) != (rb.key_type, rb.algorithm):
        d.notes.append(f"the VM's key changed ({ra.key_type} {ra.algorithm} -> {rb.key_type} {rb.algorithm})")
    if d.changed_blocks > KEY_CHANGE_FRACTION * d.total_blocks:
        d.notes.append(f"{100 * d.changed_blocks / d.total_blocks:.0f}% of the blocks changed: the VM's key probably "
                       "changed between the dumps (a cpu key is new at every boot), not its data")
    if ra.key_type == "no-encrypt" and d.changed_blocks:
        d.notes.append("the VM is not encrypted: the changed bytes themselves are visible in the dumps")


__all__: Sequence[str] = ["BlockRun", "DumpDiff", "LineRun", "RegionDiff", "diff_dumps", "diff_region", "pair_regions"]
