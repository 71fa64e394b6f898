"""Search in raw and decrypted DRAM, decrypting ranges to files, key specs."""

from __future__ import annotations

import os
import re
import stat

import numpy as np
import pytest

from qemu_mktme.engine.xts import XtsKey
from qemu_mktme.errors import AddressError, SnapshotError
from qemu_mktme.inspect import decrypt as decrypt_mod
from qemu_mktme.inspect.decrypt import extract, read_plaintext
from qemu_mktme.keymaterial import xts_key as parse_key_spec
from qemu_mktme.inspect import search as search_mod
from qemu_mktme.inspect.search import Pattern, search

from conftest import BOUNDARY_SECRET, GIB, MIB, SECRET, TEXT
from reference import xts_lines


def keys(scene, vm="vm1"):
    return XtsKey(*scene.keys[vm])


def test_dump_holds_reference_xts_ciphertext(scene_dumps):
    scene, d1, _, before, _ = scene_dumps
    r = d1.region("vm1")
    k, t = scene.keys["vm1"]
    line = before["vm1"][0x200000:0x200040].tobytes()
    assert d1.dram(r.hpa + 0x200000, 64).tobytes() == xts_lines(k, t, r.hpa + 0x200000, line)


def test_raw_search_finds_no_secret_in_ciphertext_but_finds_plaintext_vm(scene_dumps):
    scene, d1, *_ = scene_dumps
    result = search(d1, Pattern(SECRET.decode()), max_matches=None)
    assert [(m.vm, m.gpa) for m in result.matches] == [("vm2", 0x200000)]        # the no-encrypt VM only
    m = result.matches[0]
    assert m.hpa == d1.region("vm2").hpa + 0x200000 and m.keyid == scene.guests["vm2"].keyid
    assert m.data == SECRET and m.nbytes == len(SECRET)
    assert search(d1, Pattern(SECRET.decode()), vm="vm1").matches == []
    assert search(d1, Pattern(SECRET[:8].hex(), hex=True), vm="vm2").matches[0].gpa == 0x200000
    rx = search(d1, Pattern(rb"TOP-SECRET-[a-z-]+\d{4}".decode(), regex=True))
    assert [(m.vm, m.data) for m in rx.matches] == [("vm2", SECRET)]


def test_decrypted_search_reports_vm_hpa_gpa_keyid(scene_dumps):
    scene, d1, *_ = scene_dumps
    result = search(d1, Pattern(SECRET.decode()), key=keys(scene))
    assert [(m.vm, m.gpa) for m in result.matches] == [("vm1", 0x200000)]
    m = result.matches[0]
    r = d1.region("vm1")
    assert m.hpa == r.hpa + 0x200000 and m.keyid == r.keyid and m.data == SECRET
    infos = {i.vm: i for i in result.regions}
    assert infos["vm1"].decrypted and not infos["vm1"].looks_random and infos["vm1"].low_entropy_pages > 0
    assert not infos["vm2"].searched and "no-encrypt" in infos["vm2"].reason
    assert not infos["vm3"].searched and "aes-xts-256" in infos["vm3"].reason
    hi = search(d1, Pattern(SECRET.decode()), key=keys(scene, "vm3"))
    assert [(m.vm, m.gpa) for m in hi.matches] == [("vm3", 0x10000)]


def test_matches_across_chunk_boundaries_are_found_once(scene_dumps):
    scene, d1, *_ = scene_dumps
    gpa = 4 * MIB - 7                                # VM1 maps backend offset o at GPA o here
    for pattern in (Pattern(BOUNDARY_SECRET.decode()), Pattern("ACROSS-THE-4MiB-[A-Z-]+", regex=True)):
        result = search(d1, pattern, key=keys(scene), max_matches=None)
        assert [(m.gpa, m.data) for m in result.matches] == [(gpa, BOUNDARY_SECRET)]
    # a pattern of just the part after the boundary, and one of the part before
    after = search(d1, Pattern(BOUNDARY_SECRET[7:].decode()), key=keys(scene))
    before = search(d1, Pattern(BOUNDARY_SECRET[:7].decode()), key=keys(scene))
    assert [m.gpa for m in after.matches] == [4 * MIB] and [m.gpa for m in before.matches] == [gpa]


def reference_matches(plain: bytes, pattern: Pattern) -> list[tuple[int, bytes]]:
    """Offsets and bytes of every match in one pass over the whole plaintext."""
    if pattern.regex:
        return [(m.start(), m.group()[:64]) for m in re.finditer(pattern.compiled.pattern, plain)]
    out, at = [], plain.find(pattern.needle)
    while at >= 0:
        out.append((at, pattern.needle[:64]))
        at = plain.find(pattern.needle, at + 1)
    return out


@pytest.mark.parametrize("chunk", [4096, 4 << 20])
@pytest.mark.parametrize("text,regex", [("the ", False), ("e", False), ("clocks (?:[a-z]+ ){2}", True), ("ACROSS", False)])
def test_decrypted_search_equals_one_pass_over_the_plaintext(scene_dumps, monkeypatch, chunk, text, regex):
    scene, d1, _, before, _ = scene_dumps
    monkeypatch.setattr(search_mod, "CHUNK_NBYTES", chunk)
    pattern = Pattern(text, regex=regex)
    base = d1.region("vm1").hpa
    got = [(m.hpa - base, m.data) for m in search(d1, pattern, key=keys(scene), max_matches=None).matches]
    expected = reference_matches(before["vm1"].tobytes(), pattern)
    assert expected and got == expected


