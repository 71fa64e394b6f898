"""The compiled vhost-user-blk dataplane (``vhost_dp.c``): built with the system gcc on first use,
cached, loaded with ctypes (as ``engine.native`` builds the XTS helper).

Built once per (source sha256, compiler flags) into ``$QEMU_MKTME_CACHE/vhost/<key>/vhost_dp.so``
by :func:`qemu_mktme.compiled.compile_library`. ctypes drops the GIL for every call into it: the
queue threads of ``vhost/blk.py`` spend their life inside :func:`dp_run`.

``QEMU_MKTME_VHOST=python`` forces the Python path (every request through ``blk.py``);
``native`` makes a build failure an error; unset, a failure falls back to Python with the reason
logged once. :class:`Mirror` is the C side's translation table (see the C file's comment).
"""

from __future__ import annotations

import _ctypes
import ctypes
import logging
import os
import threading
from importlib import resources
from pathlib import Path

import numpy as np

from ...compiled import BuildUnavailable, build_cached
from ...errors import MktmeError

log = logging.getLogger(__name__)

SOURCE_NAME = "vhost_dp.c"
LIBRARY_NAME = "vhost_dp.so"
API_VERSION = 4
CFLAGS = ("-O2", "-std=gnu11", "-shared", "-fPIC", "-fvisibility=hidden", "-pthread",
          "-Wall", "-Wextra", "-Werror")
ENV_SELECT = "QEMU_MKTME_VHOST"
"""``python`` forces the Python path; ``native`` makes a build failure an error."""
STOPPED, HANDOFF_CHAIN, HANDOFF_RING, KICK_GONE, CALL_DEAD = range(5)
"""What :func:`dp_run` returns: why the queue came back to Python."""
COUNTERS = 10
"""Counters ``dp_mirror_take`` hands over (see ``Mirror._acc``)."""
MAX_IOVA = 1 << 40
"""The mirror covers IOVAs below this (a larger guest map keeps the Python path)."""


class DataplaneUnavailable(MktmeError, RuntimeError):
    """The dataplane cannot be built or loaded (the message says why, in one line)."""


class QueueState(ctypes.Structure):
    """``struct dp_queue`` of vhost_dp.c (same order, same types)."""

    _fields_ = [("m", ctypes.c_void_p), ("desc", ctypes.c_uint64), ("avail", ctypes.c_uint64),
                ("used", ctypes.c_uint64), ("capacity", ctypes.c_uint64), ("max_bytes", ctypes.c_uint64),
                ("num", ctypes.c_int32), ("event_idx", ctypes.c_int32), ("indirect", ctypes.c_int32),
                ("readonly", ctypes.c_int32), ("kick", ctypes.c_int32), ("call", ctypes.c_int32),
                ("stop", ctypes.c_int32), ("disk", ctypes.c_int32), ("buffered", ctypes.c_int32),
                ("slow", ctypes.c_int32), ("stopping", ctypes.c_int32), ("need_kick", ctypes.c_int32),
                ("last_avail", ctypes.c_uint16), ("used_idx", ctypes.c_uint16),
                ("signalled_used", ctypes.c_uint16), ("pad", ctypes.c_uint16), ("err", ctypes.c_int32),
                ("pad2", ctypes.c_uint32), ("poll_max_ns", ctypes.c_uint64), ("poll_ns", ctypes.c_uint64),
                ("poll_quiet_until", ctypes.c_uint64)]


def source_path() -> Path:
    return Path(str(resources.files(__package__).joinpath(SOURCE_NAME)))


def build(*, cache: Path | None = None, force: bool = False) -> Path:
    """Path of the library, compiled if needed; ``DataplaneUnavailable`` with gcc's words if not."""
    try:
        return build_cached("vhost", source_path(), CFLAGS, cache=cache, force=force)
    except BuildUnavailable as err:
        raise DataplaneUnavailable(str(err)) from None


