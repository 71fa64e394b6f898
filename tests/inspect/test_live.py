"""The tools on dumps of real QEMU guests: two bare-metal VMs (a user key, and no-encrypt) on one
emulated host, captured twice with ``capture`` while the guest changes known ranges in between.

The ground truth is the guests' RAM (plaintext) copied while they are paused for each capture.
"""

from __future__ import annotations

import asyncio
import os

import numpy as np
import pytest

from qemu_mktme.engine.xts import XtsKey
from qemu_mktme.inspect.decrypt import extract
from qemu_mktme.inspect.diff import diff_dumps
from qemu_mktme.inspect.entropy import dump_entropy
from qemu_mktme.inspect.layout import UNTAGGED, keyid_map
from qemu_mktme.inspect.search import Pattern, search
from qemu_mktme.qemu.machine import MachineConfig
from qemu_mktme.live.session import HostSession, VmSpec

from helpers import patience
from reference import user_payload, xts_lines

FILLS = [  # (GPA, length, byte, width): what the encrypted guest does between the two captures
    (0x400010, 0x20, 0xAB, 1),       # blocks 1 and 2 of one line
    (0x500000, 0x1000, 0x55, 8),     # a whole page
    (0x600000, 0x100, 0x00, 1),      # zeros over zeros: same plaintext, same ciphertext, invisible
    (0x7FFFF8, 0x10, 0x11, 8),       # the last block of a page and the first of the next
]
EXPECTED_LINES = {0x400000: 0b0110, **{0x500000 + 64 * i: 0b1111 for i in range(64)},
                  0x7FFFC0: 0b1000, 0x800000: 0b0001}


def ram_copy(vm) -> np.ndarray:
    return np.frombuffer(vm.ram.backend, np.uint8).copy()


async def _scenario(image, base):
    key, tweak = os.urandom(16), os.urandom(16)
    secret = "LIVE-SECRET-" + os.urandom(6).hex()
    clear_text = "CLEAR-VM-TEXT-" + os.urandom(6).hex()
    specs = [
        VmSpec(MachineConfig(boot=image.boot(commands=[f"write 0x200000 {secret}"]), memory="128M", name="enc"),
               "acme", user_payload(key, tweak)),
        VmSpec(MachineConfig(boot=image.boot(commands=[f"write 0x200000 {clear_text}", "fill 0x300000 8192 0x41"]),
                             memory="128M", name="clear"), "acme", "type=no-encrypt"),
    ]
    async with HostSession(specs, control=False) as session:
        enc, clear = session.machines["enc"], session.machines["clear"]
        await enc.console.wait_for(r"ok write 0x200000 \d+\n", patience(10))
        await clear.console.wait_for(r"ok fill 0x300000 ", patience(10))
        for vm in (enc, clear):
            await vm.pause()
        before = ram_copy(enc)
        d1 = await session.dump(base / "d1")
        await enc.resume()
        for gpa, n, byte, width in FILLS:
            await enc.console.command(f"fill {gpa:#x} {n:#x} {byte:#x} {width}", rf"ok fill {gpa:#x} ")
        await enc.pause()
        after = ram_copy(enc)
        d2 = await session.dump(base / "d2", vms=["enc"])
        ranges = [(r.gpa, r.size, r.offset) for r in enc.ram.ranges]
    return dict(key=XtsKey(key, tweak), raw_key=(key, tweak), secret=secret.encode(), clear_text=clear_text.encode(),
                d1=d1, d2=d2, before=before, after=after, ranges=ranges)


@pytest.fixture(scope="module")
def live(baremetal_image, tmp_path_factory):
    return asyncio.run(_scenario(baremetal_image, tmp_path_factory.mktemp("live")))


def offset_of(live, gpa):
    for g, size, off in live["ranges"]:
        if g <= gpa < g + size:
            return off + gpa - g
    raise AssertionError(gpa)


