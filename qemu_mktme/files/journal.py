"""A redo journal for writing a few ranges of a file in place, all or nothing: what databases do.

Replacing a large file whole (:mod:`.atomic`: temporary, fsync, rename) costs a write and an
fsync of all of it even when a few ranges changed. This module changes only those ranges and
keeps the same promise, ``kill -9`` (or a power cut) at any point leaves either the old file or the
new one, never a mix that the next opener would take for either:

1. the new ranges and the file's new head (its first bytes, e.g. a header that holds the
   digests) go to ``.NAME.journal`` beside the file (0600), then a trailer with a SHA-256 over
   the whole journal; the journal is fsynced, then its directory. Until then the file is untouched;
2. the ranges are written in place and the file fsynced, then the new head, fsynced;
3. the journal is removed (and the directory synced).

:func:`recover` runs before the file is opened (by whoever holds the file's lock): a journal
whose trailer checks out (complete) is replayed, idempotently, when the file's head is the
old head it names or already the new one; an incomplete journal (the writer died in step 1:
the file was not touched) or one for another version of the file is discarded. Writers and
:func:`recover` must be serialised by the caller (the NVDIMM media's :class:`.MediaLock`).

Layout of a journal (integers little-endian): the ranges' bytes, one after the other, then
``n`` entries of (u64 file offset, u64 length, u64 journal offset), the new head, the SHA-256
of the old head, u64 ``n`` | u64 head length | u64 where the entries start | ``"QMKTJRNL"`` |
u32 version | u32 0 | SHA-256 of everything before it. Written by hand: the file formats are ours,
and no maintained library journals ranges of a plain file.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import stat
import struct
from pathlib import Path

from .atomic import sync_directory

log = logging.getLogger(__name__)

MAGIC = b"QMKTJRNL"
VERSION = 1
_ENTRY = struct.Struct("<QQQ")
_TAIL = struct.Struct("<QQQ8sII32s")
_COPY_NBYTES = 8 << 20


class JournalError(OSError):
    """A journal could not be written or replayed (the file is as it was, or as the journal says)."""


def journal_path(target: str | os.PathLike[str]) -> Path:
    """Where the journal of ``target`` lives: ``.NAME.journal`` in the same directory."""
    path = Path(target)
    return path.with_name(f".{path.name}.journal")


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _remove(journal: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(journal)
    sync_directory(journal.parent)


class JournalWriter:
    """Step 1 then 2 and 3 of the module docstring for the file ``target``, whose head now is
    ``old_head``: :meth:`add` each changed range, then :meth:`commit` with the new head. Until
    :meth:`commit` returns the file is untouched (:meth:`abandon` drops the journal). ``fd``
    and ``entries`` (file offset, length, journal offset) let a caller copy from the journal."""

    def __init__(self, target: str | os.PathLike[str], old_head: bytes) -> None:
        self.target = Path(target)
        self.path = journal_path(self.target)
        self._old_head = old_head
        self.entries: list[tuple[int, int, int]] = []
        self._hash = hashlib.sha256()
        self.nbytes = 0
        self.complete = False               # on disk in full: from then on it is never dropped unapplied
        _remove(self.path)                  # (recover() ran under the caller's lock: a stale one is garbage)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)

    def add(self, offset: int, data: memoryview) -> None:
        """The file's bytes at ``offset`` become ``data`` (at :meth:`commit`)."""
        data = memoryview(data).cast("B")
        _pwrite_all(self.fd, data, self.nbytes)
        self._hash.update(data)
        self.entries.append((offset, len(data), self.nbytes))
        self.nbytes += len(data)

    def commit(self, new_head: bytes) -> None:
        """Complete the journal (on disk), apply it in place (on disk), drop it."""
        trailer = b"".join(_ENTRY.pack(*e) for e in self.entries) + new_head + hashlib.sha256(self._old_head).digest()
        trailer += _TAIL.pack(len(self.entries), len(new_head), self.nbytes, MAGIC, VERSION, 0, bytes(32))[:-32]
        self._hash.update(trailer)
        _pwrite_all(self.fd, trailer + self._hash.digest(), self.nbytes)
        os.fsync(self.fd)
        sync_directory(self.path.parent)       # the journal is there after a power cut, before the file changes
        self.complete = True
        _apply(self.fd, self.target, self.entries, new_head)
        self.close()
        _remove(self.path)

    def abandon(self) -> None:
        """Drop an uncommitted journal (the file was not touched). A complete one whose applying
        failed stays: :func:`recover` finishes it."""
        self.close()
        if not self.complete:
            _remove(self.path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _apply(journal_fd: int, target: Path, entries: list[tuple[int, int, int]], new_head: bytes) -> None:
    fd = os.open(target, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        for offset, length, at in entries:
            if offset < len(new_head) or offset + length > size:
                raise JournalError(f"journal of {target}: a range {offset:#x}+{length:#x} outside the file's body")
            done = 0
            while done < length:
                n = os.copy_file_range(journal_fd, fd, min(length - done, _COPY_NBYTES), at + done, offset + done)
                if n <= 0:
                    raise JournalError(f"journal of {target}: ends inside a range")
                done += n
        os.fsync(fd)                            # the ranges, before the head that names them
        _pwrite_all(fd, new_head, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_complete(fd: int, nbytes: int) -> tuple[list[tuple[int, int, int]], bytes, bytes] | None:
    """(entries, new head, SHA-256 of the old head) of a complete journal; None if incomplete."""
    if nbytes < _TAIL.size:
        return None
    n, head_len, index_at, magic, version, _zero, digest = _TAIL.unpack(os.pread(fd, _TAIL.size, nbytes - _TAIL.size))
    if magic != MAGIC or version != VERSION or index_at + n * _ENTRY.size + head_len + 32 + _TAIL.size != nbytes:
        return None
    sha, pos = hashlib.sha256(), 0
    while pos < nbytes - 32:
        piece = os.pread(fd, min(_COPY_NBYTES, nbytes - 32 - pos), pos)
        if not piece:
            return None
        sha.update(piece)
        pos += len(piece)
    if sha.digest() != digest:
        return None
    index = os.pread(fd, n * _ENTRY.size + head_len + 32, index_at)
    entries = [_ENTRY.unpack_from(index, i * _ENTRY.size) for i in range(n)]
    if any(at + length > index_at for _offset, length, at in entries):
        return None
    head = index[n * _ENTRY.size:n * _ENTRY.size + head_len]
    return entries, head, index[-32:]


def recover(target: str | os.PathLike[str]) -> str | None:
    """Finish or drop the journal of ``target`` (its writer died), under the caller's lock:
    ``"replayed"`` (complete, for this file: the file is now the new version), ``"discarded"``
    (incomplete, or for another version of the file: the file is as it was), None (no journal)."""
    target = Path(target)
    journal = journal_path(target)
    try:
        fd = os.open(journal, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)   # (a FIFO: no wait)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise JournalError(f"cannot open the journal {journal}: {err.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise JournalError(f"{journal} is not a regular file of this user: not touched")
        complete = _read_complete(fd, st.st_size)
        outcome = "discarded"
        if complete is not None:
            entries, head, old_sha = complete
            try:
                with open(target, "rb") as f:
                    current = f.read(len(head))
            except FileNotFoundError:
                current = b""
            if current == head or hashlib.sha256(current).digest() == old_sha:
                _apply(fd, target, entries, head)
                outcome = "replayed"
    finally:
        os.close(fd)
    _remove(journal)
    log.warning("%s: the journal of an interrupted write was %s", target, outcome)
    return outcome
