"""Files the inspection tools write (plaintext, PNGs): all or nothing, 0600, no silent overwrite.

The data goes to a temporary file next to the target, which is renamed into place only when
complete; any failure removes it, so a crash or a full disk never leaves a partial output.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from ..errors import SnapshotError


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, force: bool = False) -> Iterator[BinaryIO]:
    """``with atomic_output("out.bin") as f: f.write(...)``: ``out.bin`` (mode 0600) appears
    only if the block completes.

    Raises ``SnapshotError`` if ``path`` exists and ``force`` is false (checked before any work
    and again, atomically, when the file is put in place), or if writing fails.
    """
    target = check_target(path, force=force)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as err:
        raise SnapshotError(f"cannot write {target}: {err.strerror or err}") from err
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _place(partial, target, force)
    except OSError as err:
        raise SnapshotError(f"cannot write {target}: {err.strerror or err}") from err
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)


def check_target(path: str | os.PathLike[str], *, force: bool = False) -> Path:
    """``SnapshotError`` now, before any long work, if ``path`` cannot become a new output."""
    target = Path(path)
    if target.is_dir():
        raise SnapshotError(f"{target} is a directory")
    if not force and (target.exists() or target.is_symlink()):
        raise SnapshotError(f"{target} exists already (--force overwrites)")
    if not target.parent.is_dir():
        raise SnapshotError(f"cannot write {target}: no directory {target.parent}")
    return target


def _place(partial: Path, target: Path, force: bool) -> None:
    if force:
        os.replace(partial, target)
        return
    try:
        os.link(partial, target)            # fails if target appeared meanwhile: never overwrite
    except FileExistsError:
        raise SnapshotError(f"{target} exists already (--force overwrites)") from None
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if target.exists():                 # a file system without hard links
            raise SnapshotError(f"{target} exists already (--force overwrites)") from None
        os.rename(partial, target)
