"""AES-XTS (IEEE 1619) over many data units per call: the memory-encryption engine.

Shaped like ``cryptography``'s hazmat layer: an immutable :class:`XtsKey` checks itself when
built, and buffer-to-buffer functions do the work. ``encrypt_lines`` / ``decrypt_lines`` treat
each 64-byte cache line as one data unit whose tweak is the line's host physical address as 16
bytes little-endian (mktme.md §4, model decisions); ``encrypt_units`` / ``decrypt_units`` take
any unit size that is a multiple of 16 and one explicit 16-byte tweak per unit.

Two implementations, the same bytes:

* the compiled helper (``native/mktme_xts.c``, built on first use with the system gcc against
  OpenSSL's libcrypto): EVP AES-ECB does every AES block, C makes the tweaks, the alpha
  sequence and both whitening XORs (an AVX2 or an SSE2 kernel, chosen at run time), fused over
  2 KiB steps that stay in L1; ctypes releases the GIL for the call. 0.6-0.8x raw AES-128-ECB
  on 64 MiB calls (large calls stream their output), 0.5-0.65x on 1 MiB ones
  (``scripts/bench_engine.py``; README).
* the numpy path below, the reference and the fallback when the helper cannot be built (one
  warning line; ``qemu-mktme doctor`` says which is in use; ``QEMU_MKTME_XTS=numpy`` forces it,
  ``sse2``/``avx2`` force the helper and its kernel).
  OpenSSL does every AES block (the tweak encryptions in one ECB call, the data in one call per
  chunk), numpy the multiply-by-alpha sequence and the two whitening XORs for a whole chunk. The
  data pass uses OpenSSL's XTS code path as a plain ECB: with a tweak key K' and an IV chosen so
  that E_K'(IV) = 0, every XTS whitening value is 0 and XTS(x) = AES_K(x) exactly. A self-test at
  import checks that equality and falls back to ECB if it ever fails. About 0.2x raw AES-ECB:
  numpy's passes over the alpha sequence and its transposition cost more than the AES.

Equal data and tweak keys are accepted: the MKTME PCONFIG rules do not forbid them and neither
does IEEE 1619-2007 (``cryptography``'s XTS refuses them, which is why tests compare against a
reference built from single AES blocks for that case).
"""

from __future__ import annotations

import hmac
import logging
import threading
from typing import Any

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ..arch.addresses import CACHE_LINE_SIZE
from ..arch.msr import Algorithm
from . import native

__all__ = [
    "BLOCK_NBYTES",
    "CHUNK_NBYTES",
    "BytesLike",
    "XtsKey",
    "decrypt_lines",
    "decrypt_units",
    "encrypt_lines",
    "encrypt_units",
    "implementation",
]

BLOCK_NBYTES = 16
CHUNK_NBYTES = 512 * 1024
"""Data per numpy/OpenSSL pass: large enough to amortise numpy's per-call cost, small enough
that the chunk, its whitening and the scratch stay in L2."""

BytesLike = bytes | bytearray | memoryview | npt.NDArray[Any]

_U64 = np.uint64
_ONE = _U64(1)
_SIXTY_THREE = _U64(63)
_GF128_REDUCTION = _U64(0x87)  # x^128 = x^7 + x^2 + x + 1


