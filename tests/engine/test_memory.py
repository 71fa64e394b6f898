"""The two memory views: CPU through a KeyID, DRAM as a probe sees it; attachments."""

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from engine_helpers import direct, program
from hypothesis import given
from hypothesis import strategies as st

from qemu_mktme.arch import pconfig as pc
from qemu_mktme.engine.platform import Platform
from qemu_mktme.errors import AddressError

K1, K2 = bytes(range(16)), bytes(range(100, 116))


def xts_line(data: bytes, hpa: int, k1: bytes = K1, k2: bytes = K2) -> bytes:
    return Cipher(algorithms.AES(k1 + k2), modes.XTS(hpa.to_bytes(16, "little"))).encryptor().update(data)


def test_write_through_keyid_stores_xts_ciphertext(active: Platform) -> None:
    assert program(active, direct(1, K1, K2)).rax == 0
    line = os.urandom(64)
    pa = active.layout.compose(0x1234_5000, 1)
    active.memory.write(pa, line)
    assert active.memory.read_dram(0x1234_5000, 64) == xts_line(line, 0x1234_5000)
    assert active.memory.read(pa, 64) == line
    # same plaintext elsewhere: other ciphertext; same address: deterministic
    active.memory.write(pa + 64, line)
    assert active.memory.read_dram(0x1234_5040, 64) == xts_line(line, 0x1234_5040) != xts_line(line, 0x1234_5000)


def test_wrong_keyid_reads_garbage_without_fault(active: Platform) -> None:
    program(active, direct(1, K1, K2))
    program(active, direct(2, K2, K1))
    data = b"secret tenant data".ljust(64, b"\0")
    active.memory.write(active.layout.compose(0x8000, 1), data)
    other = active.memory.read(active.layout.compose(0x8000, 2), 64)
    expected = Cipher(algorithms.AES(K2 + K1), modes.XTS((0x8000).to_bytes(16, "little"))).decryptor().update(xts_line(data, 0x8000))
    assert other == expected != data
    assert active.memory.read(0x8000, 64) != data  # KeyID 0 (TME key) too
    # an unprogrammed KeyID is garbage as well
    assert active.memory.read(active.layout.compose(0x8000, 9), 64) != data


def test_replay_old_ciphertext(active: Platform) -> None:
    program(active, direct(1, K1, K2))
    pa = active.layout.compose(0x3000, 1)
    active.memory.write(pa, b"A" * 64)
    old = active.memory.read_dram(0x3000, 64)
    active.memory.write(pa, b"B" * 64)
    active.memory.write_dram(0x3000, old)
    assert active.memory.read(pa, 64) == b"A" * 64


def test_no_encrypt_is_plaintext_in_dram(active: Platform) -> None:
    program(active, pc.KeyProgramStruct(3, pc.KEYID_NO_ENCRYPT, 1))
    active.memory.write(active.layout.compose(0x9000, 3), b"visible" * 10)
    assert active.memory.read_dram(0x9000, 70) == b"visible" * 10


def test_keyid0_tme_key_vs_bypass_and_clear() -> None:
    p = Platform()
    p.bios_activate(keyid_bits=4)
    program(p, pc.KeyProgramStruct(5, pc.KEYID_CLEAR_KEY, 1))
    p.memory.write(0x7000, b"x" * 64)
    assert p.memory.read_dram(0x7000, 64) != b"x" * 64  # TME key
    assert p.memory.read(p.layout.compose(0x7000, 5), 64) == b"x" * 64  # CLEAR == KeyID 0
    q = Platform()
    q.bios_activate(keyid_bits=4, bypass=True)
    program(q, pc.KeyProgramStruct(5, pc.KEYID_CLEAR_KEY, 1))
    q.memory.write(0x7000, b"x" * 64)
    assert q.memory.read_dram(0x7000, 64) == b"x" * 64
    q.memory.write(q.layout.compose(0x7040, 5), b"y" * 64)
    assert q.memory.read_dram(0x7040, 64) == b"y" * 64
    # two boots have two TME keys
    r = Platform()
    r.bios_activate(keyid_bits=4)
    r.memory.write_dram(0x7000, p.memory.read_dram(0x7000, 64))
    assert r.memory.read(0x7000, 64) != b"x" * 64


def test_before_activation_memory_is_plaintext() -> None:
    p = Platform()
    p.memory.write(0x1000, b"boot" * 16)
    assert p.memory.read_dram(0x1000, 64) == b"boot" * 16


