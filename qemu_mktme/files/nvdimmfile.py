"""The NVDIMM media image: what a persistent-memory module would hold, ciphertext, in one file.

Under MKTME the memory controller encrypts every line on its way to the module, so the media
holds AES-XTS ciphertext under the VM's key with the line's host physical address as the tweak
(mktme.md §4). This file is that media: a 4 KiB header, then the module's bytes exactly as DRAM
would carry them (never plaintext). Layout, version 1 (integers little-endian)::

    "QMKTNVDM" | u32 version | u32 line size (64) | u64 size | u64 HPA written at | u32 KeyID
    | u32 0 | 16s algorithm | 16s reason | u64 written (ns since the epoch) | 16s image id
    | 32-byte body digest | 32-byte SHA-256 of the header                 zero-padded to 4096 bytes
    body: ``size`` bytes of ciphertext, the line at offset o encrypted with tweak HPA + o

**What the header's digest is, and why it is not keyed** (the decision docs/nvdimm.md explains):
the header and the body are bound by SHA-256 digests (the body's: SHA-256 over the SHA-256 of
each 8 MiB unit, so that a writer can tell unchanged units), checked in full before QEMU starts,
so a changed byte anywhere (a flipped bit, an edited HPA, a truncated or spliced file) is
refused with one line. No key goes into them, and no key check value either: anything computed under
the VM's key would fail for a wrong key and so tell "wrong key" from "moved image", which the
hardware cannot do; with these digests a wrong key decrypts, as on hardware, to garbage. The
price: the digests stop accidents and edits made without recomputing them, not a forger who
rewrites the file and its digests. Such a forger gains nothing the bus already gives him (MKTME
has no integrity: he could write any ciphertext to the module itself), and nothing secret.

The image is written all or nothing: a new image through :func:`.atomic.atomic_output`
(temporary, fsync, rename); an image whose writer read it before (its unit digests in hand) by
writing only the changed units and the header in place, through a redo journal beside it
(:mod:`.journal`: ``.NAME.journal``, ciphertext only, fsynced before the image is touched;
:func:`recover_media` replays a complete one or drops an incomplete one before the image is
opened). So ``kill -9`` at any moment leaves the last complete image; a module whose every unit
is as it was read is not rewritten at all. :class:`MediaLock` keeps two VMs
off one image (an ``flock`` on a lock file in the user's runtime directory, held while the VM runs
and removed at its end: nothing is made beside the image). Offline
:func:`rekey_media` re-encrypts an image for another HPA and/or key (plaintext only in memory,
one chunk at a time).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import stat
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..engine.xts import XtsKey, decrypt_lines, encrypt_lines
from ..errors import NvdimmError, SnapshotError
from .atomic import atomic_output, starts_with
from .journal import JournalWriter, journal_path, recover
from . import runtime
from .regular import open_regular

MAGIC = b"QMKTNVDM"
VERSION = 1
LINE_NBYTES = 64
HEADER_NBYTES = 4096
ALIGN = 2 << 20
"""Media sizes are whole 2 MiB: EPT, VMM and IOMMU map them with 2 MiB leaves."""
_FIELDS = struct.Struct("<8sIIQQII16s16sQ16s32s")
_DIGEST_AT = _FIELDS.size
CHUNK_NBYTES = 8 << 20
DIGEST_UNIT = 8 << 20
"""The body's digest is over the SHA-256 of each 8 MiB unit (:class:`UnitDigests`)."""
REASONS = ("shutdown", "dump", "rekey", "flush")


@dataclass(frozen=True)
class MediaHeader:
    """Where and how an image was written (nothing secret: no key, no key fingerprint)."""

    size: int
    hpa: int
    algorithm: str
    keyid: int
    reason: str
    written_ns: int
    image_id: bytes
    body_sha256: bytes

    def describe(self) -> dict[str, Any]:
        return {"format": f"qemu-mktme NVDIMM media v{VERSION}", "size": self.size, "hpa": f"{self.hpa:#x}",
                "tweak": f"HPA of each 64-byte line ({self.hpa:#x} + offset), KeyID bits removed",
                "algorithm": self.algorithm, "keyid": self.keyid, "reason": self.reason,
                "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.written_ns / 1e9)),
                "image-id": self.image_id.hex(), "body-sha256": self.body_sha256.hex()}

    def pack(self) -> bytes:
        fields = _FIELDS.pack(MAGIC, VERSION, LINE_NBYTES, self.size, self.hpa, self.keyid, 0,
                              self.algorithm.encode(), self.reason.encode(), self.written_ns, self.image_id,
                              self.body_sha256)
        return fields + hashlib.sha256(fields).digest() + bytes(HEADER_NBYTES - _DIGEST_AT - 32)


