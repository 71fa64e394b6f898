"""Key files as users give them: the one bounded reader every key file goes through.

``--key user:@FILE``, ``inspect --key @FILE`` and ``--kek-file FILE`` are all read here, by the
command the user typed (never by a running host, which gets the key over its 0600 control
socket). The reader

- accepts regular files (a symlink is followed, its target must be a regular file) and, for
  ``<(...)`` process substitution, a pipe spelled ``/dev/fd/N`` or ``/proc/self/fd/N``, read with
  a time limit so that a silent writer cannot hang the command;
- refuses FIFOs, devices (``/dev/zero``), directories and sockets without opening them for long
  (the open is non-blocking and the type is checked again on the descriptor);
- reads at most :data:`MAX_KEY_FILE` bytes, so a huge file is an error and not a ``MemoryError``;
- warns on stderr, like ssh, when a key file is readable by group or others;
- names the file in every error and never repeats its content (binary data is "not a key file").
"""

from __future__ import annotations

import os
import re
import select
import stat
import sys
import time
from collections.abc import Callable

from ..host.payload import payload_from_spec

MAX_KEY_FILE = 4096
"""Bytes; the longest key file (an aes-xts-256 key and tweak in hex, or a KEK) is under 200."""
PIPE_TIMEOUT = 10.0
"""Seconds a ``/dev/fd/N`` pipe may take to deliver its key and close."""

_FD_PATH = re.compile(r"^/(?:dev|proc/self)/fd/\d+$")
_TEXT = re.compile(rb"^[\x20-\x7e\t\r\n]*$")


class KeyFileError(ValueError):
    """A key file that cannot be used; the message names the file, never its content."""


def _warn(message: str) -> None:
    print(f"qemu-mktme: warning: {message}", file=sys.stderr)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def read_key_file(path: str | os.PathLike[str], *, what: str = "key file", limit: int = MAX_KEY_FILE,
                  timeout: float = PIPE_TIMEOUT, warn: Callable[[str], None] | None = _warn) -> str:
    """The text of key file ``path`` (ASCII), read within the rules above.

    ``KeyFileError`` (a ``ValueError``) says what is wrong, e.g. ``key file k.bin: not a key file
    (binary data)``. ``what`` names the file's role in messages; ``warn`` receives the
    permission warning (None: no warning).
    """
    name = os.fspath(path)
    label = f"{what} {name}"
    pipe_ok = bool(_FD_PATH.match(name))
    try:
        st = os.stat(name)                       # follows symlinks: the final target counts
    except OSError as err:
        raise KeyFileError(f"{label}: {err.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or (pipe_ok and stat.S_ISFIFO(st.st_mode))):
        hint = " (pass a key through a pipe as /dev/fd/N, e.g. <(...))" if stat.S_ISFIFO(st.st_mode) else ""
        raise KeyFileError(f"{label}: {_kind(st.st_mode)}, not a regular file{hint}")
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as err:
        raise KeyFileError(f"{label}: {err.strerror}") from None
    try:
        st = os.fstat(fd)                        # what we opened, not what was there a moment ago
        if stat.S_ISREG(st.st_mode):
            data = _read_regular(fd, limit + 1)
            if warn is not None and st.st_mode & 0o044:
                warn(f"{label} is readable by {'group and others' if st.st_mode & 0o004 else 'group'} "
                     f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 {name}")
        elif pipe_ok and stat.S_ISFIFO(st.st_mode):
            data = _read_pipe(fd, limit + 1, timeout, label)
        else:
            raise KeyFileError(f"{label}: {_kind(st.st_mode)}, not a regular file")
    except OSError as err:
        raise KeyFileError(f"{label}: {err.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise KeyFileError(f"{label}: larger than {limit} bytes, not a key file")
    if not _TEXT.match(data):
        raise KeyFileError(f"{label}: not a key file (binary data)")
    return data.decode("ascii")


def _read_regular(fd: int, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, n - got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _read_pipe(fd: int, n: int, timeout: float, label: str) -> bytes:
    chunks, got = [], 0
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(int(left * 1000) + 1):
            if time.monotonic() >= deadline:
                raise KeyFileError(f"{label}: the pipe delivered no complete key within {timeout:g} s")
            continue
        try:
            chunk = os.read(fd, n - got)
        except BlockingIOError:
            continue
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def key_payload(spec: str) -> str | None:
    """``--key``'s spec as an ``mktme`` payload, ``user:@FILE`` read with :func:`read_key_file`.

    The grammar is :func:`qemu_mktme.host.payload.payload_from_spec`'s; ``ValueError`` never
    repeats key material.
    """
    return payload_from_spec(spec, read_file=read_key_file)
