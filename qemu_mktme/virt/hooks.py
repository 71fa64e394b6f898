"""Install and remove the libvirt hook (:mod:`.hookscript`) in a libvirt configuration directory.

Only ``qemu-mktme libvirt hook install|remove`` writes into ``/etc/libvirt``, saying what it
writes; nothing else does (``run``, ``host --libvirt`` never do). The hook goes into
``hooks/qemu.d/`` (libvirt runs every script there, in order), so a hook of the user's own in
``hooks/qemu`` stays. libvirtd looks for hook scripts when it starts: restart it after installing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from . import hookscript

DEFAULT_ETC = Path("/etc/libvirt")
HOOK_NAME = "qemu-mktme"


def hook_path(etc: Path = DEFAULT_ETC) -> Path:
    return etc / "hooks" / "qemu.d" / HOOK_NAME


def hook_text(python: str | None = None) -> str:
    """The script: this Python running :mod:`.hookscript`'s source, isolated and without ``site``
    (``-IS``: it needs the standard library only, and libvirt runs it, and waits for it, on every
    operation of every domain: no site-packages scan, no editable-install finder, ~20 ms less each)."""
    source = Path(hookscript.__file__).read_text()
    return f"#!{python or sys.executable} -IS\n# {hookscript.MARKER}: written by 'qemu-mktme libvirt hook install'\n" + source


def install(etc: Path = DEFAULT_ETC, python: str | None = None) -> Path:
    """Write the hook (0755, atomically); its path."""
    path = hook_path(etc)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{HOOK_NAME}.tmp")
    tmp.write_text(hook_text(python))
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return path


def remove(etc: Path = DEFAULT_ETC) -> Path | None:
    """Remove the hook if it is ours (its marker line); the path removed, or None."""
    path = hook_path(etc)
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return None
    if hookscript.MARKER not in text.split("\n", 2)[1] if "\n" in text else True:
        raise FileExistsError(f"{path} was not written by qemu-mktme: left alone")
    path.unlink()
    return path