def check_size(size: int, label: str) -> None:
    """``NvdimmError`` unless ``size`` is a positive multiple of 2 MiB."""
    if size <= 0 or size % ALIGN:
        raise NvdimmError(f"{label}: size {size:#x} is not a positive multiple of 2 MiB")


def _unpack(raw: bytes, label: str) -> MediaHeader:
    if len(raw) < HEADER_NBYTES or raw[:8] != MAGIC:
        raise NvdimmError(f"{label} is not a qemu-mktme NVDIMM media image (no {MAGIC.decode()} header)")
    (_, version, line, size, hpa, keyid, zero, alg, reason, written, image_id, body) = _FIELDS.unpack_from(raw)
    if version != VERSION:
        raise NvdimmError(f"{label}: media format version {version}, this qemu-mktme reads {VERSION}")
    if (raw[_DIGEST_AT:_DIGEST_AT + 32] != hashlib.sha256(raw[:_DIGEST_AT]).digest()
            or any(raw[_DIGEST_AT + 32:HEADER_NBYTES]) or zero or line != LINE_NBYTES):
        raise NvdimmError(f"{label}: the media header fails its digest (tampered or corrupt): refused")
    try:
        header = MediaHeader(size, hpa, alg.rstrip(b"\0").decode("ascii"), keyid,
                             reason.rstrip(b"\0").decode("ascii"), written, image_id, body)
    except UnicodeDecodeError:
        raise NvdimmError(f"{label}: the media header is malformed: refused") from None
    check_size(size, label)
    if hpa % ALIGN:
        raise NvdimmError(f"{label}: the media header's HPA {hpa:#x} is not 2 MiB aligned: refused")
    return header


def check_kind(path: str | os.PathLike[str], label: str) -> None:
    """``NvdimmError`` when ``path`` exists and is not a regular file (a directory, a FIFO, a
    device such as ``/dev/zero``), without opening it; a missing path passes."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as err:
        raise NvdimmError(f"{label}: {err.strerror}") from None
    if stat.S_ISDIR(mode):
        raise NvdimmError(f"{label} is a directory")
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special"
        raise NvdimmError(f"{label} is {kind}, not a regular file: a media image is a file")


def _open(path: str | os.PathLike[str]) -> tuple[int, MediaHeader]:
    label = f"NVDIMM media {path}"
    check_kind(path, label)
    fd = open_regular(path, NvdimmError, label)
    try:
        header = _unpack(os.pread(fd, HEADER_NBYTES, 0), label)
        actual = os.fstat(fd).st_size - HEADER_NBYTES
        if actual != header.size:
            raise NvdimmError(f"{label} holds {max(actual, 0)} bytes of media, its header says {header.size}: "
                              "truncated or extended, refused")
    except BaseException:
        os.close(fd)
        raise
    return fd, header


def read_header(path: str | os.PathLike[str]) -> MediaHeader:
    """The header of the image at ``path``, its own digest and the file's length checked (the
    body's digest is not: :func:`verify_media`)."""
    fd, header = _open(path)
    os.close(fd)
    return header


