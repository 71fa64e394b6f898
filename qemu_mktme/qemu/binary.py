"""Find the distribution's ``qemu-system-x86_64`` and learn what it is.

Everything here runs the real binary once and caches the answer: its version decides the TCG
plugin ABI (7.2/8.x speak version 1, 9.0+ version 2 and up) and KVM is used only when it works.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from ..errors import QemuNotFound

ENV_QEMU = "QEMU_MKTME_QEMU"
DEFAULT_NAME = "qemu-system-x86_64"
INSTALL_HINT = "install Debian's qemu-system-x86 (apt-get install qemu-system-x86) or set " + ENV_QEMU


@dataclass(frozen=True)
class QemuBinary:
    """A QEMU system emulator binary and its version."""

    path: Path
    version: tuple[int, int, int]
    banner: str

    @property
    def version_str(self) -> str:
        return ".".join(map(str, self.version))


def find_qemu(path: str | os.PathLike[str] | None = None) -> QemuBinary:
    """The QEMU binary to use: ``path``, else ``$QEMU_MKTME_QEMU``, else ``PATH``.

    Raises ``QemuNotFound`` naming what was tried when there is none or it does not run.
    """
    candidate = str(path) if path else os.environ.get(ENV_QEMU) or DEFAULT_NAME
    resolved = shutil.which(candidate)
    if resolved is None:
        raise QemuNotFound(f"{candidate}: not found ({INSTALL_HINT})")
    return _probe(os.path.realpath(resolved))


@functools.lru_cache(maxsize=8)
def _probe(path: str) -> QemuBinary:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except OSError as err:
        raise QemuNotFound(f"{path}: cannot run: {err.strerror} ({INSTALL_HINT})") from err
    except subprocess.TimeoutExpired as err:
        raise QemuNotFound(f"{path} --version did not answer within 30 s") from err
    match = re.search(r"QEMU emulator version (\d+)\.(\d+)(?:\.(\d+))?", out.stdout)
    if out.returncode != 0 or not match:
        tail = (out.stdout + out.stderr).strip()[-300:]
        raise QemuNotFound(f"{path} is not a QEMU system emulator (--version said: {tail!r})")
    version = (int(match[1]), int(match[2]), int(match[3] or 0))
    return QemuBinary(Path(path), version, out.stdout.splitlines()[0])


@functools.lru_cache(maxsize=8)
def kvm_works(path: str) -> bool:
    """True when this QEMU can really start a KVM guest here (nested KVM often cannot)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    try:
        out = subprocess.run(
            [path, "-machine", "none", "-accel", "kvm", "-nodefaults", "-no-user-config",
             "-display", "none", "-qmp", "stdio"],
            input='{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n',
            capture_output=True, text=True, timeout=30, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and '"return"' in out.stdout
