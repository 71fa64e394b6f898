"""Writing a file or a directory all or nothing: a temporary next to the target, fsync, rename.

The data goes to ``.NAME.partial-PID`` next to the target, which is renamed into place only
when complete (then the directory is synced too); any failure removes it, so a crash or a full
disk never leaves a partial output. Temporaries of a writer killed earlier (``kill -9``: its
PID is gone) are removed on the next write to the same target. Outputs are private (files
0600, directories 0700), and nothing is overwritten silently unless asked.

- :func:`atomic_output`: a file (plaintext, PNGs, snapshots: ``force=True`` replaces);
- :func:`atomic_directory`: a directory of files (DRAM dumps), never over an existing one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import SnapshotError

FORCE_HINT = " (--force overwrites)"


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, force: bool = False, what: str = "") -> Iterator[BinaryIO]:
    """``with atomic_output("out.bin") as f: f.write(...)``: ``out.bin`` (mode 0600) appears
    only if the block completes.

    Raises ``SnapshotError`` if ``path`` exists and ``force`` is false (checked before any work
    and again, atomically, when the file is put in place), or if writing fails
    (``cannot write WHAT PATH: ...``).
    """
    target = check_target(path, force=force)
    with _staged(target, what=what, force=force) as partial:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], *, what: str = "") -> Iterator[Path]:
    """``with atomic_directory("d") as tmp: (tmp / "a").write_bytes(...)``: ``d`` (0700) appears
    with everything written into ``tmp`` only if the block completes. The caller syncs the files
    it writes (:func:`write_synced`).

    Raises ``SnapshotError`` if ``path`` exists (a directory is never replaced) or if writing fails.
    """
    target = Path(path)
    refuse = f"; {what}s never overwrite" if what else ""
    if target.exists() or target.is_symlink():
        raise SnapshotError(f"{target} exists already{refuse}")
    with _staged(target, what=what, force=False, refuse=refuse) as partial:
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
    if not target.parent.is_dir():
        raise SnapshotError(f"cannot write {target}: no directory {target.parent}")
    return target


def partial_path(target: Path) -> Path:
    """Where this process stages ``target``."""
    return target.with_name(f".{target.name}.partial-{os.getpid()}")


def remove_stale_partials(target: Path) -> None:
    """Remove the temporaries of earlier writes of ``target`` whose process is gone (killed with -9)."""
    for p in target.parent.glob(f".{target.name}.partial-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _discard(p)


@contextlib.contextmanager
def _staged(target: Path, *, what: str, force: bool, refuse: str = FORCE_HINT) -> Iterator[Path]:
    """The one sequence: the block fills the partial path; it is put in place (and the directory
    synced) only when the block completes, and removed whatever happens."""
    remove_stale_partials(target)
    partial = partial_path(target)
    try:
        yield partial
        _place(partial, target, force, refuse)
        _sync_directory(target.parent)
    except OSError as err:
        raise SnapshotError(f"cannot write {what + ' ' if what else ''}{target}: {err.strerror or err}") from err
    finally:
        _discard(partial)


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


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
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