def _chunks(fd: int, header: MediaHeader, chunk_nbytes: int = CHUNK_NBYTES,
            digests: UnitDigests | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(media offset, bytes) of the body, in one reused buffer; the body's digest is checked once
    the last chunk was read (``NvdimmError`` then: consume every chunk before trusting any). Each
    chunk is hashed while the caller uses it (the buffer is reused only after both are done)."""
    buf = np.empty(min(chunk_nbytes, header.size), np.uint8)
    digests = digests if digests is not None else UnitDigests()
    with ThreadPoolExecutor(1, thread_name_prefix="nvdimm-digest") as hasher:
        for off in range(0, header.size, chunk_nbytes):
            n = min(chunk_nbytes, header.size - off)
            if os.preadv(fd, [buf[:n].data], HEADER_NBYTES + off) != n:
                raise NvdimmError(f"NVDIMM media: short read at {off:#x}")
            hashed = hasher.submit(digests.update, buf[:n].data, final=off + n >= header.size)
            try:
                yield off, buf[:n]
            finally:
                hashed.result()
    if digests.digest() != header.body_sha256:
        raise NvdimmError("the media image fails its digest (tampered or corrupt): refused")


def verify_media(path: str | os.PathLike[str]) -> MediaHeader:
    """The header of the image at ``path`` once header and body passed their digests; else one
    ``NvdimmError`` line (not a media image, truncated, tampered, a directory, a FIFO...)."""
    fd, header = _open(path)
    try:
        for _ in _chunks(fd, header):
            pass
    except NvdimmError as err:
        journal = journal_path(os.path.realpath(path))
        try:
            rewritten = read_header(path) != header       # a writer changed it in place while it was read
        except NvdimmError:
            rewritten = False
        if rewritten:
            raise NvdimmError(f"NVDIMM media {path} was written while it was read: read it again") from None
        if journal.exists():                    # a writer is at work (or was killed: the next opener recovers)
            raise NvdimmError(f"NVDIMM media {path} is being written (its journal {journal.name} "
                              "is pending): read it again once the VM wrote it or, if it was killed, once "
                              "`run` or `nvdimm rekey` opened it (they complete the write)") from None
        raise NvdimmError(f"NVDIMM media {path}: {err}") from None
    finally:
        os.close(fd)
    return header


@contextlib.contextmanager
def read_media(path: str | os.PathLike[str], chunk_nbytes: int = CHUNK_NBYTES, *,
               digests: UnitDigests | None = None) -> Iterator[tuple[MediaHeader, Iterator[tuple[int, np.ndarray]]]]:
    """``with read_media(p) as (header, chunks):`` the body streamed; the digest is checked at
    the end of the stream: consume it all before trusting any of it (or :func:`verify_media`).
    ``digests`` receives the body's unit digests (for :func:`write_media`'s ``previous``)."""
    fd, header = _open(path)
    try:
        yield header, _chunks(fd, header, chunk_nbytes, digests)
    finally:
        os.close(fd)


class UnitDigests:
    """The body's digest as this format defines it: SHA-256 over the list of the SHA-256 of each
    :data:`DIGEST_UNIT` of the body (the last one may be shorter). The same cost as one SHA-256 of
    the body, and a writer can tell which units changed since the image was read."""

    def __init__(self) -> None:
        self.units: list[bytes] = []
        self._hash = hashlib.sha256()
        self._nbytes = 0

    def update(self, view: memoryview, *, final: bool = False, pool: ThreadPoolExecutor | None = None) -> None:
        """Hash ``view``, the body's next bytes (``final``: its last). With ``pool``, the whole
        units that start on a unit boundary are hashed concurrently (hashlib drops the GIL)."""
        pos = 0
        if pool is not None and self._nbytes == 0 and len(view) > DIGEST_UNIT:
            whole = len(view) if final else len(view) - len(view) % DIGEST_UNIT
            units = [view[i:i + DIGEST_UNIT] for i in range(0, whole, DIGEST_UNIT)]
            self.units += pool.map(lambda unit: hashlib.sha256(unit).digest(), units)
            pos = whole
        while pos < len(view):
            take = min(DIGEST_UNIT - self._nbytes, len(view) - pos)
            self._hash.update(view[pos:pos + take])
            self._nbytes += take
            pos += take
            if self._nbytes == DIGEST_UNIT:
                self._close_unit()
        if final and self._nbytes:
            self._close_unit()

    def _close_unit(self) -> None:
        self.units.append(self._hash.digest())
        self._hash, self._nbytes = hashlib.sha256(), 0

    def digest(self) -> bytes:
        return hashlib.sha256(b"".join(self.units)).digest()


def write_media(path: str | os.PathLike[str], chunks: Iterable[tuple[int, np.ndarray]], *, size: int, hpa: int,
                algorithm: str, keyid: int, reason: str, previous: list[bytes] | None = None,
                units: list[bytes] | None = None) -> MediaHeader | None:
    """Write a new image at ``path`` (replacing the old one atomically) from ``chunks``: (media
    offset, ciphertext) in order covering ``[0, size)``. The old image stays until the new one
    is complete and on disk. ``NvdimmError`` if the chunks do not cover the size or writing fails.

    ``previous``: the unit digests of the image at ``path`` as it was read (:func:`read_media`'s
    ``digests``). When the header's fields and every unit are the same again, nothing is written
    and None is returned (the image on disk already holds exactly this); when some unit changed,
    only the changed units and the header are written, in place through a redo journal
    (:mod:`.journal`): ``kill -9`` at any point leaves the old image or, once the journal is
    complete, the new one after :func:`recover_media`. With
    ``previous``, chunks must start on :data:`DIGEST_UNIT` boundaries. ``units`` receives the unit
    digests of what was given (the ``previous`` of the next write). The caller holds the image's
    :class:`MediaLock` (or is its only writer)."""
    check_size(size, f"NVDIMM media {path}")
    if reason not in REASONS:
        raise ValueError(f"reason must be one of {REASONS}, got {reason!r}")
    if journal_path(path).exists():                   # an earlier write that failed half-way: finished first
        recover_media(path)
    old_fd = _previous_image(path, previous, (size, hpa, algorithm, keyid))
    if old_fd is not None and previous is not None:
        try:
            return _write_changed_units(path, old_fd, chunks, previous, (size, hpa, algorithm, keyid, reason), units)
        finally:
            os.close(old_fd)
    return _write_whole(path, iter(chunks), (size, hpa, algorithm, keyid, reason), units)


Prefix = Callable[[BinaryIO], None]


def _write_whole(path: str | os.PathLike[str], chunks: Iterator[tuple[int, np.ndarray]],
                 fields: tuple[int, int, str, int, str], units: list[bytes] | None, *,
                 start: int = 0, prefix: Prefix | None = None, digests: UnitDigests | None = None) -> MediaHeader:
    """A new image at ``path`` through :func:`.atomic.atomic_output`; ``prefix`` writes its body's
    first ``start`` bytes (whose unit digests ``digests`` holds already), ``chunks`` the rest."""
    size, hpa, algorithm, keyid, reason = fields
    digests = digests if digests is not None else UnitDigests()
    try:
        with atomic_output(path, force=True, what="NVDIMM media", proof=starts_with(MAGIC)) as out, \
                ThreadPoolExecutor(1, thread_name_prefix="nvdimm-digest") as hasher, \
                ThreadPoolExecutor(2, thread_name_prefix="nvdimm-units") as unit_pool:
            out.write(bytes(HEADER_NBYTES))
            if prefix is not None:
                prefix(out)
            pos = start
            for off, data in chunks:
                if off != pos:
                    raise NvdimmError(f"NVDIMM media {path}: chunk at {off:#x}, expected {pos:#x}")
                view = np.ascontiguousarray(data, np.uint8).reshape(-1).data
                pos, final = off + len(view), off + len(view) >= size
                hashed = hasher.submit(digests.update, view, final=final, pool=unit_pool)   # beside the write
                out.write(view)
                hashed.result()
            if pos != size:
                raise NvdimmError(f"NVDIMM media {path}: {pos} bytes given, size is {size}")
            header = MediaHeader(size, hpa, algorithm, keyid, reason, time.time_ns(), os.urandom(16), digests.digest())
            out.seek(0)
            out.write(header.pack())
    except SnapshotError as err:
        raise NvdimmError(str(err)) from None
    if units is not None:
        units[:] = digests.units
    return header


def _write_changed_units(path: str | os.PathLike[str], old_fd: int, chunks: Iterable[tuple[int, np.ndarray]],
                         previous: list[bytes], fields: tuple[int, int, str, int, str],
                         units: list[bytes] | None) -> MediaHeader | None:
    """:func:`write_media` over the image ``old_fd`` that ``previous`` describes: the changed
    units and the new header go through a redo journal (:mod:`.journal`: journal, fsync, in place,
    fsync, journal dropped), so only they are written; None when no unit changed. Once more than
    half of the module changed, a whole new image costs less than journal and in place: the rest
    goes to one (the units so far copied by the kernel from the journal and the old image)."""
    size, hpa, algorithm, keyid, reason = fields
    digests = UnitDigests()
    writer: JournalWriter | None = None
    pos = 0
    rest = iter(chunks)
    try:
        with ThreadPoolExecutor(2, thread_name_prefix="nvdimm-units") as unit_pool:
            for off, data in rest:
                view = np.ascontiguousarray(data, np.uint8).reshape(-1).data
                if off != pos:
                    raise NvdimmError(f"NVDIMM media {path}: chunk at {off:#x}, expected {pos:#x}")
                pos, final = off + len(view), off + len(view) >= size
                if off % DIGEST_UNIT or (len(view) % DIGEST_UNIT and not final):
                    raise ValueError("with previous=, chunks must be whole DIGEST_UNITs")
                first = len(digests.units)
                digests.update(view, final=final, pool=unit_pool)
                for i in range(first, len(digests.units)):
                    if i >= len(previous) or digests.units[i] != previous[i]:
                        if writer is None:
                            writer = JournalWriter(path, os.pread(old_fd, HEADER_NBYTES, 0))
                        start = i * DIGEST_UNIT - off
                        writer.add(HEADER_NBYTES + i * DIGEST_UNIT, view[start:start + DIGEST_UNIT])
                if writer is not None and writer.nbytes > size // 2 and not final:
                    return _write_whole(path, rest, fields, units, start=pos, digests=digests,
                                        prefix=_copy_units(writer, old_fd, pos))
            if pos != size:
                raise NvdimmError(f"NVDIMM media {path}: {pos} bytes given, size is {size}")
            if writer is None:
                return None                           # the image on disk is exactly this one
            header = MediaHeader(size, hpa, algorithm, keyid, reason, time.time_ns(), os.urandom(16), digests.digest())
            writer.commit(header.pack())
            writer = None
    except OSError as err:
        kept = (" (its journal is complete and kept: the next open of the image finishes the write)"
                if writer is not None and writer.complete else "")
        raise NvdimmError(f"cannot write NVDIMM media {path}: {err.strerror or err}{kept}") from None
    finally:
        if writer is not None:
            writer.abandon()
    if units is not None:
        units[:] = digests.units
    return header


def _copy_units(writer: JournalWriter, old_fd: int, nbytes: int) -> Prefix:
    """What writes the body's first ``nbytes`` into a new image: each changed unit from the
    journal, the others from the old image (both by the kernel)."""
    def prefix(out: BinaryIO) -> None:
        out.flush()
        journaled = {offset: at for offset, _length, at in writer.entries}
        for offset in range(HEADER_NBYTES, HEADER_NBYTES + nbytes, DIGEST_UNIT):
            length = min(DIGEST_UNIT, HEADER_NBYTES + nbytes - offset)
            src, at = (writer.fd, journaled[offset]) if offset in journaled else (old_fd, offset)
            done = 0
            while done < length:
                n = os.copy_file_range(src, out.fileno(), length - done, at + done, offset + done)
                if n <= 0:
                    raise NvdimmError("NVDIMM media: the old image or the journal ended while copied")
                done += n
        out.seek(HEADER_NBYTES + nbytes)
    return prefix


def recover_media(path: str | os.PathLike[str]) -> str | None:
    """Finish (or drop) the journal a writer of the image at ``path`` left when it was killed;
    the caller holds the image's :class:`MediaLock`. ``"replayed"``, ``"discarded"`` or None."""
    try:
        return recover(path)
    except OSError as err:
        raise NvdimmError(f"NVDIMM media {path}: {err.strerror or err}") from None


