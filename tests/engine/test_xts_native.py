"""The compiled XTS helper against the numpy reference path (hypothesis), in the cases only the
helper has (batches, streaming stores, threads), and how it is built and falls back."""

import os
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given
from hypothesis import strategies as st

from qemu_mktme.engine import native, xts
from qemu_mktme.engine.xts import XtsKey, decrypt_lines, decrypt_units, encrypt_lines, encrypt_units


@pytest.fixture(scope="module")
def helper_lib():
    return native.load(native.build())


def _both(fn, monkeypatch: pytest.MonkeyPatch, lib) -> tuple[bytes, bytes]:
    monkeypatch.setattr(xts, "_helper", lambda: lib)
    fast = fn().tobytes()
    monkeypatch.setattr(xts, "_helper", lambda: None)
    return fast, fn().tobytes()


@given(st.sampled_from([16, 32]), st.integers(0, 300), st.integers(0, (1 << 58) - 301), st.booleans(),
       st.integers(0, 15))
def test_native_matches_numpy_lines(klen, nlines, line, encrypt, misalign) -> None:
    # hypothesis forbids function-scoped fixtures in @given tests: monkeypatch by hand
    lib = native.load(native.build())
    key = XtsKey(os.urandom(klen), os.urandom(klen))
    buf = bytearray(64 * nlines + misalign)
    buf[misalign:] = os.urandom(64 * nlines)
    src = memoryview(buf)[misalign:]  # unaligned input on purpose
    fn = encrypt_lines if encrypt else decrypt_lines
    with pytest.MonkeyPatch.context() as mp:
        fast, ref = _both(lambda: fn(key, src, line * 64), mp, lib)
    assert fast == ref


@given(st.sampled_from([16, 32]), st.integers(1, 6), st.sampled_from([1, 2, 3, 4, 5, 8, 31, 256, 700]),
       st.booleans())
def test_native_matches_numpy_units(klen, units, blocks, encrypt) -> None:
    lib = native.load(native.build())
    key = XtsKey(os.urandom(klen), os.urandom(klen))
    unit = 16 * blocks  # 700 blocks: a unit longer than one step of the helper
    data, tweaks = os.urandom(unit * units), os.urandom(16 * units)
    fn = encrypt_units if encrypt else decrypt_units
    with pytest.MonkeyPatch.context() as mp:
        fast, ref = _both(lambda: fn(key, data, tweaks, unit), mp, lib)
    assert fast == ref


def test_native_large_call_in_place_and_across_batches(helper_lib, monkeypatch: pytest.MonkeyPatch) -> None:
    """16 MiB: many 1024-line tweak batches, streaming stores (large aligned out), in place."""
    key = XtsKey(os.urandom(16), os.urandom(16))
    data = np.frombuffer(os.urandom(16 << 20), np.uint8)
    fast, ref = _both(lambda: encrypt_lines(key, data, 0x7f_ffc0_0000), monkeypatch, helper_lib)
    assert fast == ref
    monkeypatch.setattr(xts, "_helper", lambda: helper_lib)
    inplace = data.copy()
    assert encrypt_lines(key, inplace, 0x7f_ffc0_0000, out=inplace) is inplace
    assert inplace.tobytes() == ref
    last = Cipher(algorithms.AES(key._data_key + key._tweak_key),
                  modes.XTS((0x7f_ffc0_0000 + (16 << 20) - 64).to_bytes(16, "little"))).encryptor()
    assert inplace[-64:].tobytes() == last.update(data[-64:].tobytes())
    with pytest.raises(ValueError, match="wrap"):
        encrypt_lines(key, data[:128], (1 << 64) - 64)


def test_native_threads_share_a_key(helper_lib, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each thread gets its own helper context: concurrent calls on one key stay correct."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(xts, "_helper", lambda: helper_lib)
    key = XtsKey(os.urandom(32), os.urandom(32))
    chunks = [os.urandom(256 << 10) for _ in range(8)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: encrypt_lines(key, chunks[i], i << 20).tobytes(), range(8)))
    monkeypatch.setattr(xts, "_helper", lambda: None)
    assert results == [encrypt_lines(key, c, i << 20).tobytes() for i, c in enumerate(chunks)]


def test_build_is_cached_and_fails_cleanly(tmp_path: Path) -> None:
    lib = native.build(cache=tmp_path)
    assert lib.is_file() and native.build(cache=tmp_path) == lib  # second call: no compile
    assert not [p for p in lib.parent.iterdir() if p.name.startswith(".build-")]
    bad = tmp_path / "bad.c"
    bad.write_text("this is not C\n")
    with pytest.raises(native.HelperUnavailable, match="failed on bad.c"):
        native.build(source=bad, cache=tmp_path)
    with pytest.raises(native.HelperUnavailable, match="cannot run"):
        native.build(cache=tmp_path / "other", cc=str(tmp_path / "no-such-gcc"))
    assert not list((tmp_path / "other").rglob("*.so"))


def test_fallback_warns_once_and_stays_correct(tmp_path: Path) -> None:
    """No compiler: one warning line, the numpy path, the same bytes."""
    import subprocess
    import sys

    code = ("import os; from qemu_mktme.engine import xts, native\n"
            "k = xts.XtsKey(bytes(range(16)), bytes(range(16, 32)))\n"
            "a = xts.encrypt_lines(k, bytes(4096), 0x1000); b = xts.encrypt_lines(k, bytes(4096), 0x1000)\n"
            "print(xts.implementation(), native.status()); print(a.tobytes().hex()[:64])\n")
    env = {**os.environ, "PATH": str(tmp_path), "QEMU_MKTME_CACHE": str(tmp_path / "cache")}
    env.pop("QEMU_MKTME_XTS", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("\n") == 1 and "gcc not found" in proc.stderr and "numpy" in proc.stderr
    impl_line, head = proc.stdout.splitlines()
    assert impl_line.startswith("numpy numpy reference path (gcc not found")
    key = XtsKey(bytes(range(16)), bytes(range(16, 32)))
    assert encrypt_lines(key, bytes(4096), 0x1000).tobytes().hex()[:64] == head
    env["QEMU_MKTME_XTS"] = "native"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "HelperUnavailable: gcc not found" in proc.stderr


def test_a_damaged_cached_library_is_rebuilt(tmp_path: Path) -> None:
    import subprocess
    import sys

    lib = native.build(cache=tmp_path)
    lib.write_bytes(b"\x7fELF but not really")
    code = "from qemu_mktme.engine import xts; print(xts.implementation())"
    env = {**os.environ, "QEMU_MKTME_CACHE": str(tmp_path)}
    env.pop("QEMU_MKTME_XTS", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "native" and proc.stderr == "", proc.stderr
    native.load(lib)  # the cached file is a working library again
