import pytest
from hypothesis import given
from hypothesis import strategies as st

from qemu_mktme.arch import cpuid
from qemu_mktme.arch import pconfig as pc
from qemu_mktme.arch.msr import Algorithm


@given(
    st.integers(0, 0xFFFF), st.integers(0, 0xFF), st.integers(0, 0xFFFF), st.integers(0, 0xFF),
    st.binary(min_size=58, max_size=58), st.binary(max_size=64), st.binary(max_size=64),
)
def test_struct_round_trip(keyid, command, enc_alg, ctrl_rsvd, reserved, k1, k2) -> None:
    s = pc.KeyProgramStruct(keyid, command, enc_alg, k1, k2, ctrl_rsvd, reserved)
    raw = s.pack()
    assert len(raw) == 256
    assert pc.KeyProgramStruct.unpack(raw) == s
    assert pc.KeyProgramStruct.unpack(raw[:192]) == s
    assert int.from_bytes(raw[2:6], "little") == command | enc_alg << 8 | ctrl_rsvd << 24


def test_struct_offsets() -> None:
    s = pc.KeyProgramStruct.for_algorithm(5, pc.KEYID_SET_KEY_DIRECT, Algorithm.AES_XTS_256, b"\x11" * 32, b"\x22" * 32)
    raw = s.pack()
    assert raw[0:2] == b"\x05\x00" and raw[2:6] == bytes([0, 4, 0, 0])
    assert raw[64:96] == b"\x11" * 32 and raw[128:160] == b"\x22" * 32 and not any(raw[160:])


def test_struct_repr_hides_keys() -> None:
    s = pc.KeyProgramStruct(1, 0, 1, b"\xab" * 16, b"\xcd" * 16)
    assert "ab" not in repr(s).lower().replace("keyprogramstruct", "") and "\\xab" not in repr(s)
    assert "key_field" not in repr(s)


def test_struct_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError):
        pc.KeyProgramStruct(1 << 16, 0, 1)
    with pytest.raises(ValueError):
        pc.KeyProgramStruct(1, 0, 1, bytes(65))
    with pytest.raises(ValueError):
        pc.KeyProgramStruct.unpack(bytes(100))


def test_single_algorithm() -> None:
    assert pc.KeyProgramStruct(1, 0, 1).single_algorithm() is Algorithm.AES_XTS_128
    assert pc.KeyProgramStruct(1, 0, 4).single_algorithm() is Algorithm.AES_XTS_256
    for bad in (0, 2, 5, 8, 0x8000):
        assert pc.KeyProgramStruct(1, 0, bad).single_algorithm() is None


def test_status_codes() -> None:
    assert [s.value for s in pc.Status] == [0, 1, 2, 3, 4, 5]
    assert pc.Status(5).name == "DEVICE_BUSY"


def test_cpuid_encoders() -> None:
    f = cpuid.CpuidFeatures(tme=True, pconfig=True, maxphyaddr=46)
    l7 = cpuid.leaf7(f)
    assert l7.ecx == 1 << 13 and l7.edx == 1 << 18
    assert cpuid.has_tme(l7) and cpuid.has_pconfig(l7)
    assert cpuid.pconfig_targets([cpuid.leaf1b(f, 0), cpuid.leaf1b(f, 1)]) == [1]
    assert cpuid.maxphyaddr(cpuid.leaf80000008(f)) == 46
    off = cpuid.CpuidFeatures(tme=False, pconfig=False, maxphyaddr=39)
    assert cpuid.leaf7(off) == (0, 0, 0, 0) and cpuid.leaf1b(off, 0).eax == 0
