"""Runtime directories: one private parent per user, a marker in each, and a sweep that removes
only what it can prove this tool created for a process that is gone.

The parent is ``$QEMU_MKTME_RUNTIME_DIR`` when set, else ``$XDG_RUNTIME_DIR/qemu-mktme`` when
``XDG_RUNTIME_DIR`` is a usable directory of ours, else ``/tmp/qemu-mktme-<uid>``. Whichever
it is must be a real directory (not a symlink), owned by us, mode 0700; otherwise it is refused
(``PermissionError`` naming it and saying what is wrong), never repaired or used.

Each runtime directory (QMP and console sockets of one machine) is ``<parent>/<name>-<pid>-XXXX``
and holds a marker file, :data:`MARKER`, written by the tool with the owner's pid and the start
time of that process (``/proc/PID/stat`` field 22), so a reused pid is told from the owner.
:func:`sweep` removes a directory of the parent only when its marker is ours and its owner is
dead (no such pid, or a different start time). Nothing outside the parent is ever looked at,
symlinks are never followed, and a directory without a valid marker is left alone. The control
sockets of running hosts (``<parent>/<pid>.sock``) live in the same parent.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

ENV_PARENT = "QEMU_MKTME_RUNTIME_DIR"
MARKER = ".qemu-mktme-owner"
_MARKER_KIND = "qemu-mktme runtime directory"
_MAX_MARKER = 4096
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def process_start_time(pid: int) -> int | None:
    """Field 22 of ``/proc/PID/stat`` (clock ticks after boot); None when there is no such process."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[19])                      # fields[0] is field 3 (state)
    except (OSError, IndexError, ValueError):
        return None


def _refuse(path: Path, why: str) -> PermissionError:
    return PermissionError(f"runtime directory {path} {why}; remove it, or set {ENV_PARENT} to a private "
                           "directory")


def _ensure_private(path: Path) -> Path:
    created = False
    try:
        os.mkdir(path, 0o700)
        created = True
    except FileExistsError:
        pass
    except OSError as err:
        raise _refuse(path, f"cannot be created: {err.strerror}") from None
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError as err:
        if os.path.islink(path):
            raise _refuse(path, "is a symlink") from None
        raise _refuse(path, f"cannot be opened: {err.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.getuid():
            raise _refuse(path, f"is owned by uid {st.st_uid}, not by this user (uid {os.getuid()})")
        if created and stat.S_IMODE(st.st_mode) != 0o700:
            os.fchmod(fd, 0o700)                    # our fresh directory, narrowed by a umask
        elif stat.S_IMODE(st.st_mode) != 0o700:
            raise _refuse(path, f"has mode {stat.S_IMODE(st.st_mode):04o}, not 0700")
    finally:
        os.close(fd)
    return path


def private_parent() -> Path:
    """The parent of this user's runtime directories, created 0700 if missing (see the module)."""
    explicit = os.environ.get(ENV_PARENT)
    if explicit:
        return _ensure_private(Path(explicit))
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        try:
            st = os.stat(xdg)
            usable = stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and os.access(xdg, os.W_OK | os.X_OK)
        except OSError:
            usable = False
        if usable:
            return _ensure_private(Path(xdg) / "qemu-mktme")
    return _ensure_private(Path(tempfile.gettempdir()) / f"qemu-mktme-{os.getuid()}")


def safe_label(name: str, limit: int = 32) -> str:
    """``name`` reduced to ``[A-Za-z0-9_.-]``, not starting with ``.`` or ``-``: fit for a file name."""
    label = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:limit].lstrip(".-")
    return label or "vm"


def make_runtime_dir(name: str) -> Path:
    """A new private directory ``<parent>/<name>-<pid>-XXXX`` (0700) holding this process's marker.

    ``PermissionError`` when the parent is not private (see :func:`private_parent`).
    """
    parent = private_parent()
    path = Path(tempfile.mkdtemp(prefix=f"{safe_label(name)}-{os.getpid()}-", dir=parent))
    try:
        write_marker(path)
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)
        raise
    return path


def write_marker(directory: Path, pid: int | None = None) -> None:
    """Claim ``directory`` for process ``pid`` (default: this one); it must not hold a marker yet."""
    pid = os.getpid() if pid is None else pid
    start = process_start_time(pid)
    if start is None:
        raise ValueError(f"no process {pid} to own {directory}")
    body = json.dumps({"kind": _MARKER_KIND, "pid": pid, "start": start}).encode()
    dfd = os.open(directory, _DIR_FLAGS)
    try:
        fd = os.open(MARKER, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
        try:
            os.write(fd, body)
        finally:
            os.close(fd)
    finally:
        os.close(dfd)


def _owner(parent_fd: int, name: str) -> tuple[int, int] | None:
    """(pid, start) from the marker of directory ``name`` in the parent; None unless it is ours."""
    try:
        dfd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError:
        return None                                  # a symlink (ELOOP), a file, gone
    try:
        if os.fstat(dfd).st_uid != os.getuid():
            return None
        fd = os.open(MARKER, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dfd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_size > _MAX_MARKER:
                return None
            marker = json.loads(os.read(fd, _MAX_MARKER))
        finally:
            os.close(fd)
    except (OSError, ValueError):
        return None
    finally:
        os.close(dfd)
    if not isinstance(marker, dict) or marker.get("kind") != _MARKER_KIND:
        return None
    pid, start = marker.get("pid"), marker.get("start")
    if type(pid) is not int or type(start) is not int or pid <= 0:
        return None
    return pid, start


def owner_alive(pid: int, start: int) -> bool:
    return process_start_time(pid) == start


def sweep(parent: Path | None = None) -> int:
    """Remove the runtime directories in ``parent`` (default: :func:`private_parent`) whose marker
    is ours and whose owner is dead; how many. Everything else in the parent is left alone."""
    parent = private_parent() if parent is None else parent
    try:
        pfd = os.open(parent, _DIR_FLAGS)
    except OSError:
        return 0
    removed = 0
    try:
        with os.scandir(pfd) as entries:
            names = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
        for name in names:
            owner = _owner(pfd, name)
            if owner is None or owner_alive(*owner):
                continue
            try:
                if not stat.S_ISDIR(os.stat(name, dir_fd=pfd, follow_symlinks=False).st_mode):
                    continue
                shutil.rmtree(name, dir_fd=pfd)      # fd-based: never follows a symlink inside
                removed += 1
            except OSError:
                continue
    finally:
        os.close(pfd)
    return removed
