"""CPUID and every WRMSR rule of IA32_TME_ACTIVATE / EXCLUDE_MASK / EXCLUDE_BASE."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qemu_mktme.arch import cpuid, msr
from qemu_mktme.arch.msr import Algorithm
from qemu_mktme.engine.platform import Platform
from qemu_mktme.errors import ArchitecturalFault, GeneralProtection

A = msr.TME_ACTIVATE


def test_cpuid_enumeration() -> None:
    p = Platform(maxphyaddr=46, max_keyid_bits=6)
    assert cpuid.has_tme(p.cpuid(7, 0)) and cpuid.has_pconfig(p.cpuid(7, 0))
    assert p.cpuid(0x1B, 0) == (1, 1, 0, 0) and p.cpuid(0x1B, 1).eax == 0
    p.bios_activate(keyid_bits=6)
    assert cpuid.maxphyaddr(p.cpuid(0x80000008)) == 46  # not reduced by KEYID_BITS
    q = Platform(max_keyid_bits=0, max_keys=0)
    assert cpuid.has_tme(q.cpuid(7)) and not cpuid.has_pconfig(q.cpuid(7))
    assert p.cpuid(0x12345) == (0, 0, 0, 0)


def test_capability_register() -> None:
    p = Platform(maxphyaddr=46, max_keyid_bits=6, max_keys=63, algorithms=(Algorithm.AES_XTS_256,), bypass_supported=False)
    c = msr.TME_CAPABILITY.decode(p.rdmsr(0x981))
    assert (c.aes_xts_128, c.aes_xts_256, c.tme_encryption_bypass_supported) == (0, 1, 0)
    assert (c.mk_tme_max_keyid_bits, c.mk_tme_max_keys) == (6, 63)
    with pytest.raises(GeneralProtection, match="read-only"):
        p.wrmsr(0x981, 0)


def test_unknown_msr_and_tme_absent() -> None:
    p = Platform()
    for op in (lambda: p.rdmsr(0x10), lambda: p.wrmsr(0x985, 0)):
        with pytest.raises(GeneralProtection):
            op()
    q = Platform(tme_supported=False, max_keyid_bits=0, max_keys=0)
    for m in (0x981, 0x982, 0x983, 0x984):
        with pytest.raises(GeneralProtection, match="not enumerated"):
            q.rdmsr(m)


@pytest.mark.parametrize(
    "value,match",
    [
        (A.encode(tme_enable=1) | 1 << 8, "reserved"),
        (A.encode(tme_enable=1) | 1 << 40, "reserved"),
        (A.encode(tme_enable=1, tme_policy=1), "policy"),
        (A.encode(tme_enable=1, tme_policy=2), "policy"),  # AES-XTS-256 not in CAPABILITY here
        (A.encode(tme_enable=1, mk_tme_keyid_bits=7), "KEYID_BITS 7"),
        (A.encode(tme_enable=0, mk_tme_keyid_bits=1), "TME disabled"),
        (A.encode(tme_enable=1, mk_tme_keyid_bits=2, mk_tme_crypto_algs=0b100), "unsupported"),
        (A.encode(tme_enable=1, mk_tme_keyid_bits=2, mk_tme_crypto_algs=0b10), "unsupported"),
        (A.encode(tme_enable=1, tme_bypass_enable=1), "bypass"),
        (A.encode(tme_enable=1, key_select=1), "stored"),
    ],
)
def test_activate_gp_rules(value: int, match: str) -> None:
    p = Platform(max_keyid_bits=6, algorithms=(Algorithm.AES_XTS_128,), bypass_supported=False)
    with pytest.raises(GeneralProtection, match=match):
        p.wrmsr(0x982, value)
    assert p.rdmsr(0x982) == 0 and not p.activated  # nothing changed


def test_activate_locks_everything() -> None:
    p = Platform()
    p.wrmsr(0x982, A.encode(tme_enable=1, mk_tme_keyid_bits=4, mk_tme_crypto_algs=0b101))
    v = A.decode(p.rdmsr(0x982))
    assert v.lock == 1 and v.mk_tme_keyid_bits == 4 and p.layout.keyid_bits == 4
    for m, val in ((0x982, 0), (0x983, 0), (0x984, 0)):
        with pytest.raises(GeneralProtection, match="locked"):
            p.wrmsr(m, val)


def test_lock_only_disables_tme() -> None:
    p = Platform()
    p.wrmsr(0x982, A.encode(lock=1))  # written lock value is ignored, the write locks
    assert p.activated and p.layout.keyid_bits == 0
    with pytest.raises(GeneralProtection):
        p.pconfig(0, 0)


def test_exclusion_msr_rules() -> None:
    p = Platform(maxphyaddr=46)
    mask_lay = msr.tme_exclude_mask_layout(46)
    p.wrmsr(0x983, mask_lay.encode(enable=1, tmeemask=(1 << 34) - (1 << 10)))
    with pytest.raises(GeneralProtection, match="contiguous"):
        p.wrmsr(0x983, mask_lay.encode(enable=1, tmeemask=0b101 << 20))
    with pytest.raises(GeneralProtection, match="reserved"):
        p.wrmsr(0x983, 1 << 46)
    with pytest.raises(GeneralProtection, match="reserved"):
        p.wrmsr(0x983, 1)
    with pytest.raises(GeneralProtection, match="reserved"):
        p.wrmsr(0x984, 0x800)
    with pytest.raises(GeneralProtection, match="reserved"):
        p.wrmsr(0x984, 1 << 50)
    p.wrmsr(0x984, 0x4000_0000)
    assert p.rdmsr(0x984) == 0x4000_0000


def test_bios_activate_validates_exclude() -> None:
    with pytest.raises(ValueError):
        Platform().bios_activate(keyid_bits=1, exclude=(0x1000, 0x3000))


@given(st.integers(0, 2**64 - 1))
def test_any_activate_value_is_a_defined_outcome(value: int) -> None:
    p = Platform(maxphyaddr=46, max_keyid_bits=6, max_keys=63)
    try:
        p.wrmsr(0x982, value)
    except GeneralProtection:
        assert p.rdmsr(0x982) == 0 and p.layout.keyid_bits == 0
        return
    v = A.decode(value)
    assert not v.reserved and v.tme_policy in (0, 2) and v.mk_tme_keyid_bits <= 6
    assert p.rdmsr(0x982) == value | 1 and p.layout.keyid_bits == v.mk_tme_keyid_bits


def test_standby_resume_restores_tme_key() -> None:
    p = Platform()
    p.bios_activate(keyid_bits=2, save_key=True)
    p.memory.write(0x5000, b"kept across S3".ljust(64, b"."))
    p.resume_from_standby()
    assert not p.activated
    p.bios_activate(keyid_bits=2, restore_key=True)
    assert p.memory.read(0x5000, 14) == b"kept across S3"
    q = Platform()
    q.bios_activate(keyid_bits=2)
    q.memory.write(0x5000, bytes(64))
    q.resume_from_standby()
    with pytest.raises(ArchitecturalFault):
        q.bios_activate(keyid_bits=2, restore_key=True)  # nothing saved


def test_constructor_misuse() -> None:
    with pytest.raises(ValueError):
        Platform(max_keys=64, max_keyid_bits=6)
    with pytest.raises(ValueError):
        Platform(packages=0)
    with pytest.raises(ValueError):
        Platform(memory_homes=[(0, 0x1000, 1)])