class XtsKey:
    """An AES-XTS key pair: ``data_key`` (Key1) and ``tweak_key`` (Key2).

    Both 16 bytes (AES-XTS-128) or both 32 bytes (AES-XTS-256). The key bytes never appear in
    ``repr``/``str``; compare keys with ``==`` (constant time). Instances are immutable and may be
    shared between threads (each thread gets its own OpenSSL contexts).

    >>> XtsKey(bytes(16), bytes(range(16)))
    XtsKey(AES-XTS-128)
    """

    __slots__ = ("_data_key", "_local", "_tweak_key", "algorithm")

    def __init__(self, data_key: bytes, tweak_key: bytes) -> None:
        for name, value in (("data_key", data_key), ("tweak_key", tweak_key)):
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise TypeError(f"{name} must be bytes, got {type(value).__name__}")
        data_key, tweak_key = bytes(data_key), bytes(tweak_key)
        if len(data_key) != len(tweak_key) or len(data_key) not in (16, 32):
            raise ValueError(
                f"AES-XTS needs two 16-byte or two 32-byte keys, got {len(data_key)} and {len(tweak_key)} bytes"
            )
        object.__setattr__(self, "_data_key", data_key)
        object.__setattr__(self, "_tweak_key", tweak_key)
        algorithm = Algorithm.AES_XTS_128 if len(data_key) == 16 else Algorithm.AES_XTS_256
        object.__setattr__(self, "algorithm", algorithm)
        object.__setattr__(self, "_local", threading.local())

    _data_key: bytes
    _tweak_key: bytes
    algorithm: Algorithm
    _local: threading.local

    @classmethod
    def from_bytes(cls, key: bytes) -> XtsKey:
        """From the concatenated form ``cryptography``'s XTS takes (Key1 || Key2, 32 or 64 bytes)."""
        if len(key) not in (32, 64):
            raise ValueError(f"a concatenated AES-XTS key is 32 or 64 bytes, got {len(key)}")
        half = len(key) // 2
        return cls(key[:half], key[half:])

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("XtsKey is immutable")

    def __repr__(self) -> str:
        return f"XtsKey({self.algorithm.label})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, XtsKey):
            return NotImplemented
        return hmac.compare_digest(self._data_key + self._tweak_key, other._data_key + other._tweak_key)

    __hash__ = None  # type: ignore[assignment]  # a hash would be derived from key bytes

    def __reduce__(self) -> Any:
        raise TypeError("XtsKey cannot be pickled")

    def _contexts(self) -> tuple[Any, Any, Any]:
        """(tweak ECB encryptor, data AES encryptor, data AES decryptor) for this thread."""
        ctx = getattr(self._local, "ctx", None)
        if ctx is None:
            ctx = (_ecb(self._tweak_key).encryptor(), *_block_cipher(self._data_key))
            self._local.ctx = ctx
        contexts: tuple[Any, Any, Any] = ctx
        return contexts

    def _native(self, lib: Any) -> int:
        """This thread's context in the compiled helper (freed with the key or the thread)."""
        ctx = getattr(self._local, "native", None)
        if ctx is None:
            ctx = _NativeContext(lib, self._data_key, self._tweak_key)
            self._local.native = ctx
        ptr: int = ctx.ptr
        return ptr


class _NativeContext:
    """One ``mktme_xts`` context: the key's EVP contexts inside the helper."""

    __slots__ = ("lib", "ptr")

    def __init__(self, lib: Any, data_key: bytes, tweak_key: bytes) -> None:
        self.lib = lib
        self.ptr = lib.mktme_xts_new(data_key, tweak_key, len(data_key))
        if not self.ptr:
            raise MemoryError("the XTS helper could not create an OpenSSL context")

    def __del__(self) -> None:
        if getattr(self, "ptr", None):
            self.lib.mktme_xts_free(self.ptr)
            self.ptr = None


def _ecb(key: bytes) -> Cipher[Any]:
    return Cipher(algorithms.AES(key), modes.ECB())


def _block_cipher_xts(key: bytes) -> tuple[Any, Any]:
    """Encryptor/decryptor computing AES_key block by block through OpenSSL's XTS code."""
    helper = bytes([key[0] ^ 1]) + key[1:]  # any key != key; XTS refuses equal halves
    iv = _ecb(helper).decryptor().update(bytes(BLOCK_NBYTES))  # E_helper(iv) = 0: no whitening
    cipher = Cipher(algorithms.AES(key + helper), modes.XTS(iv))
    return cipher.encryptor(), cipher.decryptor()


def _block_cipher_ecb(key: bytes) -> tuple[Any, Any]:
    return _ecb(key).encryptor(), _ecb(key).decryptor()


def _self_test() -> bool:
    key = bytes(range(1, 17))
    data = bytes(range(256)) * 4
    try:
        enc, dec = _block_cipher_xts(key)
        out = bytearray(len(data) + BLOCK_NBYTES)
        n = enc.update_into(data, out)
        n2 = enc.update_into(data, out)  # contexts are reused across chunks
        ok = n == n2 == len(data) and bytes(out[:n]) == _ecb(key).encryptor().update(data)
        back = bytearray(len(data) + BLOCK_NBYTES)
        m = dec.update_into(bytes(out[:n]), back)
        return ok and bytes(back[:m]) == data
    except Exception as err:  # noqa: BLE001 - any failure means: use the plain ECB path
        logging.getLogger(__name__).debug("OpenSSL's XTS cannot serve here: %s: %s", type(err).__name__, err)
        return False


