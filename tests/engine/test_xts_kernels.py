"""The compiled helper's two whitening kernels (SSE2, AVX2) where vector code goes wrong: input
and output at odd alignments, line and block counts that are not a multiple of the vector width
or of the helper's 2 KiB step, a single line, units that span steps, calls large enough for
streaming stores (output 32-, 16- and 8-byte aligned), in place; each kernel against
cryptography's XTS and against the other. Then how a kernel is chosen (``QEMU_MKTME_XTS``) and
reported (``native.status()``, the line ``qemu-mktme doctor`` prints)."""

import functools
import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from qemu_mktme.engine import native, xts
from qemu_mktme.engine.xts import (
    XtsKey,
    decrypt_lines,
    decrypt_units,
    encrypt_lines,
    encrypt_units,
)
from qemu_mktme.errors import MktmeError

KERNELS = ["sse2", "avx2"]
STREAM_MIN = 8 << 20  # the helper's STREAM_MIN_BYTES
K1, K2 = bytes(range(1, 33)), bytes(range(101, 133))


@pytest.fixture(scope="module")
def lib():
    lib = native.load(native.build())
    before = native.isa(lib)
    yield lib
    native.set_isa(lib, before)


def _on(lib, kernel: str, call):
    """call() through the helper with whitening kernel ``kernel``."""
    try:
        native.set_isa(lib, kernel)
    except native.HelperUnavailable as err:
        pytest.skip(str(err))  # no AVX2 on this CPU: the helper runs SSE2 there
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(xts, "_helper", lambda: lib)
        return call()


def _numpy(call):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(xts, "_helper", lambda: None)
        return call()


def _buffer(data: bytes, misalign: int) -> np.ndarray:
    """data in a fresh array starting ``misalign`` bytes past a 64-byte boundary."""
    raw = np.empty(len(data) + 128, np.uint8)
    start = (-raw.ctypes.data) % 64 + misalign
    view = raw[start:start + len(data)]
    view[:] = np.frombuffer(data, np.uint8)
    return view


def _xts(klen: int, tweak: bytes, data: bytes, encrypt: bool = True) -> bytes:
    c = Cipher(algorithms.AES(K1[:klen] + K2[:klen]), modes.XTS(tweak))
    return (c.encryptor() if encrypt else c.decryptor()).update(data)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("nlines", [1, 2, 3, 31, 33, 65])  # around 2 lines a register, 32 a step
