"""The XTS engine against outside references: NIST CAVP vectors, cryptography's XTS unit by unit,
and (for equal key halves, which cryptography refuses) XTS built from single AES blocks.

Every test runs three times: on the compiled helper with each of its whitening kernels (AVX2,
SSE2) and on the numpy reference path (the ``impl`` fixture); the helper must build here (gcc and
libssl-dev come from scripts/setup-host.sh). test_xts_native.py compares the paths with
hypothesis and tests the build and fallback; test_xts_kernels.py the kernels' edge cases."""

import os
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given
from hypothesis import strategies as st

from qemu_mktme.engine import native, xts
from qemu_mktme.engine.xts import (
    XtsKey,
    decrypt_lines,
    decrypt_units,
    encrypt_lines,
    encrypt_units,
)


@pytest.fixture(scope="module")
def helper_lib():
    """The compiled helper, built and loaded for real: a failure here is a failure, not a skip."""
    return native.load(native.build())


@pytest.fixture(params=["avx2", "sse2", "numpy"], autouse=True)
def impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """Each of the helper's whitening kernels, then the numpy path."""
    if request.param == "numpy":
        monkeypatch.setattr(xts, "_helper", lambda: None)
        assert xts.implementation() == "numpy"
        yield "numpy"
        return
    lib = request.getfixturevalue("helper_lib")
    before = native.isa(lib)
    try:
        native.set_isa(lib, request.param)
    except native.HelperUnavailable as err:
        pytest.skip(str(err))  # a CPU without AVX2: the SSE2 kernel is the one in use there
    monkeypatch.setattr(xts, "_helper", lambda: lib)
    assert xts.implementation() == "native"
    yield request.param
    native.set_isa(lib, before)


def _vectors(name: str) -> list[dict[str, str]]:
    path = Path(str(resources.files("cryptography_vectors"))) / "ciphers/AES/XTS/tweak-128hexstr" / name
    out: list[dict[str, str]] = []
    section = ""
    cur: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line.strip("[]")
        elif " = " in line:
            k, v = line.split(" = ", 1)
            if k == "COUNT":
                cur = {"section": section, "COUNT": v}
                out.append(cur)
            else:
                cur[k] = v
    # whole-block units only (no ciphertext stealing): 128 and 256 bits, and the AES-256 file's
    # 384-bit units, since that file has no 128-bit ones
    return [v for v in out if int(v["DataUnitLen"]) % 128 == 0]


VECTORS = [(f, v) for f in ("XTSGenAES128.rsp", "XTSGenAES256.rsp") for v in _vectors(f)]


@pytest.mark.parametrize("fname", ["XTSGenAES128.rsp", "XTSGenAES256.rsp"])
def test_nist_cavp_vectors(fname: str) -> None:
    """Every whole-block vector of the file (one test per file: 1200 tiny tests cost seconds)."""
    checked = 0
    for f, vec in VECTORS:
        if f != fname:
            continue
        key = XtsKey.from_bytes(bytes.fromhex(vec["Key"]))
        tweak = bytes.fromhex(vec["i"])
        pt, ct = bytes.fromhex(vec["PT"]), bytes.fromhex(vec["CT"])
        assert len(pt) * 8 == int(vec["DataUnitLen"])
        where = f"{fname} [{vec['section']}] COUNT = {vec['COUNT']}"
        if vec["section"] == "ENCRYPT":
            assert encrypt_units(key, pt, tweak, len(pt)).tobytes() == ct, where
        else:
            assert decrypt_units(key, ct, tweak, len(ct)).tobytes() == pt, where
        checked += 1
    assert checked == 600


def test_vector_files_were_found() -> None:
    assert len(VECTORS) == 1200  # 600 per file: AES-128 128/256-bit, AES-256 256/384-bit


def _reference_xts(k1: bytes, k2: bytes, data: bytes, tweak: bytes, encrypt: bool) -> bytes:
    """IEEE 1619 from single AES blocks and Python ints: works for equal halves too."""
    e1 = Cipher(algorithms.AES(k1), modes.ECB())
    t = int.from_bytes(Cipher(algorithms.AES(k2), modes.ECB()).encryptor().update(tweak), "little")
    out = b""
    for j in range(0, len(data), 16):
        tb = t.to_bytes(16, "little")
        x = bytes(a ^ b for a, b in zip(data[j : j + 16], tb))
        y = (e1.encryptor() if encrypt else e1.decryptor()).update(x)
        out += bytes(a ^ b for a, b in zip(y, tb))
        t = (t << 1) ^ (0x87 if t >> 127 else 0)
        t &= (1 << 128) - 1
    return out


@given(st.sampled_from([16, 32]), st.integers(1, 40), st.integers(0, 1 << 40))
def test_lines_match_cryptography_unit_by_unit(klen: int, nlines: int, line: int) -> None:
    k1, k2 = os.urandom(klen), os.urandom(klen)
    key = XtsKey(k1, k2)
    hpa = line * 64
    data = os.urandom(64 * nlines)
    ct = encrypt_lines(key, data, hpa)
    for i in range(nlines):
        tweak = (hpa + 64 * i).to_bytes(16, "little")
        ref = Cipher(algorithms.AES(k1 + k2), modes.XTS(tweak)).encryptor().update(data[64 * i : 64 * i + 64])
        assert ct[64 * i : 64 * i + 64].tobytes() == ref
    assert decrypt_lines(key, ct, hpa).tobytes() == data


