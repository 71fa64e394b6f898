"""The compiled XTS helper (``mktme_xts.c``): built with the system gcc against OpenSSL's
libcrypto on first use, cached, loaded with ctypes.

Built once per (source sha256, compiler flags, OpenSSL header version) into
``$QEMU_MKTME_CACHE/xts/<key>/mktme_xts.so`` by :func:`qemu_mktme.compiled.compile_library`, like
the TCG shim. ctypes drops the GIL for every call into it, so threads encrypt in parallel.

:func:`helper` returns the loaded library, or ``None`` when it cannot be built or loaded (no gcc,
no OpenSSL headers, ``QEMU_MKTME_XTS=numpy``); then the engine uses its numpy path and
:func:`status` says why. The library has two whitening kernels, SSE2 and AVX2, and picks the best
the CPU has; ``QEMU_MKTME_XTS=sse2`` or ``avx2`` chooses one (an error if the CPU lacks it), and
:func:`set_isa` switches a loaded library (tests, benchmarks).
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from importlib import resources
from pathlib import Path

from ...compiled import BuildUnavailable, build_cached
from ...errors import MktmeError

SOURCE_NAME = "mktme_xts.c"
LIBRARY_NAME = "mktme_xts.so"
API_VERSION = 2
CFLAGS = ("-O3", "-std=gnu11", "-shared", "-fPIC", "-fvisibility=hidden", "-fno-plt",
          "-Wall", "-Wextra", "-Werror")
LIBS = ("-lcrypto",)
ENV_SELECT = "QEMU_MKTME_XTS"
"""``numpy`` forces the reference path; ``native`` makes a build failure an error, not a fallback;
``sse2`` / ``avx2`` do the same and choose the helper's whitening kernel."""
ISAS = {"sse2": 1, "avx2": 2}
"""The helper's whitening kernels, by the numbers its C API uses."""
OPENSSL_HEADER = Path("/usr/include/openssl/opensslv.h")


class HelperUnavailable(MktmeError, RuntimeError):
    """The helper cannot be built or loaded here, or QEMU_MKTME_XTS asks for what cannot be had
    (the message says why, in one line; the CLI prints it as its error)."""


def source_path() -> Path:
    """The helper's C source, shipped as package data."""
    return Path(str(resources.files(__package__).joinpath(SOURCE_NAME)))


def build(*, source: Path | None = None, cache: Path | None = None, cc: str | None = None,
          force: bool = False) -> Path:
    """Path of the helper library, compiled if needed (or ``force``: again, replacing a cached
    one that would not load); ``HelperUnavailable`` with gcc's words if it cannot be."""
    try:
        openssl = OPENSSL_HEADER.read_bytes()
    except OSError:
        raise HelperUnavailable(f"OpenSSL headers not found ({OPENSSL_HEADER}; apt-get install libssl-dev)") from None
    try:
        return build_cached("xts", source or source_path(), CFLAGS, LIBS, key_extra=openssl, cache=cache, cc=cc,
                            force=force, hint="apt-get install gcc libssl-dev")
    except BuildUnavailable as err:
        raise HelperUnavailable(str(err)) from None


def load(path: Path) -> ctypes.CDLL:
    """The library at ``path`` with its functions' signatures declared."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        raise HelperUnavailable(f"cannot load {path}: {err}") from err
    if lib.mktme_xts_api_version() != API_VERSION:
        raise HelperUnavailable(f"{path} has API {lib.mktme_xts_api_version()}, expected {API_VERSION}")
    vp, sz, u64, c_int = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint64, ctypes.c_int
    lib.mktme_xts_new.argtypes = [ctypes.c_char_p, ctypes.c_char_p, c_int]
    lib.mktme_xts_new.restype = vp
    lib.mktme_xts_free.argtypes = [vp]
    lib.mktme_xts_free.restype = None
    lib.mktme_xts_lines.argtypes = [vp, vp, vp, sz, u64, c_int]
    lib.mktme_xts_lines.restype = c_int
    lib.mktme_xts_units.argtypes = [vp, vp, vp, sz, sz, vp, c_int]
    lib.mktme_xts_units.restype = c_int
    lib.mktme_xts_isa.argtypes = []
    lib.mktme_xts_isa.restype = c_int
    lib.mktme_xts_set_isa.argtypes = [c_int]
    lib.mktme_xts_set_isa.restype = c_int
    return lib


def isa(lib: ctypes.CDLL) -> str:
    """The whitening kernel ``lib`` uses now: ``sse2`` or ``avx2``."""
    number = lib.mktme_xts_isa()
    return next(name for name, n in ISAS.items() if n == number)


def set_isa(lib: ctypes.CDLL, name: str) -> None:
    """Make ``lib`` use whitening kernel ``name`` (``sse2``, ``avx2``) from its next call on, in
    every thread; ``HelperUnavailable`` if this CPU lacks it."""
    if name not in ISAS:
        raise ValueError(f"unknown XTS kernel {name!r} (one of {', '.join(ISAS)})")
    if lib.mktme_xts_set_isa(ISAS[name]) != 0:
        raise HelperUnavailable(f"this CPU has no {name.upper()} for the XTS helper")


_lock = threading.Lock()
_state: dict[str, object] = {}


def helper() -> ctypes.CDLL | None:
    """The helper library, built and loaded once per process; ``None`` (and one warning line on
    stderr) when it is unavailable."""
    if "lib" in _state:
        return _state["lib"]  # type: ignore[return-value]
    with _lock:
        if "lib" not in _state:
            choice = os.environ.get(ENV_SELECT, "").strip().lower()
            lib: ctypes.CDLL | None = None
            if choice not in ("", "numpy", "native", *ISAS):
                raise HelperUnavailable(f"{ENV_SELECT}={choice}: expected numpy, native, {' or '.join(ISAS)}")
            if choice == "numpy":
                reason = f"{ENV_SELECT}=numpy"
            else:
                try:
                    try:
                        lib = load(build())
                    except HelperUnavailable:   # a damaged cached library: build it once more
                        lib = load(build(force=True))
                    if choice in ISAS:
                        set_isa(lib, choice)
                    reason = ""
                except HelperUnavailable as err:
                    if choice == "native" or choice in ISAS:
                        raise
                    reason = str(err)
                    print(f"qemu-mktme: warning: compiled XTS helper unavailable ({reason}); "
                          "using the numpy engine (about 3x slower)", file=sys.stderr)
            _state["reason"] = reason
            _state["lib"] = lib
    return _state["lib"]  # type: ignore[return-value]


def status() -> str:
    """One line: which XTS implementation the engine uses, and why when it is the fallback."""
    lib = helper()
    if lib is not None:
        return f"compiled helper over OpenSSL libcrypto, native ({isa(lib)}) ({lib._name})"
    return f"numpy reference path ({_state['reason']})"
