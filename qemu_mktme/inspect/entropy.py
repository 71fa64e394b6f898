"""Per-page Shannon entropy of a dump, in bits per byte.

Under MKTME every page of DRAM should look random: a 4 KiB page of ciphertext has an entropy
of about 7.955 bits/byte (8 minus the small-sample bias 255 / (2 * 4096 * ln 2)). A page well
below that is plaintext: a VM without encryption (``no-encrypt``), memory outside any KeyID, or
a bug. Constant pages (all zeros, say) have entropy 0.

How it is fast: the byte histogram of many pages at once is one ``np.bincount`` over
``page * 256 + byte``. The index array is built once with the page numbers in its upper bytes;
each chunk's bytes are copied into its lowest byte (a strided uint8 copy, no arithmetic), and
``sum(c * log2 c)`` comes from a table lookup. No Python loop per page or byte: one per 32 KiB.
``np.bincount`` holds the GIL, so large dumps are spread over worker processes (forked when this
process has no other thread, else from a fork server), each mapping its own slice of the file.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from ..arch.addresses import PAGE_SIZE
from ..files.dumpfile import DATA_FILE, Dump, Region
from .layout import UNTAGGED, gpa_boundaries, hpa_to_gpa, page_keyids, runs, select_regions

log = logging.getLogger(__name__)

F32 = npt.NDArray[np.float32]

RANDOM_PAGE_BITS = 8 - 255 / (2 * PAGE_SIZE * np.log(2))
"""Expected entropy of a page of uniformly random bytes (~7.955 bits/byte)."""
DEFAULT_THRESHOLD = 7.5
"""Pages below this many bits/byte do not look like ciphertext (six standard deviations are
~0.02 bits for a random page; compressed data stays above 7.9, text and code fall below 6.5)."""
HISTOGRAM_EDGES = np.arange(0, 8.25, 0.25)

PARALLEL_MIN_NBYTES = 256 << 20
"""Dumps smaller than this are done in this process (a worker pool costs ~0.1-0.3 s to start)."""
MAX_WORKERS = 8
TASK_NBYTES = 32 << 20

_PAGES_PER_PASS = 8          # 32 KiB per bincount: the index array (256 KiB) stays in L2
_PAGES_PER_GROUP = 256       # the table lookup and sum run once per 1 MiB
_CLOG2 = np.zeros(PAGE_SIZE + 1)
_CLOG2[1:] = np.arange(1, PAGE_SIZE + 1) * np.log2(np.arange(1, PAGE_SIZE + 1))
_LOW_BYTE = 0 if np.little_endian else np.dtype(np.intp).itemsize - 1


def page_entropy(data: npt.NDArray[np.uint8], *, out: F32 | None = None) -> F32:
    """Entropy in bits/byte of each 4 KiB page of ``data`` (a flat uint8 array, whole pages)."""
    src = np.asarray(data).reshape(-1)
    if src.dtype != np.uint8:
        raise ValueError(f"data must be uint8, got {src.dtype}")
    if src.size % PAGE_SIZE:
        raise ValueError(f"data length {src.size} is not a multiple of {PAGE_SIZE}")
    npages = src.size // PAGE_SIZE
    res = np.empty(npages, np.float32) if out is None else out
    if res.shape != (npages,):
        raise ValueError(f"out must hold {npages} values")
    index = (np.arange(_PAGES_PER_PASS, dtype=np.intp) << 8).repeat(PAGE_SIZE)
    low = index.view(np.uint8)[_LOW_BYTE::index.itemsize]
    counts = np.empty(_PAGES_PER_GROUP * 256, np.intp)
    for group in range(0, npages, _PAGES_PER_GROUP):
        gn = min(_PAGES_PER_GROUP, npages - group)
        for p in range(0, gn, _PAGES_PER_PASS):
            k = min(_PAGES_PER_PASS, gn - p)
            first = (group + p) * PAGE_SIZE
            low[:k * PAGE_SIZE] = src[first:first + k * PAGE_SIZE]
            counts[p * 256:(p + k) * 256] = np.bincount(index[:k * PAGE_SIZE], minlength=k * 256)
        sums = _CLOG2[counts[:gn * 256]].reshape(gn, 256).sum(axis=1)
        np.subtract(np.log2(PAGE_SIZE), sums / PAGE_SIZE, out=res[group:group + gn], casting="unsafe")
    return res


def sample_entropy(data: npt.NDArray[np.uint8], stride: int) -> F32:
    """Entropy of every ``stride``-th page of ``data`` (cheap hint: does this look random?)."""
    pages = np.asarray(data)[:np.asarray(data).size // PAGE_SIZE * PAGE_SIZE].reshape(-1, PAGE_SIZE)[::stride]
    return page_entropy(np.ascontiguousarray(pages).reshape(-1))


def histogram(values: np.ndarray) -> list[int]:
    """Counts per 0.25-bit bin of ``HISTOGRAM_EDGES`` (the last bin includes 8.0)."""
    counts, _ = np.histogram(values, bins=HISTOGRAM_EDGES)
    return counts.tolist()


@dataclass(frozen=True)
class LowRun:
    """Consecutive low-entropy pages of one VM, with one GPA mapping."""

    vm: str
    hpa: int
    npages: int
    gpa: int | None
    keyid: int
    min_bits: float
    mean_bits: float

    def to_json(self) -> dict[str, Any]:
        return {"vm": self.vm, "hpa": hex(self.hpa), "npages": self.npages,
                "gpa": None if self.gpa is None else hex(self.gpa),
                "keyid": None if self.keyid == UNTAGGED else self.keyid,
                "min_bits": round(self.min_bits, 4), "mean_bits": round(self.mean_bits, 4)}


@dataclass
class EntropyMap:
    """Per-page entropy of some regions of a dump: ``entropy[i]`` for ``regions[i]``."""

    dump: Dump
    regions: list[Region]
    entropy: list[F32]
    threshold: float = DEFAULT_THRESHOLD
    _low: list[LowRun] | None = field(default=None, repr=False)

    def low_runs(self) -> list[LowRun]:
        """Runs of pages below ``threshold`` (what looks like plaintext), in dump order."""
        if self._low is None:
            out = []
            for r, ent in zip(self.regions, self.entropy):
                tags = page_keyids(r)
                breaks = np.union1d(gpa_boundaries(r, PAGE_SIZE), np.flatnonzero(np.diff(tags)) + 1)
                starts, lengths = runs(np.flatnonzero(ent < self.threshold), breaks)
                if not starts.size:
                    continue
                hpas = r.hpa + starts * PAGE_SIZE
                gpas = hpa_to_gpa(r, hpas)
                keyids = tags[starts]
                bounds = np.column_stack((starts, starts + lengths)).reshape(-1)
                padded = np.append(ent.astype(np.float64), np.inf)   # lets the last run end at the end
                mins = np.minimum.reduceat(padded, bounds)[0::2]
                sums = np.add.reduceat(padded, bounds)[0::2]
                out += [LowRun(r.vm, int(h), int(n), None if g < 0 else int(g), int(k), float(m), float(t / n))
                        for h, n, g, k, m, t in zip(hpas, lengths, gpas, keyids, mins, sums)]
            self._low = out
        return self._low

    def summary(self, region: Region | None = None) -> dict[str, Any]:
        """Counts, mean/min and the histogram, for one region or all of them."""
        values = [e for r, e in zip(self.regions, self.entropy) if region is None or r is region]
        ent = np.concatenate(values) if values else np.zeros(0, np.float32)
        return {
            "pages": int(ent.size),
            "mean_bits": round(float(ent.mean()), 4) if ent.size else None,
            "min_bits": round(float(ent.min()), 4) if ent.size else None,
            "low_pages": int(np.count_nonzero(ent < self.threshold)),
            "constant_pages": int(np.count_nonzero(ent == 0)),
            "histogram": histogram(ent),
        }

    def to_json(self, limit: int | None = None) -> dict[str, Any]:
        low = self.low_runs()
        shown = low if limit is None else low[:limit]
        return {
            "dump": str(self.dump.path), "threshold_bits": self.threshold,
            "random_page_bits": round(float(RANDOM_PAGE_BITS), 4),
            "histogram_edges": HISTOGRAM_EDGES.tolist(),
            "total": self.summary(),
            "vms": [{"vm": r.vm, "keyid": r.keyid, "key_type": r.key_type, **self.summary(r)} for r in self.regions],
            "low_runs": [run.to_json() for run in shown], "low_runs_total": len(low),
            "truncated": len(shown) < len(low),
        }


def dump_entropy(dump: Dump, vm: str | None = None, *, threshold: float = DEFAULT_THRESHOLD,
                 regions: Sequence[Region] | None = None, workers: int | None = None) -> EntropyMap:
    """Per-page entropy of every region of ``dump`` (or of ``vm``'s, or of ``regions``).

    ``workers`` processes share the work (default: one per CPU, at most ``MAX_WORKERS``, when
    the regions exceed ``PARALLEL_MIN_NBYTES``; 1 computes everything in this process). If no
    worker process can be started, the work is done here.
    """
    if not 0 < threshold <= 8:
        raise ValueError(f"threshold must be in (0, 8] bits per byte, got {threshold!r}")
    chosen = list(regions) if regions is not None else select_regions(dump, vm)
    total = sum(r.nbytes for r in chosen)
    if workers is None:
        workers = min(os.cpu_count() or 1, MAX_WORKERS) if total >= PARALLEL_MIN_NBYTES else 1
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    values = None
    if workers > 1 and total > TASK_NBYTES:
        try:
            values = _parallel(dump, chosen, workers)
        except (OSError, BrokenProcessPool) as err:   # no semaphores, no fork, a worker killed...
            log.info("entropy: worker processes failed (%s); computing in this process", err)
    if values is None:
        values = [page_entropy(dump.region_data(r)) for r in chosen]
    return EntropyMap(dump, chosen, values, threshold)


def _task(path: str, offset: int, nbytes: int) -> F32:
    return page_entropy(np.memmap(path, np.uint8, "r", offset=offset, shape=(nbytes,)))


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # Ctrl-C is the parent's to handle


def _parallel(dump: Dump, regions: Sequence[Region], workers: int) -> list[F32]:
    path = str(dump.path / DATA_FILE)
    tasks = [(path, r.file_offset + off, min(TASK_NBYTES, r.nbytes - off))
             for r in regions for off in range(0, r.nbytes, TASK_NBYTES)]
    method = "fork" if threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods() \
        else "forkserver"
    pool = ProcessPoolExecutor(min(workers, len(tasks)), mp_context=multiprocessing.get_context(method),
                               initializer=_ignore_sigint)
    try:
        results = list(pool.map(_task, *zip(*tasks)))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    out, i = [], 0
    for r in regions:
        n = -(-r.nbytes // TASK_NBYTES)
        out.append(np.concatenate(results[i:i + n]))
        i += n
    return out