def test_exclusion_range_applies_to_keyid0_only() -> None:
    p = Platform()
    p.bios_activate(keyid_bits=4, exclude=(0x10_0000, 0x10_0000))
    program(p, direct(1, K1, K2))
    program(p, pc.KeyProgramStruct(2, pc.KEYID_CLEAR_KEY, 1))
    p.memory.write(0x10_0000, b"e" * 64)
    p.memory.write(0x1F_FFC0, b"f" * 64)
    p.memory.write(0x20_0000, b"g" * 64)
    assert p.memory.read_dram(0x10_0000, 64) == b"e" * 64 and p.memory.read_dram(0x1F_FFC0, 64) == b"f" * 64
    assert p.memory.read_dram(0x20_0000, 64) != b"g" * 64
    p.memory.write(p.layout.compose(0x10_0040, 1), b"h" * 64)
    assert p.memory.read_dram(0x10_0040, 64) == xts_line(b"h" * 64, 0x10_0040)
    p.memory.write(p.layout.compose(0x10_0080, 2), b"i" * 64)
    assert p.memory.read_dram(0x10_0080, 64) != b"i" * 64  # CLEAR uses the TME key there
    # an access spanning the boundary splits correctly
    p.memory.write(0x1F_FF80, b"j" * 256)
    assert p.memory.read(0x1F_FF80, 256) == b"j" * 256
    assert p.memory.read_dram(0x1F_FF80, 128) == b"j" * 128 and p.memory.read_dram(0x20_0000, 128) != b"j" * 128


def test_sparse_46_bit_space(active: Platform) -> None:
    top = (1 << 40) - 64  # top of the HPA space with 6 KeyID bits
    active.memory.write(active.layout.compose(top, 0), b"z" * 64)
    active.memory.write(0, b"a")
    assert active.memory.touched_pages == 2
    assert active.memory.read_dram(0x5555_0000, 128) == bytes(128)  # untouched DRAM is zeros
    with pytest.raises(AddressError):
        active.memory.read(1 << 46, 1)
    with pytest.raises(AddressError):
        active.memory.read(top, 128)  # would run into the KeyID bits
    with pytest.raises(AddressError):
        active.memory.read_dram(1 << 40, 1)


def test_partial_writes_read_modify_write(active: Platform) -> None:
    program(active, direct(1, K1, K2))
    pa = active.layout.compose(0x6000, 1)
    active.memory.write(pa, bytes(range(192)))
    active.memory.write(pa + 61, b"\xff" * 70)
    want = bytearray(range(192))
    want[61:131] = b"\xff" * 70
    assert active.memory.read(pa, 192) == bytes(want)
    assert active.memory.read(pa + 5, 3) == bytes(want[5:8])
    active.memory.write_dram(0x6001, b"\0")  # a probe flipping one byte garbles that line only
    got = active.memory.read(pa, 192)
    assert got[64:] == bytes(want[64:]) and got[:64] != bytes(want[:64])
    active.memory.write_qword(pa + 8, 0x1122334455667788)
    assert active.memory.read_qword(pa + 8) == 0x1122334455667788


def test_multi_package_homes() -> None:
    p = Platform(packages=2, memory_homes=[(0, 1 << 30, 0), (1 << 30, 1 << 31, 1)])
    p.bios_activate(keyid_bits=6)
    program(p, direct(1, K1, K2), package=0)
    lo, hi = p.layout.compose(0x1000, 1), p.layout.compose((1 << 30) + 0x1000, 1)
    p.memory.write(lo, b"L" * 64)
    p.memory.write(hi, b"H" * 64)
    assert p.memory.read_dram(0x1000, 64) == xts_line(b"L" * 64, 0x1000)
    assert p.memory.read_dram((1 << 30) + 0x1000, 64) != xts_line(b"H" * 64, (1 << 30) + 0x1000)
    assert [r.keyid for r in p.inconsistencies()] == [1]
    program(p, direct(1, K1, K2), package=1)
    assert p.inconsistencies() == []
    assert p.memory.read(hi, 64) != b"H" * 64  # written under package 1's old unknown key
    p.memory.write(hi, b"H" * 64)
    assert p.memory.read_dram((1 << 30) + 0x1000, 64) == xts_line(b"H" * 64, (1 << 30) + 0x1000)
    # a range across the home boundary
    edge = p.layout.compose((1 << 30) - 64, 1)
    p.memory.write(edge, b"E" * 128)
    assert p.memory.read(edge, 128) == b"E" * 128


def test_read_array_is_read_only(active: Platform) -> None:
    arr = active.memory.read_array(0x1000, 64)
    assert not arr.flags.writeable


# --- attachments ------------------------------------------------------------------------------

BASE = 0x20_0000
NBYTES = 0x3000


