"""Writing a file or a directory all or nothing: a temporary next to the target, fsync, rename.

The data goes to ``.NAME.partial-PID-START`` next to the target (the writer's pid and its start
time, so a reused pid is told from the writer), which is renamed into place only when complete
(then the directory is synced too); any failure removes it, so a crash or a full disk never
leaves a partial output. Temporaries of a writer killed earlier (``kill -9``: no process PID, or
one started at another time) are removed on the next write to the same target, and on the next
write of the same kind into the directory when their content proves them ours (a snapshot's
magic, a dump directory's member names). Only regular files and directories of this user are
removed, never through a symlink. Outputs are
private (files 0600, directories 0700), and nothing is overwritten silently unless asked.

- :func:`atomic_output`: a file (plaintext, PNGs, snapshots: ``force=True`` replaces);
- :func:`atomic_directory`: a directory of files (DRAM dumps), never over an existing one.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import SnapshotError
from .runtime import process_start_time

log = logging.getLogger(__name__)

_PARTIAL = re.compile(r"\.(?P<target>.+)\.partial-(?P<pid>[1-9][0-9]*)(?:-(?P<start>[0-9]+))?")

FORCE_HINT = " (--force overwrites)"


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, force: bool = False, what: str = "",
                  proof: Proof | None = None) -> Iterator[BinaryIO]:
    """``with atomic_output("out.bin") as f: f.write(...)``: ``out.bin`` (mode 0600) appears
    only if the block completes. ``proof`` (e.g. :func:`starts_with` the format's magic) tells a
    dead writer's temporary of another name in the directory as ours, to be removed too.

    Raises ``SnapshotError`` if ``path`` exists and ``force`` is false (checked before any work
    and again, atomically, when the file is put in place), or if writing fails
    (``cannot write WHAT PATH: ...``).
    """
    target = check_target(path, force=force)
    with _staged(target, what=what, force=force, proof=proof) as partial:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], *, what: str = "",
                     proof: Proof | None = None) -> Iterator[Path]:
    """``with atomic_directory("d") as tmp: (tmp / "a").write_bytes(...)``: ``d`` (0700) appears
    with everything written into ``tmp`` only if the block completes. The caller syncs the files
    it writes (:func:`write_synced`).

    Raises ``SnapshotError`` if ``path`` exists (a directory is never replaced) or if writing fails.
    """
    target = Path(path)
    refuse = f"; {what}s never overwrite" if what else ""
    if target.exists() or target.is_symlink():
        raise SnapshotError(f"{target} exists already{refuse}")
    with _staged(target, what=what, force=False, refuse=refuse, proof=proof) as partial:
        partial.mkdir(mode=0o700)
        yield partial


def write_synced(path: Path, data: bytes) -> None:
    """A new file ``path`` (0600) holding ``data``, on disk when this returns."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def check_target(path: str | os.PathLike[str], *, force: bool = False) -> Path:
    """``SnapshotError`` now, before any long work, if ``path`` cannot become a new output."""
    target = Path(path)
    if target.is_dir():
        raise SnapshotError(f"{target} is a directory")
    if not force and (target.exists() or target.is_symlink()):
        raise SnapshotError(f"{target} exists already{FORCE_HINT}")
    try:
        mode = target.lstat().st_mode
    except FileNotFoundError:
        mode = stat.S_IFREG
    except OSError as err:
        raise SnapshotError(f"cannot write {target}: {err.strerror}") from None
    if stat.S_ISLNK(mode):
        raise SnapshotError(f"{target} is a symbolic link: replacing it would replace the link, not the file it "
                            "names; refusing (give the file's own path)")
    if not stat.S_ISREG(mode):
        raise SnapshotError(f"{target} exists and is {_kind(mode)}, not a regular file: refusing to replace it")
    if not target.parent.is_dir():
        raise SnapshotError(f"cannot write {target}: no directory {target.parent}")
    return target


def _kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), f"of file type {stat.S_IFMT(mode):#o}")