def load(path: Path) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        raise DataplaneUnavailable(f"cannot load {path}: {err}") from err
    try:
        return _declare(lib, path)
    except (AttributeError, DataplaneUnavailable) as err:    # another library at our path
        _ctypes.dlclose(lib._handle)        # else dlopen hands this one back for the rebuilt file
        raise DataplaneUnavailable(f"{path} is not this dataplane: {err}") from None


def _declare(lib: ctypes.CDLL, path: Path) -> ctypes.CDLL:
    if lib.dp_api_version() != API_VERSION:
        raise DataplaneUnavailable(f"{path} has API {lib.dp_api_version()}, expected {API_VERSION}")
    vp, u64, c_int = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int
    lib.dp_mirror_sizeof.restype = lib.dp_queue_sizeof.restype = ctypes.c_size_t
    if lib.dp_queue_sizeof() != ctypes.sizeof(QueueState):
        raise DataplaneUnavailable(f"{path}: struct dp_queue is {lib.dp_queue_sizeof()} bytes, "
                                   f"QueueState {ctypes.sizeof(QueueState)}")
    lib.dp_mirror_init.argtypes = [vp, vp, u64]
    lib.dp_mirror_init.restype = c_int
    lib.dp_mirror_destroy.argtypes = [vp]
    lib.dp_mirror_destroy.restype = None
    lib.dp_mirror_window.argtypes = [vp, c_int, vp, u64]
    lib.dp_mirror_window.restype = None
    lib.dp_mirror_clear.argtypes = [vp, vp, vp, u64, c_int]
    lib.dp_mirror_clear.restype = None
    lib.dp_mirror_take.argtypes = [vp, vp]
    lib.dp_mirror_take.restype = None
    lib.dp_wake.argtypes = [c_int]
    lib.dp_wake.restype = c_int
    lib.dp_run.argtypes = [ctypes.POINTER(QueueState)]
    lib.dp_run.restype = c_int
    return lib


_lock = threading.Lock()
_state: dict[str, object] = {}


def library() -> ctypes.CDLL | None:
    """The dataplane library, built and loaded once per process; ``None`` (the reason logged
    once, see :func:`status`) when the Python path is to be used."""
    with _lock:
        if "lib" not in _state:
            _state["lib"], _state["reason"] = _select()
    return _state["lib"]  # type: ignore[return-value]


def _select() -> tuple[ctypes.CDLL | None, str]:
    choice = os.environ.get(ENV_SELECT, "").strip().lower()
    if choice not in ("", "python", "native"):
        raise DataplaneUnavailable(f"{ENV_SELECT}={choice}: expected python or native")
    if choice == "python":
        return None, f"{ENV_SELECT}=python"
    try:
        try:
            return load(build()), ""
        except DataplaneUnavailable:              # a damaged cached library: build it once more
            return load(build(force=True)), ""
    except DataplaneUnavailable as err:
        if choice == "native":
            raise
        log.warning("vhost dataplane unavailable (%s): every request takes the Python path", err)
        return None, str(err)


def status() -> str:
    """One line: which vhost-user-blk dataplane serves requests, and why when it is Python."""
    lib = library()
    if lib is not None:
        return f"native dataplane ({lib._name})"
    return f"Python path ({_state['reason']})"


