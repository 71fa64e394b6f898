"""Open a path that must name a regular file, refusing anything else before reading a byte.

A FIFO, a character device such as ``/dev/zero`` or a directory given where a file is expected
would block the open or make a read endless; ``O_NONBLOCK`` keeps the open from blocking and the
``fstat`` of the descriptor (not of the path, which could change in between) decides.
"""

from __future__ import annotations

import os
import stat


def open_regular(path: str | os.PathLike[str], error: type[Exception], label: str, *,
                 nofollow: bool = False, missing: str | None = None) -> int:
    """A read-only descriptor (close-on-exec) of the regular file at ``path``; else ``error``
    with a one-line message about ``label`` (``missing``: the message when there is no such file)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC | (os.O_NOFOLLOW if nofollow else 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as err:
        raise error(missing or f"{label}: {err.strerror}") from None
    except OSError as err:
        raise error(f"{label}: {err.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise error(f"{label} is not a regular file")
    return fd
