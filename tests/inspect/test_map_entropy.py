"""The KeyID map and per-page entropy, against the host model that wrote the dump."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

from qemu_mktme.arch.addresses import PAGE_SIZE
from qemu_mktme.inspect.entropy import RANDOM_PAGE_BITS, dump_entropy, page_entropy
from qemu_mktme.inspect.layout import UNTAGGED, keyid_map, runs

from conftest import GIB, MIB


def reference_entropy(page: bytes) -> float:
    n = len(page)
    return -sum(c / n * math.log2(c / n) for c in Counter(page).values())


def test_page_entropy_matches_a_plain_python_reference():
    rng = np.random.default_rng(1)
    pages = [bytes(4096), bytes([7]) * 4096, bytes(range(256)) * 16, rng.integers(0, 256, 4096, np.uint8).tobytes(),
             rng.integers(0, 4, 4096, np.uint8).tobytes(), (b"hello world " * 400)[:4096],
             bytes(4095) + b"\x01"]
    pages += [rng.integers(0, 256, 4096, np.uint8).tobytes() for _ in range(20)]   # crosses a pass of 8 pages
    got = page_entropy(np.frombuffer(b"".join(pages), np.uint8))
    np.testing.assert_allclose(got, [reference_entropy(p) for p in pages], atol=1e-5)
    assert got[0] == 0 and got[1] == 0 and got[2] == pytest.approx(8.0)
    assert abs(float(got[7:].mean()) - RANDOM_PAGE_BITS) < 0.01
    with pytest.raises(ValueError, match="multiple of 4096"):
        page_entropy(np.zeros(100, np.uint8))


def test_page_entropy_over_many_groups_is_exact():
    rng = np.random.default_rng(2)
    data = rng.integers(0, 256, 300 * PAGE_SIZE, np.uint8)          # more than one 256-page group
    data[5 * PAGE_SIZE:6 * PAGE_SIZE] = 0
    data[299 * PAGE_SIZE:] = rng.integers(0, 3, PAGE_SIZE, np.uint8)
    got = page_entropy(data)
    for i in (0, 5, 255, 256, 299):
        assert got[i] == pytest.approx(reference_entropy(data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE].tobytes()), abs=1e-5)


def test_keyid_map_matches_the_regions_and_the_epts(scene_dumps):
    scene, d1, *_ = scene_dumps
    kmap = keyid_map(d1)
    keyid = {n: int(g.keyid) for n, g in scene.guests.items()}
    assert len(set(keyid.values())) == 3
    by = kmap.by_keyid()
    hole = (MIB - 0xA0000) // PAGE_SIZE
    assert by[keyid["vm1"]] == {"pages": 12 * MIB // PAGE_SIZE - hole, "vms": ["vm1"]}
    assert by[UNTAGGED] == {"pages": hole, "vms": ["vm1"]}
    assert by[keyid["vm2"]]["pages"] == by[keyid["vm3"]]["pages"] == 4 * MIB // PAGE_SIZE
    base = scene.guests["vm1"].hpa_base
    vm1 = [(r.keyid, r.hpa - base, r.npages, r.gpa) for r in kmap.runs() if r.vm == "vm1"]
    k = keyid["vm1"]
    assert vm1 == [(k, 0, 160, 0), (UNTAGGED, 0xA0000, hole, None), (k, MIB, 9 * MIB // PAGE_SIZE, MIB),
                   (k, 10 * MIB, 2 * MIB // PAGE_SIZE, 4 * GIB)]     # split where the GPA jumps
    for i, r in enumerate(kmap.regions):
        assert kmap.mismatched_pages(i) == 0
        # every page the EPT maps carries the KeyID of the VM, as the EPT walk says
        g = scene.guests[r.vm]
        for gpa in (0x0, 0x1000, 0x200000):
            hpa, kid = g.translate(gpa)
            assert kmap.pages[i][(hpa - r.hpa) // PAGE_SIZE] == kid
    j = kmap.to_json()
    assert {row["vm"]: row["pages_by_keyid"] for row in j["vms"]}["vm1"] == {
        "untagged": hole, str(k): 12 * MIB // PAGE_SIZE - hole}
    assert sum(row["pages"] for row in j["keyids"]) == j["pages"] == 20 * MIB // PAGE_SIZE


def test_keyid_map_reports_pages_the_ept_tags_with_another_keyid(tmp_path):
    from conftest import make_scene
    scene = make_scene()
    g = scene.guests["vm3"]
    g.ept.retag(0x200000, 5)                                     # a 2 MiB leaf tagged with KeyID 5
    kmap = keyid_map(scene.dump(tmp_path / "d", ["vm3"]))
    assert kmap.mismatched_pages(0) == 512
    assert kmap.by_keyid()[5]["pages"] == 512


def test_entropy_of_encrypted_pages_is_high_and_plaintext_low(scene_dumps):
    scene, d1, *_ = scene_dumps
    emap = dump_entropy(d1)
    ent = dict(zip((r.vm for r in emap.regions), emap.entropy))
    # every page of the encrypted VMs looks random, whatever its plaintext (zeros, text, random)
    for vm in ("vm1", "vm3"):
        assert ent[vm].min() > 7.9 and abs(float(ent[vm].mean()) - RANDOM_PAGE_BITS) < 0.005
    # the no-encrypt VM: its DRAM is its plaintext
    ram2 = scene_dumps[3]["vm2"]
    for page in (0, 0x100, 0x200):
        assert ent["vm2"][page] == pytest.approx(reference_entropy(ram2[page * 4096:(page + 1) * 4096].tobytes()),
                                                 abs=1e-5)
    assert ent["vm2"][0x100] > 3                                   # the text page is not constant
    low = emap.low_runs()
    assert {r.vm for r in low} == {"vm2"}
    assert sum(r.npages for r in low) == 1024
    s = emap.summary()
    assert s["low_pages"] == 1024 and s["constant_pages"] == 1022 and sum(s["histogram"]) == s["pages"]
    j = emap.to_json(limit=1)
    assert j["low_runs_total"] == len(low) and len(j["low_runs"]) == 1 and j["truncated"] == (len(low) > 1)


def test_runs_coalesce_and_cut_at_breaks():
    s, n = runs(np.array([1, 2, 3, 7, 8, 10]), np.array([8]))
    assert s.tolist() == [1, 7, 8, 10] and n.tolist() == [3, 1, 1, 1]
    s, n = runs(np.zeros(0, np.int64))
    assert s.size == n.size == 0


def test_worker_processes_give_the_same_entropy(scene_dumps, monkeypatch):
    import qemu_mktme.inspect.entropy as entropy_mod
    _, d1, *_ = scene_dumps
    serial = dump_entropy(d1, workers=1)
    monkeypatch.setattr(entropy_mod, "TASK_NBYTES", 1 << 20)          # 20 tasks over 3 regions
    direct = entropy_mod._parallel(d1, d1.regions, 2)                  # no fallback can hide a failure
    for a, b in zip(serial.entropy, direct):
        np.testing.assert_array_equal(a, b)

    def no_processes(*args, **kwargs):
        raise OSError(38, "Function not implemented")
    monkeypatch.setattr(entropy_mod, "ProcessPoolExecutor", no_processes)
    fallback = dump_entropy(d1, workers=2)                             # e.g. no POSIX semaphores
    for a, b in zip(serial.entropy, fallback.entropy):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="workers"):
        dump_entropy(d1, workers=0)