class Mirror:
    """The C side's translation table for one device: IOVA frames of ``[0, limit)`` -> offsets into
    up to 64 windows (numpy arrays over guest RAM). Python fills it (:meth:`fill`); :meth:`clear`
    returns only once no queue thread uses an old entry. Keeps its windows alive until
    :meth:`close` (which the queue threads must have left)."""

    def __init__(self, lib: ctypes.CDLL, limit: int) -> None:
        if limit > MAX_IOVA:
            raise DataplaneUnavailable(f"guest memory map ends at {limit:#x}, above the mirror's {MAX_IOVA:#x}")
        self.lib = lib
        self.nframes = max(1, -(-limit // 4096))
        self.table = np.zeros(self.nframes, np.uint64)
        self._raw = ctypes.create_string_buffer(lib.dp_mirror_sizeof())
        self.ptr = ctypes.addressof(self._raw)
        if lib.dp_mirror_init(self.ptr, self.table.ctypes.data, self.nframes) != 0:
            raise DataplaneUnavailable("pthread_rwlock_init failed")
        self.windows: list[np.ndarray | None] = [None] * 64
        # requests, reads, read_bytes, writes, write_bytes, merged, polls, poll hits, poll ns, poll
        # back-offs: not yet taken
        self._acc = [0] * COUNTERS
        self.served = 0
        """Requests the C side completed, in all (never reset: tests, benchmarks)."""
        self.merged = 0
        """Of those, the ones served by a preceding request's preadv/pwritev (adjacent requests of
        one batch merged into one I/O, as QEMU's virtio-blk does): the I/Os saved, in all."""
        self._out = (ctypes.c_uint64 * COUNTERS)()
        self._filled: set[int] = set()  # chunks of 512 frames filled since the last clear

    def window(self, index: int, array: np.ndarray) -> None:
        """Window ``index`` is ``array`` (a writable uint8 view of guest RAM) from now on."""
        if self.windows[index] is array:
            return
        self.windows[index] = array
        self.lib.dp_mirror_window(self.ptr, index, array.ctypes.data, array.size)

    def fill(self, iova: int, size: int, offset: int, window: int = 0) -> None:
        """IOVAs ``[iova, iova + size)`` (one leaf: size 4 KiB or 2 MiB, aligned) are bytes
        ``[offset, offset + size)`` of window ``window``."""
        first = iova >> 12
        if first >= self.nframes or offset % 4096:
            return
        shift = size.bit_length() - 1
        self._filled.update(range(first >> 9, ((first + (size >> 12) - 1) >> 9) + 1))   # before: a clear
        self.table[first:first + (size >> 12)] = offset | window << 6 | shift        # sees it or follows

    def clear(self, *, windows: bool = False) -> None:
        """Empty the table (``windows``: forget the windows too); waits for the requests in flight."""
        chunks = np.fromiter(self._filled, np.uint64, len(self._filled))
        self._filled = set()
        self.lib.dp_mirror_clear(self.ptr, self.table.ctypes.data, chunks.ctypes.data, chunks.size, int(windows))
        if windows:
            self.windows = [None] * 64

    def _pull(self) -> None:
        self.lib.dp_mirror_take(self.ptr, self._out)
        for i, v in enumerate(self._out):
            self._acc[i] += v
        self.served += self._out[0]
        self.merged += self._out[5]

    def total(self) -> int:
        """Requests the C side completed, in all (:attr:`served`, up to date)."""
        self._pull()
        return self.served

    def _take(self, first: int, end: int) -> list[int]:
        """Counters ``first..end-1`` (see ``_acc``) since the last take of them, zeroed."""
        self._pull()
        out = self._acc[first:end]
        self._acc[first:end] = [0] * (end - first)
        return out

    def take_requests(self) -> int:
        """Requests the C side completed since the last call."""
        return self._take(0, 1)[0]

    def take_merged(self) -> int:
        """Requests the C side served by a preceding request's I/O since the last call."""
        return self._take(5, 6)[0]

    def take_polls(self) -> tuple[int, int, int, int]:
        """(windows watched, requests they found, ns spent watching, windows shut because another
        thread wanted the CPU) since the last call."""
        polls, hits, ns, backoffs = self._take(6, 10)
        return polls, hits, ns, backoffs

    def take_dma(self) -> tuple[int, int, int, int]:
        """(reads, read bytes, writes, write bytes) the C side did since the last call."""
        reads, read_bytes, writes, write_bytes = self._take(1, 5)
        return reads, read_bytes, writes, write_bytes

    def close(self) -> None:
        """Forget everything (the queue threads are gone); idempotent."""
        if self.ptr:
            self._pull()
            self.clear(windows=True)
            self.lib.dp_mirror_destroy(self.ptr)
            self.ptr = 0