def test_regex_matches_straddling_the_carry_do_not_overlap(scene_dumps):
    scene, d1, *_ = scene_dumps
    start = 4 * MIB - 7
    for window in (3, 5, 64):
        result = search(d1, Pattern("[A-Za-z0-9-]{3}", regex=True, window=window), key=keys(scene), max_matches=None)
        got = [m.gpa for m in result.matches if start <= m.gpa < start + len(BOUNDARY_SECRET)]
        assert got == [start + 3 * i for i in range(len(BOUNDARY_SECRET) // 3)], window


def test_literal_matches_overlap_regex_matches_do_not_and_limits_hold(scene_dumps):
    scene, d1, *_ = scene_dumps
    zeros = search(d1, Pattern("00" * 16, hex=True), key=keys(scene), max_matches=5)
    assert len(zeros.matches) == 5 and zeros.truncated
    assert [m.hpa - zeros.matches[0].hpa for m in zeros.matches] == [0, 1, 2, 3, 4]
    text = search(d1, Pattern("clocks were", regex=False), key=keys(scene), max_matches=None)
    assert len(text.matches) == 2 * TEXT.count(b"clocks were") and not text.truncated   # two copies of TEXT
    assert all(0x300000 <= m.gpa < 0x301000 or 0x302800 <= m.gpa < 0x303800 for m in text.matches)
    rx = search(d1, Pattern("(?:thirteen. )+", regex=True), key=keys(scene), max_matches=None)
    assert len(rx.matches) == 2 * TEXT.count(b"thirteen. ")


def test_wrong_key_decrypts_to_random_and_finds_nothing(scene_dumps):
    scene, d1, *_ = scene_dumps
    wrong = XtsKey(os.urandom(16), os.urandom(16))
    result = search(d1, Pattern(SECRET.decode()), key=wrong)
    assert result.matches == []
    info = next(i for i in result.regions if i.vm == "vm1")
    assert info.looks_random and info.sampled_pages == 12 * MIB // 4096 // 16 and info.mean_bits > 7.9
    search_mod.CHUNK_NBYTES, saved = 4096 * 3, search_mod.CHUNK_NBYTES      # chunks not aligned to the stride
    try:
        again = search(d1, Pattern(SECRET.decode()), key=wrong, vm="vm1").regions[0]
    finally:
        search_mod.CHUNK_NBYTES = saved
    assert again.sampled_pages == info.sampled_pages and again.mean_bits == pytest.approx(info.mean_bits)


def test_key_for_no_vm_of_the_dump_is_an_error(scene_dumps, tmp_path):
    scene, d1, *_ = scene_dumps
    with pytest.raises(ValueError, match="applies to no VM.*vm3 is encrypted with aes-xts-256, the key is aes-xts-128"):
        search(d1, Pattern("x"), key=keys(scene), vm="vm3")
    with pytest.raises(ValueError, match="not encrypted"):
        search(d1, Pattern("x"), key=keys(scene), vm="vm2")
    with pytest.raises(ValueError, match="aes-xts-256"):
        extract(d1, tmp_path / "o", key=keys(scene), gpa=0, nbytes=64, vm="vm3")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("gpa,nbytes", [(0x200000, len(SECRET)), (0x2FFFF3, 0x2345), (0x9FFFC0, 64),
                                        (4 * GIB + 5, 2 * MIB - 5), (0, 0xA0000)])
def test_extract_writes_exactly_the_plaintext(scene_dumps, tmp_path, gpa, nbytes):
    scene, d1, _, before, _ = scene_dumps
    out = tmp_path / "plain.bin"
    ext = extract(d1, out, key=keys(scene), gpa=gpa, nbytes=nbytes, vm="vm1")
    off = scene.guests["vm1"].hpa_of(gpa) - scene.guests["vm1"].hpa_base
    assert out.read_bytes() == before["vm1"][off:off + nbytes].tobytes()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert ext.hpa == d1.region("vm1").hpa + off and ext.gpa == gpa and ext.decrypted
    assert not ext.looks_random
    assert list(tmp_path.iterdir()) == [out]


def test_extract_by_hpa_raw_and_read_plaintext(scene_dumps, tmp_path):
    scene, d1, _, before, _ = scene_dumps
    r = d1.region("vm1")
    ext = extract(d1, tmp_path / "a", key=keys(scene), hpa=r.hpa + 0x300000, nbytes=4096)
    assert (tmp_path / "a").read_bytes() == TEXT and ext.vm == "vm1" and ext.gpa == 0x300000
    raw = extract(d1, tmp_path / "b", key=None, gpa=0x100000, nbytes=4096, vm="vm2")
    assert (tmp_path / "b").read_bytes() == TEXT and not raw.decrypted and not raw.looks_random
    assert read_plaintext(d1, r, keys(scene), r.hpa + 0x200003, 5).tobytes() == SECRET[3:8]


def test_extract_with_a_wrong_key_says_the_pages_look_random(scene_dumps, tmp_path):
    _, d1, *_ = scene_dumps
    ext = extract(d1, tmp_path / "o", key=XtsKey(os.urandom(16), os.urandom(16)), gpa=0x200000, nbytes=16, vm="vm1")
    assert ext.looks_random and ext.pages == 1 and ext.mean_bits > 7.9


def test_extract_bad_ranges_and_outputs(scene_dumps, tmp_path):
    scene, d1, *_ = scene_dumps
    key = keys(scene)
    out = tmp_path / "o"
    for gpa, n in ((0xA0000, 16), (0x9FFF0, 32), (10 * MIB, 1), (4 * GIB + 2 * MIB - 8, 16)):
        with pytest.raises(AddressError, match="is not in the dump"):
            extract(d1, out, key=key, gpa=gpa, nbytes=n, vm="vm1")
    with pytest.raises(AddressError, match="not in the dump"):
        extract(d1, out, key=key, hpa=0x1000, nbytes=16)
    with pytest.raises(AddressError, match="outside its DRAM"):
        r = d1.region("vm1")
        extract(d1, out, key=key, hpa=r.end - 8, nbytes=16)
    with pytest.raises(ValueError, match="holds 3 VMs"):
        extract(d1, out, key=key, gpa=0, nbytes=16)
    assert not out.exists()
    out.write_bytes(b"keep me")
    with pytest.raises(SnapshotError, match="exists already"):
        extract(d1, out, key=key, gpa=0x200000, nbytes=16, vm="vm1")
    assert out.read_bytes() == b"keep me"
    extract(d1, out, key=key, gpa=0x200000, nbytes=16, vm="vm1", force=True)
    assert out.read_bytes() == SECRET[:16] and stat.S_IMODE(out.stat().st_mode) == 0o600


def test_failed_extract_leaves_nothing(scene_dumps, tmp_path, monkeypatch):
    scene, d1, *_ = scene_dumps
    real = decrypt_mod.iter_plaintext

    def failing(*args, **kwargs):
        for i, item in enumerate(real(*args, chunk_nbytes=64 << 10, **kwargs)):
            if i == 3:
                raise OSError(28, "No space left on device")
            yield item
    monkeypatch.setattr(decrypt_mod, "iter_plaintext", failing)
    with pytest.raises(SnapshotError, match="cannot write .*No space left on device"):
        extract(d1, tmp_path / "o", key=keys(scene), gpa=MIB, nbytes=MIB, vm="vm1")
    assert list(tmp_path.iterdir()) == []


def test_key_specs(key_file):
    k, t = os.urandom(16), os.urandom(16)
    assert parse_key_spec(f"{k.hex()}:{t.hex()}") == XtsKey(k, t)
    assert parse_key_spec(f"user:{k.hex()}:{t.hex()}:aes-xts-128") == XtsKey(k, t)
    assert parse_key_spec(f"@{key_file(k, t)}") == XtsKey(k, t)
    k2, t2 = os.urandom(32), os.urandom(32)
    assert parse_key_spec(f"@{key_file(k2, t2)}:aes-xts-256") == XtsKey(k2, t2)
    assert parse_key_spec(f"@{key_file(k2, t2, ' aes-xts-256')}") == XtsKey(k2, t2)
    secret_hex = k.hex()
    bad = [f"{secret_hex}", f"{secret_hex}:{t.hex()}:aes-xts-256", f"{secret_hex}:zz{t.hex()[2:]}",
           f"{secret_hex}:{t.hex()}00", f"{secret_hex}:{t.hex()}:{t.hex()}", "@/nonexistent/key",
           f"@{key_file(k, t, ' extra words')}", ""]
    for spec in bad:
        with pytest.raises(ValueError) as info:
            parse_key_spec(spec)
        assert secret_hex not in str(info.value) and t.hex() not in str(info.value)
        assert t.hex()[2:] not in str(info.value)
    assert secret_hex not in repr(parse_key_spec(f"{k.hex()}:{t.hex()}"))
    for spec, words in [(f"{'00' * 16}:{t.hex()}", "key is all zeros"), (f"{k.hex()}:{'00' * 16}", "tweak key is all zeros"),
                        (f"{k.hex()}:{k.hex()}", "equal")]:
        with pytest.raises(ValueError, match=words) as info:     # no VM can have been keyed so
            parse_key_spec(spec)
        assert secret_hex not in str(info.value)


def test_patterns_are_checked():
    with pytest.raises(ValueError, match="empty"):
        Pattern("")
    with pytest.raises(ValueError, match="not hex"):
        Pattern("xyz", hex=True)
    with pytest.raises(ValueError, match="bad regular expression"):
        Pattern("(", regex=True)
    with pytest.raises(ValueError, match="empty string"):
        Pattern("a*", regex=True)
    assert "SECRET" not in repr(Pattern("SECRET"))
    np.testing.assert_equal(Pattern("ab").needle, b"ab")