def test_secret_only_in_the_decrypted_view_at_its_gpa(live, tmp_path):
    d1, secret = live["d1"], live["secret"]
    raw = search(d1, Pattern(secret.decode()), max_matches=None)
    assert raw.matches == []
    assert search(d1, Pattern(secret[:8].hex(), hex=True), vm="enc").matches == []
    found = search(d1, Pattern(secret.decode()), key=live["key"])
    enc = d1.region("enc")
    # where the guest's plaintext holds it: at 0x200000, and in the command line it came from
    data, truth, at = live["before"].tobytes(), [], -1
    while (at := data.find(secret, at + 1)) >= 0:
        truth.append(at)
    assert offset_of(live, 0x200000) in truth
    assert [(m.vm, m.hpa - enc.hpa, m.keyid) for m in found.matches] == [("enc", off, enc.keyid) for off in truth]
    assert [m.gpa for m in found.matches if m.hpa - enc.hpa == offset_of(live, 0x200000)] == [0x200000]
    info = {i.vm: i for i in found.regions}
    assert not info["enc"].looks_random and not info["clear"].searched
    wrong = search(d1, Pattern(secret.decode()), key=XtsKey(os.urandom(16), os.urandom(16)))
    assert wrong.matches == [] and {i.vm: i for i in wrong.regions}["enc"].looks_random
    # the no-encrypt VM's text is plaintext in the raw dump
    plain = search(d1, Pattern(live["clear_text"].decode()))
    assert ("clear", 0x200000) in [(m.vm, m.gpa) for m in plain.matches]
    assert {m.vm for m in plain.matches} == {"clear"}


def test_decrypted_range_is_the_guest_plaintext(live, tmp_path):
    d1, before = live["d1"], live["before"]
    enc = d1.region("enc")
    off = offset_of(live, 0x1FF000)
    line = before[off + 0x1000:off + 0x1040].tobytes()
    assert d1.dram(enc.hpa + off + 0x1000, 64).tobytes() == xts_lines(*live["raw_key"], enc.hpa + off + 0x1000, line)
    out = tmp_path / "range.bin"
    ext = extract(d1, out, key=live["key"], gpa=0x1FF000 + 3, nbytes=0x3000, vm="enc")
    assert out.read_bytes() == before[off + 3:off + 3 + 0x3000].tobytes() and not ext.looks_random
    assert out.read_bytes()[0x1000 - 3:0x1000 - 3 + len(live["secret"])] == live["secret"]


def test_keyid_map_and_entropy_match_the_vms(live):
    d1 = live["d1"]
    kmap = keyid_map(d1)
    for i, r in enumerate(kmap.regions):
        mapped = sum(size for _, size, _ in r.gpa_ranges) // 4096
        values, counts = np.unique(kmap.pages[i], return_counts=True)
        got = dict(zip(values.tolist(), counts.tolist()))
        assert got.get(r.keyid) == mapped and got.get(UNTAGGED, 0) == r.nbytes // 4096 - mapped
        assert kmap.mismatched_pages(i) == 0
    assert kmap.regions[0].keyid != kmap.regions[1].keyid
    emap = dump_entropy(d1)
    ent = dict(zip((r.vm for r in emap.regions), emap.entropy))
    assert ent["enc"].min() > 7.9                                # every page of the encrypted VM looks random
    clear = d1.region("clear")
    page = lambda gpa: (clear.gpa_to_hpa(gpa) - clear.hpa) // 4096  # noqa: E731
    assert ent["clear"][page(0x300000)] == 0 and ent["clear"][page(0x301000)] == 0   # filled with 'A'
    assert 0 < ent["clear"][page(0x200000)] < 1                  # one line of text in a zero page
    assert {r.vm for r in emap.low_runs()} == {"clear"}


def test_diff_of_two_live_dumps_is_exactly_what_the_guest_changed(live):
    result = diff_dumps(live["d1"], live["d2"], "enc")
    [d] = result.regions
    base = d.region.hpa
    # all of RAM: the changed ciphertext blocks are exactly the changed plaintext blocks
    truth = np.flatnonzero((live["before"].reshape(-1, 16) != live["after"].reshape(-1, 16)).any(axis=1)) * 16
    np.testing.assert_array_equal(d.changed_block_hpas() - base, truth)
    # away from the guest's own code, stack and buffers, exactly the lines the fills changed
    masks = {}
    for hpa, mask in d.line_masks().items():
        gpa = next(g + hpa - base - off for g, size, off in live["ranges"] if off <= hpa - base < off + size)
        if gpa >= 0x300000:
            masks[gpa] = mask
    assert masks == EXPECTED_LINES
    assert d.page_blocks.sum() == d.changed_blocks and not d.truncated and not d.notes