_block_cipher = _block_cipher_xts if _self_test() else _block_cipher_ecb


# --- buffers ------------------------------------------------------------------------------------


def _as_u8(data: BytesLike, name: str) -> npt.NDArray[np.uint8]:
    """A flat uint8 view of ``data`` without copying when it is contiguous."""
    if isinstance(data, np.ndarray):
        arr = data if data.flags.c_contiguous else np.ascontiguousarray(data)
        if arr.ndim == 1 and arr.dtype == np.uint8:
            return arr
        return arr.reshape(-1).view(np.uint8)
    try:
        return np.frombuffer(data, dtype=np.uint8)
    except (TypeError, ValueError, BufferError) as err:
        raise TypeError(f"{name} must be a contiguous bytes-like object or numpy array") from err


def _out_u8(out: BytesLike | None, nbytes: int) -> npt.NDArray[np.uint8]:
    if out is None:
        return np.empty(nbytes, dtype=np.uint8)
    arr = _as_u8(out, "out")
    if isinstance(out, np.ndarray) and not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous")
    if not arr.flags.writeable:
        raise ValueError("out must be writable")
    if arr.size != nbytes:
        raise ValueError(f"out must be {nbytes} bytes, got {arr.size}")
    return arr


class _Scratch:
    """Per-thread chunk buffers, reused across calls."""

    def __init__(self, units: int, blocks: int) -> None:
        self.tweak_in = np.zeros((units + 1, 2), _U64)  # +1 block: update_into wants slack
        self.tweak_out = np.empty((units + 1, 2), _U64)
        self.planes = np.empty((blocks, 2, units), _U64)  # [j][0] = low words, [j][1] = high words
        self.carries = np.empty((2, units), _U64)
        self.whitening = np.empty((units, blocks, 2), _U64)
        self.work = np.empty(units * blocks * 2 + 2, _U64)
        self.offsets = np.arange(units, dtype=_U64) * _U64(CACHE_LINE_SIZE)


_scratch_local = threading.local()


def _scratch(units: int, blocks: int) -> _Scratch:
    cache: dict[tuple[int, int], _Scratch] = getattr(_scratch_local, "cache", None) or {}
    _scratch_local.cache = cache
    s = cache.get((units, blocks))
    if s is None:
        if len(cache) > 8:
            cache.clear()
        s = cache[(units, blocks)] = _Scratch(units, blocks)
    return s


# --- the engine ---------------------------------------------------------------------------------


def _helper() -> Any:
    """The compiled helper, or None for the numpy path (tests swap this to compare the two)."""
    return native.helper()


def implementation() -> str:
    """``native`` or ``numpy``: which path ``encrypt_*``/``decrypt_*`` take in this process."""
    return "numpy" if _helper() is None else "native"


def _run_native(lib: Any, key: XtsKey, src: npt.NDArray[np.uint8], dst: npt.NDArray[np.uint8],
                unit_nbytes: int, hpa: int | None, tweaks: npt.NDArray[np.uint8] | None, encrypt: bool) -> None:
    ctx = key._native(lib)
    if hpa is not None:
        if hpa + src.size > 1 << 64:
            raise ValueError("line addresses wrap past 2^64")
        rc = lib.mktme_xts_lines(ctx, src.ctypes.data, dst.ctypes.data, src.size, hpa, int(encrypt))
    else:
        assert tweaks is not None
        rc = lib.mktme_xts_units(ctx, src.ctypes.data, dst.ctypes.data, src.size, unit_nbytes,
                                 tweaks.ctypes.data, int(encrypt))
    if rc != 0:
        raise RuntimeError(f"the XTS helper failed (status {rc}) inside OpenSSL")


