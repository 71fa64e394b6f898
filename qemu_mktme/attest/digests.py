"""SHA-256 of the files a measured launch hashes, re-hashed only when a file may have changed.

Kept in this process's memory only, as Linux IMA keeps its measurements (a cache file would be
one more thing to protect): keyed on the open file's identity and change state (``st_dev``,
``st_ino``, size, ``mtime_ns``, ``ctime_ns``, from ``fstat`` of the descriptor actually hashed).
An entry is kept only if the file did not change while it was hashed and its last change is
older than :data:`RACY` seconds before the hashing started (git's "racily clean" rule): any
later write sets a ctime after that, so it cannot equal the cached one, whatever the file
system's timestamp granularity. (ctime cannot be set from user space; only a wall clock stepped
back by more than :data:`RACY` seconds would defeat this.)
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

RACY = 2.0
MAX_ENTRIES = 4096

State = tuple[int, int, int, int, int]
_cache: dict[State, bytes] = {}
_lock = threading.Lock()


def state(st: os.stat_result) -> State:
    """What identifies a file and its last change: device, inode, size, mtime, ctime."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class Measured:
    """A file's digest and its :func:`state` when hashed; ``settled``: its last change was older
    than :data:`RACY` seconds then, so the state alone proves that the file is unchanged."""

    path: Path
    digest: bytes
    state: State
    settled: bool


def measure_fd(fd: int, path: str | os.PathLike[str] = "") -> Measured:
    """SHA-256 of the whole file open at ``fd`` (read with pread: the offset is left alone)."""
    before = os.fstat(fd)
    key = state(before)
    with _lock:
        hit = _cache.get(key)
    if hit is not None:
        return Measured(Path(path), hit, key, True)
    started = time.time_ns()
    h = hashlib.sha256()              # pread, not mmap: a file truncated meanwhile would be SIGBUS
    offset = 0
    while chunk := os.pread(fd, 1 << 20, offset):
        h.update(chunk)
        offset += len(chunk)
    digest = h.digest()
    settled = state(os.fstat(fd)) == key and started - max(before.st_mtime_ns, before.st_ctime_ns) > RACY * 1e9
    if settled:
        with _lock:
            if len(_cache) >= MAX_ENTRIES:
                _cache.clear()
            _cache[key] = digest
    return Measured(Path(path), digest, key, settled)


def measure_file(path: str | os.PathLike[str]) -> Measured:
    """:func:`measure_fd` of the file at ``path``, opened here."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return measure_fd(fd, path)
    finally:
        os.close(fd)


def path_digest(path: str) -> bytes:
    """The digest of the file at ``path``: from the cache when its state (``stat``, no open) is a
    settled one already hashed, else :func:`measure_file`."""
    with _lock:
        hit = _cache.get(state(os.stat(path)))
    return hit if hit is not None else measure_file(path).digest


def forget() -> None:
    """Drop every remembered digest (what a new process starts with)."""
    with _lock:
        _cache.clear()


def fd_digest(fd: int) -> bytes:
    return measure_fd(fd).digest


def file_digest(path: str | os.PathLike[str]) -> bytes:
    return measure_file(path).digest
