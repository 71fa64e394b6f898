"""Diffs at 16-byte-block granularity: exactly the blocks whose plaintext changed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from qemu_mktme.inspect.diff import diff_dumps, diff_region, pair_regions
from qemu_mktme.arch.guestmap import GuestRange
from qemu_mktme.host.host import Host
from qemu_mktme.files.dumpfile import Dump, write_dump

from conftest import GIB, MIB, make_scene


def plaintext_changed_blocks(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Backend offsets of the 16-byte blocks whose plaintext differs (the ground truth)."""
    ne = (before.reshape(-1, 16) != after.reshape(-1, 16)).any(axis=1)
    return np.flatnonzero(ne) * 16


def test_diff_is_exactly_the_changed_plaintext_blocks(scene_dumps):
    scene, d1, d2, before, after = scene_dumps
    result = diff_dumps(d1, d2)
    by = {d.vm: d for d in result.regions}
    for vm in ("vm1", "vm2", "vm3"):
        d = by[vm]
        offsets = d.changed_block_hpas() - d.region.hpa
        np.testing.assert_array_equal(offsets, plaintext_changed_blocks(before[vm], after[vm]))
        assert d.changed_blocks == offsets.size and not d.truncated
    d = by["vm1"]
    assert by["vm3"].changed_blocks == 0 and by["vm2"].changed_blocks == 1
    # the hand-made changes, as ranges with their GPAs
    base = d.region.hpa
    got = [(r.hpa - base, r.gpa, r.nbytes, r.lines, r.edge_masks()) for r in d.block_runs()]
    assert got == [
        (0x500010, 0x500010, 32, 1, [(base + 0x500000, 0b0110)]),
        (0x600000, 0x600000, 4096, 64, []),
        (0x7FFFF0, 0x7FFFF0, 32, 2, [(base + 0x7FFFC0, 0b1000), (base + 0x800000, 0b0001)]),
        (10 * MIB - 16, 10 * MIB - 16, 16, 1, [(base + 10 * MIB - 64, 0b1000)]),  # cut where the GPA jumps
        (10 * MIB, 4 * GIB, 16, 1, [(base + 10 * MIB, 0b0001)]),
        (10 * MIB + 0x40, 4 * GIB + 0x40, 16, 1, [(base + 10 * MIB + 0x40, 0b0001)]),
    ]
    assert d.changed_blocks == 2 + 256 + 2 + 1 + 1 + 1
    assert d.changed_lines == 1 + 64 + 2 + 1 + 1 + 1
    assert d.changed_pages == 1 + 1 + 2 + 1 + 1                  # 10M-16 and 10M are in two pages
    lines = [(r.hpa - base, r.gpa, r.nlines, r.nblocks, [(h - base, m) for h, m in r.partial]) for r in d.line_runs()]
    assert lines == [
        (0x500000, 0x500000, 1, 2, [(0x500000, 0b0110)]),
        (0x600000, 0x600000, 64, 256, []),
        (0x7FFFC0, 0x7FFFC0, 2, 2, [(0x7FFFC0, 0b1000), (0x800000, 0b0001)]),
        (10 * MIB - 64, 10 * MIB - 64, 1, 1, [(10 * MIB - 64, 0b1000)]),
        (10 * MIB, 4 * GIB, 2, 2, [(10 * MIB, 0b0001), (10 * MIB + 0x40, 0b0001)]),   # adjacent lines coalesce
    ]
    masks = d.line_masks()
    assert masks[base + 0x500000] == 0b0110 and masks[base + 0x600040] == 0b1111
    assert base + 0x700000 not in masks                          # zeros over zeros: nothing to see
    assert d.page_blocks[0x600] == 256 and d.page_blocks[0x500] == 2 and d.page_blocks.sum() == d.changed_blocks
    j = result.to_json()
    assert json.loads(json.dumps(j))["vms"][0]["block_runs"][0]["partial_lines"] == [
        {"hpa": hex(base + 0x500000), "gpa": "0x500000", "blocks": [1, 2]}]


@pytest.mark.parametrize("chunk", [4096, 12288, 1 << 20])
def test_diff_chunking_does_not_change_the_answer(scene_dumps, chunk):
    _, d1, d2, *_ = scene_dumps
    ra, rb = d1.region("vm1"), d2.region("vm1")
    ref = diff_region(d1, ra, d2, rb)
    got = diff_region(d1, ra, d2, rb, chunk_nbytes=chunk)
    assert [(r.hpa, r.nbytes) for r in got.block_runs()] == [(r.hpa, r.nbytes) for r in ref.block_runs()]
    assert (got.changed_blocks, got.changed_lines, got.changed_pages, got.run_total) == \
        (ref.changed_blocks, ref.changed_lines, ref.changed_pages, ref.run_total)


