"""Garbage left by foreign-KeyID writes, byte by byte, without QEMU."""

from __future__ import annotations

import numpy as np

from qemu_mktme.trace.foreign import ForeignLines
from qemu_mktme.trace.layout import KIND_LOAD, KIND_STORE, WATCH_LOAD, WATCH_STORE

PAGE = 0x5000


def run(lines: ForeignLines, *accesses: tuple[str, int, int]):
    """Feed accesses ("load"/"store", offset, size) in order; the hits."""
    off = np.array([a[1] for a in accesses], dtype=np.uint64)
    size = np.array([a[2] for a in accesses], dtype=np.uint8)
    kind = np.array([KIND_STORE if a[0] == "store" else KIND_LOAD for a in accesses], dtype=np.uint8)
    hits, _ = lines.process(off, size, kind)
    return hits


def test_marking_covers_whole_lines_and_sets_watch_flags():
    f = ForeignLines()
    assert f.mark(PAGE + 70, 2, keyid=5) == [PAGE >> 12]
    assert f.garbage(PAGE + 60, 72).tolist() == [False] * 4 + [True] * 64 + [False] * 4
    assert f.watch_flags(PAGE >> 12) == WATCH_LOAD | WATCH_STORE
    assert f.mark(PAGE + 4090, 10, keyid=5) == [PAGE >> 12, (PAGE >> 12) + 1]


def test_first_garbage_load_reported_once_per_line():
    f = ForeignLines()
    f.mark(PAGE + 64, 64, keyid=9)
    hits = run(f, ("load", PAGE + 0, 8), ("load", PAGE + 70, 1), ("load", PAGE + 71, 1))
    assert [(h.index, h.line_offset, h.keyid, h.garbage_bytes) for h in hits] == [(1, PAGE + 64, 9, 1)]
    assert run(f, ("load", PAGE + 64, 8)) == []                    # reported: quiet until re-marked
    assert f.watch_flags(PAGE >> 12) == WATCH_STORE                # loads need no records now
    f.mark(PAGE + 64, 1, keyid=3)
    assert [h.keyid for h in run(f, ("load", PAGE + 64, 8))] == [3]


def test_partial_store_repairs_only_its_bytes():
    f = ForeignLines()
    f.mark(PAGE, 64, keyid=2)
    assert run(f, ("store", PAGE, 8), ("load", PAGE, 8), ("load", PAGE + 4, 4)) == []
    assert f.garbage(PAGE, 64).tolist() == [False] * 8 + [True] * 56
    hits = run(f, ("load", PAGE + 6, 4))                            # bytes 6, 7 repaired; 8, 9 not
    assert [(h.index, h.garbage_bytes) for h in hits] == [(0, 2)]


def test_store_then_load_in_one_batch_is_ordered():
    f = ForeignLines()
    f.mark(PAGE, 64, keyid=2)
    assert run(f, ("store", PAGE + 16, 4), ("load", PAGE + 16, 4)) == []
    hits = run(f, ("load", PAGE + 20, 4), ("store", PAGE + 20, 4))
    assert [h.index for h in hits] == [0]


def test_rewriting_all_64_bytes_clears_the_line_and_the_page():
    f = ForeignLines()
    f.mark(PAGE, 64, keyid=2)
    run(f, *[("store", PAGE + 8 * i, 8) for i in range(7)])
    assert f.watch_flags(PAGE >> 12) == WATCH_LOAD | WATCH_STORE
    run(f, ("store", PAGE + 56, 8))
    assert not f.garbage(PAGE, 64).any() and not f
    assert run(f, ("load", PAGE, 8)) == []


def test_access_crossing_a_line_boundary_counts_for_both_lines():
    f = ForeignLines()
    f.mark(PAGE + 64, 64, keyid=4)
    hits = run(f, ("load", PAGE + 60, 8))                           # bytes 60..63 clean, 64..67 garbage
    assert [(h.line_offset, h.garbage_bytes) for h in hits] == [(PAGE + 64, 4)]
    f.mark(PAGE, 128, keyid=4)
    run(f, ("store", PAGE + 60, 8))
    assert f.garbage(PAGE + 56, 16).tolist() == [True] * 4 + [False] * 8 + [True] * 4


def test_unmarked_traffic_is_ignored():
    f = ForeignLines()
    f.mark(PAGE, 64, keyid=1)
    assert run(f, ("load", 0x9000, 8), ("store", PAGE + 64, 8), ("load", PAGE + 128, 64)) == []
    assert f.garbage(PAGE, 64).all()