def _expand(s: _Scratch, n: int, blocks: int) -> npt.NDArray[np.uint64]:
    """Whitening values T0 * alpha^j for j < blocks, from the encrypted tweaks in s.tweak_out."""
    planes = s.planes[:, :, :n]
    lo, hi = planes[:, 0], planes[:, 1]
    np.copyto(planes[0], s.tweak_out[:n].T)
    carries = s.carries[:, :n]
    for j in range(1, blocks):
        # (hi:lo) * alpha: both words shift left one bit; lo's top bit moves into hi, hi's top
        # bit folds back into lo as 0x87 (x^128 = x^7 + x^2 + x + 1)
        np.left_shift(planes[j - 1], _ONE, out=planes[j])
        np.right_shift(planes[j - 1], _SIXTY_THREE, out=carries)
        np.bitwise_or(hi[j], carries[0], out=hi[j])
        np.multiply(carries[1], _GF128_REDUCTION, out=carries[1])
        np.bitwise_xor(lo[j], carries[1], out=lo[j])
    white = s.whitening[:n]
    # one transposing copy: plane (j, w) becomes word w of block j in every unit
    np.copyto(white.reshape(n, 2 * blocks), planes.reshape(2 * blocks, n).T)
    return white


def _run(
    key: XtsKey,
    data: BytesLike,
    unit_nbytes: int,
    set_tweaks: Any,
    out: BytesLike | None,
    encrypt: bool,
    hpa: int | None = None,
    tweaks: npt.NDArray[np.uint8] | None = None,
) -> npt.NDArray[np.uint8]:
    src = _as_u8(data, "data")
    nbytes = src.size
    if nbytes % unit_nbytes:
        raise ValueError(f"data length {nbytes} is not a multiple of the {unit_nbytes}-byte data unit")
    dst = _out_u8(out, nbytes)
    if nbytes == 0:
        return dst
    lib = _helper()
    if lib is not None:
        _run_native(lib, key, src, dst, unit_nbytes, hpa, tweaks, encrypt)
        return dst
    blocks = unit_nbytes // BLOCK_NBYTES
    units_total = nbytes // unit_nbytes
    per_chunk = max(1, min(units_total, CHUNK_NBYTES // unit_nbytes))
    s = _scratch(per_chunk, blocks)
    tweak_enc, data_enc, data_dec = key._contexts()
    aes = data_enc if encrypt else data_dec
    tweak_in_u8 = s.tweak_in.view(np.uint8).reshape(-1)
    tweak_out_u8 = s.tweak_out.view(np.uint8).reshape(-1)
    work_u8 = s.work.view(np.uint8)
    aligned = src.ctypes.data % 8 == 0 and dst.ctypes.data % 8 == 0
    for first in range(0, units_total, per_chunk):
        n = min(per_chunk, units_total - first)
        set_tweaks(s, first, n)
        tweak_enc.update_into(tweak_in_u8[: n * BLOCK_NBYTES], tweak_out_u8)
        white = _expand(s, n, blocks)
        lo_byte, hi_byte = first * unit_nbytes, (first + n) * unit_nbytes
        work = s.work[: n * blocks * 2].reshape(n, blocks, 2)
        if aligned:
            src_c = src[lo_byte:hi_byte].view(_U64).reshape(n, blocks, 2)
            dst_c = dst[lo_byte:hi_byte].view(_U64).reshape(n, blocks, 2)
        else:
            src_c = np.frombuffer(src[lo_byte:hi_byte].tobytes(), _U64).reshape(n, blocks, 2)
            dst_c = np.empty((n, blocks, 2), _U64)
        np.bitwise_xor(src_c, white, out=work)
        aes.update_into(work_u8[: n * unit_nbytes], work_u8)
        np.bitwise_xor(work, white, out=dst_c)
        if not aligned:
            dst[lo_byte:hi_byte] = dst_c.view(np.uint8).reshape(-1)
    return dst


def _check_line_args(hpa: int) -> None:
    if not isinstance(hpa, (int, np.integer)) or hpa < 0 or hpa >> 64:
        raise ValueError(f"hpa must be a non-negative 64-bit address, got {hpa!r}")
    if hpa % CACHE_LINE_SIZE:
        raise ValueError(f"hpa {hpa:#x} is not aligned to a {CACHE_LINE_SIZE}-byte line")


def _line_tweaks(hpa: int) -> Any:
    base = int(hpa)

    def set_tweaks(s: _Scratch, first: int, n: int) -> None:
        start = base + first * CACHE_LINE_SIZE
        if start + n * CACHE_LINE_SIZE > 1 << 64:
            raise ValueError("line addresses wrap past 2^64")
        np.add(s.offsets[:n], _U64(start), out=s.tweak_in[:n, 0])
        s.tweak_in[:n, 1] = 0          # the scratch is shared with explicit-tweak calls of this shape

    return set_tweaks


def encrypt_lines(key: XtsKey, data: BytesLike, hpa: int, *, out: BytesLike | None = None) -> npt.NDArray[np.uint8]:
    """Encrypt contiguous 64-byte lines starting at line-aligned ``hpa`` (KeyID bits removed).

    Line ``i`` is one XTS data unit with tweak ``(hpa + 64*i)`` as 16 bytes little-endian.
    ``data`` is any contiguous bytes-like object or numpy array (read-only views too); the result
    goes to ``out`` when given (same length, writable, may be ``data`` itself) and is returned as
    a flat uint8 array. Raises ``ValueError`` for a misaligned ``hpa`` or a partial line.
    """
    _check_line_args(hpa)
    return _run(key, data, CACHE_LINE_SIZE, _line_tweaks(hpa), out, True, hpa=int(hpa))


def decrypt_lines(key: XtsKey, data: BytesLike, hpa: int, *, out: BytesLike | None = None) -> npt.NDArray[np.uint8]:
    """Inverse of :func:`encrypt_lines`."""
    _check_line_args(hpa)
    return _run(key, data, CACHE_LINE_SIZE, _line_tweaks(hpa), out, False, hpa=int(hpa))


def _tweak_array(tweaks: BytesLike, units: int) -> npt.NDArray[np.uint8]:
    tw = _as_u8(tweaks, "tweaks")
    if tw.size != units * BLOCK_NBYTES:
        raise ValueError(f"need one 16-byte tweak per data unit ({units} units), got {tw.size} bytes")
    return np.ascontiguousarray(tw).reshape(units, BLOCK_NBYTES)


def _unit_tweaks(tw: npt.NDArray[np.uint8]) -> Any:

    def set_tweaks(s: _Scratch, first: int, n: int) -> None:
        s.tweak_in[:n].view(np.uint8).reshape(n, BLOCK_NBYTES)[:] = tw[first : first + n]

    return set_tweaks


def _check_unit(data: BytesLike, unit_nbytes: int) -> int:
    if not isinstance(unit_nbytes, int) or unit_nbytes <= 0 or unit_nbytes % BLOCK_NBYTES:
        raise ValueError(f"unit_nbytes must be a positive multiple of {BLOCK_NBYTES}, got {unit_nbytes!r}")
    nbytes = _as_u8(data, "data").size
    if nbytes % unit_nbytes:
        raise ValueError(f"data length {nbytes} is not a multiple of unit_nbytes={unit_nbytes}")
    return nbytes // unit_nbytes


def encrypt_units(
    key: XtsKey, data: BytesLike, tweaks: BytesLike, unit_nbytes: int, *, out: BytesLike | None = None
) -> npt.NDArray[np.uint8]:
    """Encrypt consecutive data units of ``unit_nbytes`` (a multiple of 16), one tweak each.

    ``tweaks`` holds 16 bytes per unit, in order (the IEEE 1619 tweak value as bytes, as
    ``cryptography``'s ``modes.XTS(tweak)`` takes it). No ciphertext stealing.
    """
    tw = _tweak_array(tweaks, _check_unit(data, unit_nbytes))
    return _run(key, data, unit_nbytes, _unit_tweaks(tw), out, True, tweaks=tw)


def decrypt_units(
    key: XtsKey, data: BytesLike, tweaks: BytesLike, unit_nbytes: int, *, out: BytesLike | None = None
) -> npt.NDArray[np.uint8]:
    """Inverse of :func:`encrypt_units`."""
    tw = _tweak_array(tweaks, _check_unit(data, unit_nbytes))
    return _run(key, data, unit_nbytes, _unit_tweaks(tw), out, False, tweaks=tw)