@pytest.mark.parametrize("chunk", [4096, 1 << 20])
def test_limit_keeps_counts_exact(scene_dumps, chunk):
    _, d1, d2, *_ = scene_dumps
    ra, rb = d1.region("vm1"), d2.region("vm1")
    full = diff_region(d1, ra, d2, rb, chunk_nbytes=chunk)
    for limit in (0, 1, 2, 3):
        d = diff_region(d1, ra, d2, rb, limit=limit, chunk_nbytes=chunk)
        assert d.run_total == full.run_total == 6 and d.truncated
        assert [(r.hpa, r.nbytes) for r in d.block_runs()] == [(r.hpa, r.nbytes) for r in full.block_runs()][:limit]
        assert d.changed_blocks == full.changed_blocks


def test_same_dump_has_no_changes(scene_dumps):
    _, d1, *_ = scene_dumps
    assert all(d.changed_blocks == 0 and d.block_runs() == [] for d in diff_dumps(d1, Dump(d1.path)).regions)


def test_a_new_key_changes_everything_and_is_noted(tmp_path):
    scene = make_scene()
    d1 = scene.dump(tmp_path / "a", ["vm3"])
    scene.host.remove_guest("vm3")
    serial = scene.host.keys.add("vm3-again", "type=cpu", tenant="globex")
    g = scene.host.add_guest("vm3", scene.rams["vm3"], [scene.guests["vm3"].ranges[0]], key_serial=serial,
                             tenant="globex", hpa=d1.region("vm3").hpa)
    d2 = write_dump([g], tmp_path / "b")
    [d] = diff_dumps(d1, d2).regions
    assert d.changed_blocks > 0.99 * d.total_blocks
    assert any("key probably changed" in n for n in d.notes)
    assert any("key changed (user aes-xts-256 -> cpu aes-xts-128)" in n for n in d.notes)


def test_dumps_of_different_vms_or_layouts_are_refused(tmp_path):
    a, b = make_scene(), make_scene()
    da = a.dump(tmp_path / "a", ["vm1", "vm2"])
    db = b.dump(tmp_path / "b", ["vm1"])
    with pytest.raises(ValueError, match=r"different VMs .*vm1, vm2.*choose one present in both with --vm"):
        diff_dumps(da, db)
    assert [d.vm for d in diff_dumps(da, db, "vm1").regions] == ["vm1"]
    with pytest.raises(ValueError, match="holds no VM 'vm2'"):
        pair_regions(da, db, "vm2")
    # the same VM name with another DRAM range, or with another guest-physical layout
    for name, size, message in (("c", 4 * MIB, "vm1: the dumps hold different DRAM ranges"),
                                ("d", 12 * MIB, "vm1: the dumps map guest-physical memory differently")):
        host = Host(keyid_bits=6)
        serial = host.keys.add("k", "type=cpu", tenant="acme")
        g = host.add_guest("vm1", np.zeros(size, np.uint8), [GuestRange(0, size, 0)], key_serial=serial,
                           tenant="acme")
        other = write_dump([g], tmp_path / name)
        assert other.region("vm1").hpa == db.region("vm1").hpa
        with pytest.raises(ValueError, match=message):
            diff_dumps(db, other)


def test_line_runs_merge_blocks_sharing_a_line_and_match_line_masks(tmp_path):
    scene = make_scene()
    ram = scene.rams["vm3"]
    d1 = scene.dump(tmp_path / "a", ["vm3"])
    ram[0x1000:0x1010] = 1          # block 0 of line 0x1000
    ram[0x1020:0x1030] = 1          # block 2 of the same line: two block runs, one line
    ram[0x1040:0x1080] = 1          # the next line, whole
    ram[0x10F0:0x1100] = 1          # block 3 of line 0x10c0, after an unchanged line
    d2 = scene.dump(tmp_path / "b", ["vm3"])
    [d] = diff_dumps(d1, d2).regions
    base = d.region.hpa
    assert [(r.hpa - base, r.nbytes) for r in d.block_runs()] == [(0x1000, 16), (0x1020, 16), (0x1040, 64), (0x10F0, 16)]
    runs = [(r.hpa - base, r.nlines, r.nblocks, [(h - base, m) for h, m in r.partial]) for r in d.line_runs()]
    assert runs == [(0x1000, 2, 6, [(0x1000, 0b0101)]), (0x10C0, 1, 1, [(0x10C0, 0b1000)])]
    assert {h - base: m for h, m in d.line_masks().items()} == {0x1000: 0b0101, 0x1040: 0b1111, 0x10C0: 0b1000}