def _previous_image(path: str | os.PathLike[str], previous: list[bytes] | None,
                    fields: tuple[int, int, str, int]) -> int | None:
    """A descriptor of the image at ``path`` when it is the one ``previous`` describes, with the
    same size, HPA, algorithm and KeyID (so its units can stand for unchanged ones); else None."""
    if previous is None:
        return None
    try:
        fd, header = _open(path)
    except NvdimmError:
        return None
    if (header.size, header.hpa, header.algorithm, header.keyid) != fields or \
            header.body_sha256 != hashlib.sha256(b"".join(previous)).digest():
        os.close(fd)
        return None
    return fd


def rekey_media(path: str | os.PathLike[str], key: XtsKey, *, to_hpa: int | None = None,
                to_key: XtsKey | None = None, algorithm: str | None = None) -> tuple[MediaHeader, MediaHeader]:
    """Re-encrypt the image at ``path`` offline for HPA ``to_hpa`` and/or key ``to_key`` (what
    software must do before an NVDIMM moves): each chunk is decrypted with ``key`` at the HPA
    recorded in the header and encrypted with the new key at the new HPA; the file is replaced
    atomically. A wrong ``key`` is not detected (garbage in, garbage out, as on hardware).
    Returns (old header, new header)."""
    old = verify_media(path)
    new_hpa = old.hpa if to_hpa is None else to_hpa
    if new_hpa % ALIGN or new_hpa < 0:
        raise NvdimmError(f"--to-hpa {new_hpa:#x} is not a 2 MiB aligned host physical address")
    new_key = key if to_key is None else to_key

    def recrypted(chunks: Iterator[tuple[int, np.ndarray]]) -> Iterator[tuple[int, np.ndarray]]:
        plain = np.empty(min(CHUNK_NBYTES, old.size), np.uint8)
        out = np.empty_like(plain)
        try:
            for off, data in chunks:
                n = data.size
                decrypt_lines(key, data, old.hpa + off, out=plain[:n])
                encrypt_lines(new_key, plain[:n], new_hpa + off, out=out[:n])
                yield off, out[:n]
        finally:
            plain.fill(0)                           # the only plaintext: scrubbed

    with read_media(path) as (header, chunks):
        new = write_media(path, recrypted(chunks), size=header.size, hpa=new_hpa,
                          algorithm=algorithm or header.algorithm, keyid=header.keyid, reason="rekey")
    assert new is not None                          # (None only for an unchanged write with previous=)
    return old, new