@pytest.mark.parametrize("in_off,out_off", [(0, 0), (16, 48), (5, 13)])
@pytest.mark.parametrize("klen", [16, 32])
def test_lines_against_cryptography(lib, kernel, nlines, in_off, out_off, klen) -> None:
    key, hpa = XtsKey(K1[:klen], K2[:klen]), 0x3_ffff_f000 - 64 * (nlines // 2)
    data = os.urandom(64 * nlines)
    src, out = _buffer(data, in_off), _buffer(bytes(64 * nlines), out_off)
    assert _on(lib, kernel, lambda: encrypt_lines(key, src, hpa, out=out)) is out
    ct = out.tobytes()
    for i in range(nlines):
        assert ct[64 * i:64 * i + 64] == _xts(klen, (hpa + 64 * i).to_bytes(16, "little"), data[64 * i:64 * i + 64]), i
    # explicit tweaks, 64-byte units: the same loops with the tweaks given
    tweaks = b"".join((hpa + 64 * i).to_bytes(16, "little") for i in range(nlines))
    assert _on(lib, kernel, lambda: encrypt_units(key, src, tweaks, 64)).tobytes() == ct
    back = _buffer(bytes(64 * nlines), in_off)
    _on(lib, kernel, lambda: decrypt_lines(key, out, hpa, out=back))
    assert back.tobytes() == data


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("unit", [16, 48, 80, 2064, 4096])  # 2064: 129 blocks, across two steps
@pytest.mark.parametrize("klen", [16, 32])
def test_units_against_cryptography(lib, kernel, unit, klen) -> None:
    key, units = XtsKey(K1[:klen], K2[:klen]), 3
    data, tweaks = os.urandom(unit * units), os.urandom(16 * units)
    out = _buffer(bytes(unit * units), 16)
    _on(lib, kernel, lambda: encrypt_units(key, _buffer(data, 7), tweaks, unit, out=out))
    for u in range(units):
        assert out[unit * u:unit * (u + 1)].tobytes() == _xts(klen, tweaks[16 * u:16 * u + 16], data[unit * u:unit * (u + 1)])
    assert _on(lib, kernel, lambda: decrypt_units(key, out, tweaks, unit)).tobytes() == data


LARGE_LINES = STREAM_MIN // 64 + 3  # streaming, and an odd tail (one line through SSE2 in AVX2)
LARGE_UNITS = 1024 * (STREAM_MIN // (48 * 1024) + 1) + 5  # 48-byte units: a last step of 15 blocks
HPA = 0x7f_ffc0_0000


@functools.lru_cache(maxsize=1)
def _large() -> tuple[bytes, bytes, bytes, bytes, bytes]:
    """Input and the numpy path's output (the reference, itself checked against cryptography)
    for a large line call and a large 48-byte-unit call."""
    key = XtsKey(K1[:16], K2[:16])
    lines = os.urandom(64 * LARGE_LINES)
    units = os.urandom(48 * LARGE_UNITS)
    tweaks = os.urandom(16 * LARGE_UNITS)
    return (lines, _numpy(lambda: encrypt_lines(key, lines, HPA)).tobytes(), units, tweaks,
            _numpy(lambda: encrypt_units(key, units, tweaks, 48)).tobytes())


@pytest.mark.parametrize("out_off", [0, 16, 8])  # streamed 32 bytes a store, 16, not at all
def test_large_calls_both_kernels_agree_with_the_reference(lib, out_off) -> None:
    key = XtsKey(K1[:16], K2[:16])
    lines, lines_ct, units, tweaks, units_ct = _large()
    for kernel in KERNELS:
        out = _buffer(bytes(len(lines)), out_off)
        _on(lib, kernel, lambda out=out: encrypt_lines(key, _buffer(lines, 16), HPA, out=out))
        assert out.tobytes() == lines_ct, kernel
        _on(lib, kernel, lambda out=out: decrypt_lines(key, out, HPA, out=out))  # in place
        assert out.tobytes() == lines, kernel
        out = _buffer(bytes(len(units)), out_off)
        _on(lib, kernel, lambda out=out: encrypt_units(key, units, tweaks, 48, out=out))
        assert out.tobytes() == units_ct, kernel
    last = len(lines) - 64  # and the reference itself, on the last line
    assert lines_ct[last:] == _xts(16, (HPA + last).to_bytes(16, "little"), lines[last:])
    assert units_ct[-48:] == _xts(16, tweaks[-16:], units[-48:])


def test_the_kernel_is_chosen_by_the_environment_and_reported(lib, monkeypatch: pytest.MonkeyPatch) -> None:
    assert native.isa(lib) in KERNELS
    for kernel in KERNELS:
        monkeypatch.setenv(native.ENV_SELECT, kernel)
        monkeypatch.setattr(native, "_state", {})
        try:
            status = native.status()
        except native.HelperUnavailable as err:
            assert kernel == "avx2" and "no AVX2" in str(err)
            continue
        assert status.startswith(f"compiled helper over OpenSSL libcrypto, native ({kernel}) (")
        assert native.isa(native.helper()) == kernel
    monkeypatch.setenv(native.ENV_SELECT, "avx512")
    monkeypatch.setattr(native, "_state", {})
    with pytest.raises(native.HelperUnavailable, match="QEMU_MKTME_XTS=avx512: expected numpy, native, sse2 or avx2") as bad:
        native.helper()
    assert isinstance(bad.value, MktmeError)  # the CLI prints these as one line
    with pytest.raises(ValueError, match="unknown XTS kernel"):
        native.set_isa(lib, "avx512")

