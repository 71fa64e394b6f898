"""A deterministic ``newc`` cpio writer for initramfs images.

Written here rather than calling cpio(1) so that the same inputs give the same bytes (fixed
owner and mtime, sorted entries): the image manifest can then pin the initramfs by sha256.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import BinaryIO
from collections.abc import Iterable

TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One archive member: a directory, a regular file or a symlink (``data`` is its target)."""

    name: str
    mode: int
    data: bytes = b""


def directory(name: str, perm: int = 0o755) -> Entry:
    return Entry(name, stat.S_IFDIR | perm)


def file(name: str, data: bytes, perm: int = 0o644) -> Entry:
    return Entry(name, stat.S_IFREG | perm, data)


def symlink(name: str, target: str) -> Entry:
    return Entry(name, stat.S_IFLNK | 0o777, target.encode())


def _header(ino: int, entry: Entry, nlink: int) -> bytes:
    name = entry.name.encode() + b"\0"
    fields = (ino, entry.mode, 0, 0, nlink, 0, len(entry.data), 0, 0, 0, 0, len(name), 0)
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + name
    return head + b"\0" * (-len(head) % 4)


def write(out: BinaryIO, entries: Iterable[Entry]) -> None:
    """Write ``entries`` (sorted by name, parents first) and the trailer to ``out``."""
    for ino, entry in enumerate(sorted(entries, key=lambda e: e.name), start=1):
        if entry.name.startswith("/") or not entry.name:
            raise ValueError(f"cpio member names are relative: {entry.name!r}")
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        out.write(_header(ino, entry, nlink))
        out.write(entry.data)
        out.write(b"\0" * (-len(entry.data) % 4))
    out.write(_header(0, Entry(TRAILER, 0), 1))


def read_member(src: BinaryIO, name: str) -> bytes:
    """The data of regular file ``name`` in a ``newc`` archive (``KeyError`` if absent)."""
    while True:
        head = src.read(110)
        if len(head) < 110 or head[:6] != b"070701":
            raise ValueError("not a newc cpio archive (or truncated)")
        mode, filesize, namesize = int(head[14:22], 16), int(head[54:62], 16), int(head[94:102], 16)
        member = src.read(namesize)[:-1].decode()
        src.read(-(110 + namesize) % 4)
        data = src.read(filesize)
        src.read(-filesize % 4)
        if member == TRAILER:
            raise KeyError(name)
        if member == name and stat.S_ISREG(mode):
            return data