class MediaLock:
    """One VM per image: an exclusive ``flock`` on a lock file named after the image, held until
    :meth:`release` (the kernel drops it when the holder dies, even by ``kill -9``).

    The lock lives in this user's private runtime directory (:func:`.runtime.private_parent`, 0700,
    a tmpfs), as ``nvdimm-<digest>.lock`` where the digest names the image's directory (device and
    inode, so every spelling of the path and every bind mount of it agrees) and the image's name:
    nothing is made beside the image (its directory may be read-only, shared, or hold a file of the
    user's that merely has a lock's name), and the image's own inode cannot carry it (a write-back
    replaces the image by a rename: a new inode). The holder removes the file at :meth:`release`
    while still holding it; a taker checks after its ``flock`` that the name still leads to the
    inode it locked, and starts again if not, so removing it never lets two holders in. A file
    left by a holder killed with -9 is taken by the next one and removed by it. The lock keeps
    out this user's VMs (another user needs write access to the 0600 image anyway)."""

    def __init__(self, path: str | os.PathLike[str], holder: str) -> None:
        lock = lock_path(path)
        while True:
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except OSError as err:
                raise NvdimmError(f"NVDIMM media {path}: cannot open its lock {lock}: {err.strerror}") from None
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise NvdimmError(f"NVDIMM media {path}: its lock {lock} is not a regular file")
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                try:
                    now = os.stat(lock, follow_symlinks=False)
                except FileNotFoundError:
                    now = None
            except BlockingIOError:
                other = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another VM"
                os.close(fd)
                raise NvdimmError(f"NVDIMM media {path} is in use by {other}: one VM per media image") from None
            except BaseException:
                os.close(fd)
                raise
            if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                break
            os.close(fd)                                # its holder removed it as we opened it: again
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder} (pid {os.getpid()})\n".encode(), 0)
        self._fd = fd
        self.path = lock

    def release(self) -> None:
        """Remove the lock file (still holding it: see the class), then let it go."""
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                st, now = os.fstat(self._fd), os.stat(self.path, follow_symlinks=False)
                if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                    os.unlink(self.path)
            os.close(self._fd)
            self._fd = -1


def lock_path(path: str | os.PathLike[str]) -> Path:
    """Where :class:`MediaLock` locks the image at ``path`` (which need not exist yet; its
    directory must)."""
    real = Path(os.path.realpath(path))
    try:
        st = os.stat(real.parent)
    except OSError as err:
        raise NvdimmError(f"NVDIMM media {path}: its directory {real.parent}: {err.strerror}") from None
    digest = hashlib.sha256(f"{st.st_dev}:{st.st_ino}/".encode() + os.fsencode(real.name)).hexdigest()[:40]
    try:
        parent = runtime.private_parent()
    except PermissionError as err:
        raise NvdimmError(f"NVDIMM media {path}: no place for its lock: {err}") from None
    return parent / f"nvdimm-{digest}.lock"