@given(st.sampled_from([16, 32]), st.integers(1, 12), st.integers(1, 40))
def test_units_match_cryptography(klen: int, units: int, blocks: int) -> None:
    k1, k2 = os.urandom(klen), os.urandom(klen)
    unit = 16 * blocks
    data, tweaks = os.urandom(unit * units), os.urandom(16 * units)
    ct = encrypt_units(XtsKey(k1, k2), data, tweaks, unit)
    for u in range(units):
        ref = Cipher(algorithms.AES(k1 + k2), modes.XTS(tweaks[16 * u : 16 * u + 16])).encryptor().update(data[unit * u : unit * (u + 1)])
        assert ct[unit * u : unit * (u + 1)].tobytes() == ref
    assert decrypt_units(XtsKey(k1, k2), ct, tweaks, unit).tobytes() == data


def test_equal_halves_are_accepted_and_correct() -> None:
    k = os.urandom(16)
    data = os.urandom(64 * 3)
    ct = encrypt_lines(XtsKey(k, k), data, 0x4000)
    for i in range(3):
        tweak = (0x4000 + 64 * i).to_bytes(16, "little")
        assert ct[64 * i : 64 * i + 64].tobytes() == _reference_xts(k, k, data[64 * i : 64 * i + 64], tweak, True)
    assert decrypt_lines(XtsKey(k, k), ct, 0x4000).tobytes() == data


def test_reference_agrees_with_cryptography() -> None:
    k1, k2, d, t = os.urandom(32), os.urandom(32), os.urandom(96), os.urandom(16)
    ref = Cipher(algorithms.AES(k1 + k2), modes.XTS(t)).encryptor().update(d)
    assert _reference_xts(k1, k2, d, t, True) == ref


def test_multi_chunk_and_input_types(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xts, "CHUNK_NBYTES", 1024)
    k1, k2 = os.urandom(16), os.urandom(16)
    key = XtsKey(k1, k2)
    data = os.urandom(64 * 100)
    ref = encrypt_lines(key, data, 0x10000).tobytes()
    last = Cipher(algorithms.AES(k1 + k2), modes.XTS((0x10000 + 64 * 99).to_bytes(16, "little"))).encryptor().update(data[-64:])
    assert ref[-64:] == last
    ro = np.frombuffer(data, np.uint8)
    assert not ro.flags.writeable
    for src in (bytearray(data), memoryview(data), ro, ro.view(np.uint64).reshape(10, -1)):
        assert encrypt_lines(key, src, 0x10000).tobytes() == ref
    out = np.empty(len(data), np.uint8)
    assert encrypt_lines(key, data, 0x10000, out=out) is out and out.tobytes() == ref
    inplace = np.frombuffer(bytearray(data), np.uint8)
    encrypt_lines(key, inplace, 0x10000, out=inplace)
    assert inplace.tobytes() == ref
    unaligned = bytearray(len(data) + 1)
    unaligned[1:] = data
    assert encrypt_lines(key, memoryview(unaligned)[1:], 0x10000).tobytes() == ref


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="16-byte or two 32-byte"):
        XtsKey(bytes(16), bytes(32))
    with pytest.raises(ValueError):
        XtsKey(bytes(24), bytes(24))
    with pytest.raises(TypeError):
        XtsKey("0" * 16, bytes(16))  # type: ignore[arg-type]
    key = XtsKey(bytes(16), bytes(16))
    with pytest.raises(ValueError, match="aligned"):
        encrypt_lines(key, bytes(64), 8)
    with pytest.raises(ValueError, match="multiple"):
        encrypt_lines(key, bytes(65), 0)
    with pytest.raises(ValueError, match="unit_nbytes"):
        encrypt_units(key, bytes(48), bytes(16), 24)
    with pytest.raises(ValueError, match="tweak"):
        encrypt_units(key, bytes(64), bytes(8), 32)
    with pytest.raises(ValueError, match="writable"):
        encrypt_lines(key, bytes(64), 0, out=bytes(64))
    with pytest.raises(ValueError, match="64 bytes"):
        encrypt_lines(key, bytes(64), 0, out=np.empty(32, np.uint8))
    assert encrypt_lines(key, b"", 0).size == 0


def test_key_never_printed() -> None:
    k = XtsKey(b"\xaa" * 16, b"\xbb" * 16)
    for text in (repr(k), str(k), f"{k!r}"):
        assert "aa" not in text.lower() and "bb" not in text.lower() and "\\x" not in text
    assert k == XtsKey(b"\xaa" * 16, b"\xbb" * 16) and k != XtsKey(b"\xaa" * 16, b"\xaa" * 16)
    with pytest.raises(TypeError):
        hash(k)
    with pytest.raises(AttributeError):
        k.algorithm = None  # type: ignore[misc]


def test_line_tweaks_after_explicit_tweaks_of_the_same_shape() -> None:
    """The per-thread scratch is shared by both entry points: an explicit-tweak call must leave
    nothing (its tweaks' high words) behind for the next line call of the same shape."""
    k1, k2 = os.urandom(16), os.urandom(16)
    tweaks = np.frombuffer(os.urandom(48), np.uint8).reshape(3, 16)
    encrypt_units(XtsKey(k1, k2), os.urandom(192), tweaks, 64)
    data = os.urandom(192)
    ct = encrypt_lines(XtsKey(k1, k2), data, 0x4000)
    for i in range(3):
        ref = Cipher(algorithms.AES(k1 + k2), modes.XTS((0x4000 + 64 * i).to_bytes(16, "little"))).encryptor()
        assert ct[64 * i : 64 * i + 64].tobytes() == ref.update(data[64 * i : 64 * i + 64])