def partial_path(target: Path) -> Path:
    """Where this process stages ``target``: named for its writer (pid and start time)."""
    return target.with_name(f".{target.name}.partial-{os.getpid()}-{process_start_time(os.getpid())}")


Proof = Callable[[str, os.stat_result], bool]
"""proof(path, lstat): whether a dead writer's temporary of *another* target is one of ours."""


def starts_with(magic: bytes) -> Proof:
    """A regular file that is empty or begins with ``magic`` (a format's first bytes)."""
    def proof(path: str, st: os.stat_result) -> bool:
        if not stat.S_ISREG(st.st_mode):
            return False
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            head, same = os.pread(fd, len(magic), 0), os.fstat(fd).st_ino == st.st_ino
        finally:
            os.close(fd)
        return same and head in (b"", magic)
    return proof


def holds_only(names: Iterable[str]) -> Proof:
    """A directory holding nothing but regular files of these names (an output directory's members)."""
    allowed = frozenset(names)
    def proof(path: str, st: os.stat_result) -> bool:
        if not stat.S_ISDIR(st.st_mode):
            return False
        with os.scandir(path) as entries:
            return all(e.name in allowed and e.is_file(follow_symlinks=False) for e in entries)
    return proof


def remove_stale_partials(target: Path, *, proof: Proof | None = None) -> list[str]:
    """Remove the temporaries of writers killed earlier: those of ``target`` and, with ``proof``,
    those of any other name in its directory that it proves ours. The names removed."""
    removed: list[str] = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        m = _PARTIAL.fullmatch(entry.name)
        if not m or (m["target"] != target.name and proof is None):
            continue
        try:
            if _stale(entry, m, proof if m["target"] != target.name else None):
                _discard(Path(entry.path))
                removed.append(entry.name)
                log.info("removed %s, left by a writer (pid %s) that is gone", entry.path, m["pid"])
        except OSError:
            continue
    return removed


def _stale(entry: os.DirEntry[str], m: re.Match[str], proof: Proof | None) -> bool:
    """A regular file or directory of this user (never a symlink), proven ours when ``proof`` is
    given, whose writer is dead."""
    st = entry.stat(follow_symlinks=False)
    if st.st_uid != os.getuid() or not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        return False
    start = process_start_time(int(m["pid"]))
    if start is not None and (m["start"] is None or int(m["start"]) == start):
        return False                                              # the writer may be alive
    return proof is None or proof(entry.path, st)


@contextlib.contextmanager
def _staged(target: Path, *, what: str, force: bool, refuse: str = FORCE_HINT,
            proof: Proof | None = None) -> Iterator[Path]:
    """The one sequence: the block fills the partial path; it is put in place (and the directory
    synced) only when the block completes, and removed whatever happens. Once in place the write
    has succeeded: a directory that cannot be synced afterwards is a warning, not a failure."""
    remove_stale_partials(target, proof=proof)
    partial = partial_path(target)
    try:
        yield partial
        _place(partial, target, force, refuse)
    except OSError as err:
        raise SnapshotError(f"cannot write {what + ' ' if what else ''}{target}: {err.strerror or err}") from err
    finally:
        _discard(partial)
    try:
        sync_directory(target.parent)
    except OSError as err:
        log.warning("wrote %s, but could not sync its directory: %s", target, err.strerror or err)


def _place(partial: Path, target: Path, force: bool, refuse: str) -> None:
    if force:
        os.replace(partial, target)
        return
    try:
        os.link(partial, target)            # fails if target appeared meanwhile: never overwrite
    except FileExistsError:
        raise SnapshotError(f"{target} exists already{refuse}") from None
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if target.exists():                 # a directory, or a file system without hard links
            raise SnapshotError(f"{target} exists already{refuse}") from None
        os.rename(partial, target)


def sync_directory(directory: Path) -> None:
    """fsync ``directory`` itself, so a rename or unlink in it survives a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _discard(partial: Path) -> None:
    if partial.is_dir() and not partial.is_symlink():
        shutil.rmtree(partial, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