def _twins() -> tuple[Platform, Platform, np.ndarray]:
    """Two identically keyed platforms; the second backs [BASE, BASE+NBYTES) with a buffer."""
    ps = []
    for _ in range(2):
        p = Platform(packages=1, rng=lambda n: bytes(n))
        p.bios_activate(keyid_bits=4, bypass=True)  # KeyID 0 plaintext: same on both platforms
        program(p, direct(1, K1, K2))
        program(p, direct(2, K2, K1, ))
        program(p, pc.KeyProgramStruct(3, pc.KEYID_NO_ENCRYPT, 1))
        program(p, pc.KeyProgramStruct(4, pc.KEYID_CLEAR_KEY, 1))
        ps.append(p)
    init = os.urandom(NBYTES)
    ps[0].memory.write(ps[0].layout.compose(BASE, 1), init)
    buf = np.frombuffer(bytearray(init), np.uint8)
    ps[1].memory.attach_cpu_view(BASE, buf, 1)
    return ps[0], ps[1], buf


ops = st.lists(
    st.tuples(
        st.sampled_from(["read", "write", "read_dram", "write_dram"]),
        st.integers(BASE - 256, BASE + NBYTES + 64),
        st.integers(1, 300),
        st.sampled_from([0, 1, 2, 3, 4]),  # all programmed: unknown keys differ per platform
    ),
    min_size=1,
    max_size=12,
)


@given(ops)
def test_attachment_equals_dram_backed_memory(sequence: list) -> None:
    plain, attached, buf = _twins()
    for op, hpa, n, keyid in sequence:
        data = os.urandom(n)
        for p in (plain, attached):
            pa = p.layout.compose(hpa, keyid)
            if op == "read":
                pass
            elif op == "write":
                p.memory.write(pa, data)
            elif op == "write_dram":
                p.memory.write_dram(hpa, data)
        if op == "read":
            assert plain.memory.read(plain.layout.compose(hpa, keyid), n) == attached.memory.read(attached.layout.compose(hpa, keyid), n)
        if op == "read_dram":
            assert plain.memory.read_dram(hpa, n) == attached.memory.read_dram(hpa, n)
    assert plain.memory.read_dram(BASE - 256, NBYTES + 512) == attached.memory.read_dram(BASE - 256, NBYTES + 512)
    assert attached.memory.read(attached.layout.compose(BASE, 1), NBYTES) == buf.tobytes()


def test_attachment_fast_path_and_garbage() -> None:
    _, p, buf = _twins()
    view = p.memory.read_array(p.layout.compose(BASE + 64, 1), 128)
    assert np.shares_memory(view, buf) and not view.flags.writeable
    buf[64:192] = 7
    assert p.memory.read(p.layout.compose(BASE + 64, 1), 128) == bytes([7]) * 128
    assert p.memory.read_dram(BASE + 64, 64) == xts_line(bytes([7]) * 64, BASE + 64)
    p.memory.write(p.layout.compose(BASE, 2), b"Q" * 64)  # another KeyID writes: guest sees garbage
    assert buf[:64].tobytes() != b"Q" * 64
    assert p.memory.read(p.layout.compose(BASE, 2), 64) == b"Q" * 64
    p.memory.write_dram(BASE, xts_line(b"R" * 64, BASE))
    assert buf[:64].tobytes() == b"R" * 64


def test_attachment_transcoded_on_rekey() -> None:
    plain, attached, buf = _twins()
    before = attached.memory.read_dram(BASE, NBYTES)
    assert before == plain.memory.read_dram(BASE, NBYTES)
    for p in (plain, attached):
        program(p, direct(1, K2, K2))  # PCONFIG does not touch DRAM
    assert attached.memory.read_dram(BASE, NBYTES) == before
    assert attached.memory.read(attached.layout.compose(BASE, 1), NBYTES) == buf.tobytes()
    assert buf.tobytes() == plain.memory.read(plain.layout.compose(BASE, 1), NBYTES)


def test_attach_rules() -> None:
    _, p, buf = _twins()
    with pytest.raises(AddressError, match="overlaps"):
        p.memory.attach_cpu_view(BASE + 0x1000, np.zeros(0x1000, np.uint8), 0)
    with pytest.raises(ValueError, match="4 KiB"):
        p.memory.attach_cpu_view(0x1800, np.zeros(0x1000, np.uint8), 0)
    with pytest.raises(ValueError, match="writable"):
        p.memory.attach_cpu_view(0x1000, np.frombuffer(bytes(4096), np.uint8), 0)
    with pytest.raises(ValueError, match="keyid"):
        p.memory.attach_cpu_view(0x1000, np.zeros(0x1000, np.uint8), 16)
    with pytest.raises(AddressError):
        p.memory.attach_cpu_view(1 << 42, np.zeros(0x1000, np.uint8), 0)
    assert np.shares_memory(p.memory.detach_cpu_view(BASE).buffer, buf)
    assert p.memory.read_dram(BASE, 64) == bytes(64)
    with pytest.raises(AddressError):
        p.memory.detach_cpu_view(BASE)
    mv = memoryview(bytearray(0x1000))
    p.memory.attach_cpu_view(0x5000, mv, 3)
    p.memory.write(p.layout.compose(0x5000, 3), b"mv")
    assert bytes(mv[:2]) == b"mv"
