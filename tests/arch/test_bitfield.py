import pytest
from hypothesis import given
from hypothesis import strategies as st

from qemu_mktme.arch import msr
from qemu_mktme.arch.bitfield import BitLayout


def test_layout_must_cover_64_bits() -> None:
    with pytest.raises(ValueError, match="uncovered"):
        BitLayout("X", [("a", 62, 0)])


def test_layout_rejects_overlap_and_duplicates() -> None:
    with pytest.raises(ValueError, match="overlap"):
        BitLayout("X", [("a", 63, 0), ("b", 3, 3)])
    with pytest.raises(ValueError, match="named twice"):
        BitLayout("X", [("a", 31, 0), ("a", 63, 32)])
    with pytest.raises(ValueError, match="range"):
        BitLayout("X", [("a", 64, 0)])


def test_zero_width_rows_are_dropped() -> None:
    lay = BitLayout("X", [("a", 63, 0), ("gone", 4, 5)])
    assert "gone" not in lay


def test_encode_checks_width_and_names() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        msr.TME_ACTIVATE.encode(tme_policy=16)
    with pytest.raises(ValueError, match="no field"):
        msr.TME_ACTIVATE.encode(bogus=1)


@given(st.integers(0, 2**64 - 1))
def test_decode_encode_round_trip(raw: int) -> None:
    lay = msr.TME_ACTIVATE
    v = lay.decode(raw)
    assert v.raw == raw
    assert lay.encode(**{n: x for n, x in v.items()}) == raw
    assert v.reserved == raw & lay.reserved_mask
    assert "IA32_TME_ACTIVATE" in repr(v)


def test_msr_field_positions_match_the_spec() -> None:
    a = msr.TME_ACTIVATE
    assert (a.field("tme_bypass_enable").low, a.field("mk_tme_keyid_bits").low) == (31, 32)
    assert a.field("mk_tme_crypto_algs").low == 48
    c = msr.TME_CAPABILITY
    assert c.field("mk_tme_max_keys").low == 36 and c.field("mk_tme_max_keys").high == 50
    assert msr.tme_exclude_mask_layout(46).field("tmeemask").high == 45


def test_contiguous_mask() -> None:
    assert msr.is_contiguous_mask(0b1111000, 7)
    assert msr.is_contiguous_mask(0, 7)
    assert not msr.is_contiguous_mask(0b1011000, 7)
    assert not msr.is_contiguous_mask(0b0111000, 7)
