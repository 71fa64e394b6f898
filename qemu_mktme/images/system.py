"""A full Debian system on a disk, from stock packages: ``mmdebstrap`` (Debian's own bootstrapper,
run as root it chroots; otherwise in a user namespace) installs a minimal bookworm with systemd
and the cloud kernel into a directory, ``mke2fs -d`` turns the directory into an ext4 file system
(no loop device, no mount), and ``qemu-img convert`` makes the qcow2 the guest boots from. The
kernel and initramfs are copied out of the tree for QEMU's direct kernel boot with
``root=/dev/vda``; every installed package's version is read from the tree's dpkg status.
Nothing here is written by hand that these tools do.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from ..errors import ImageError
from .tools import Say, run_tool

SUITE = "bookworm"
MIRRORS = (
    f"deb http://deb.debian.org/debian {SUITE} main",
    f"deb http://deb.debian.org/debian {SUITE}-updates main",
    f"deb http://deb.debian.org/debian-security {SUITE}-security main",
)
INCLUDE = ("systemd-sysv", "udev", "linux-image-cloud-amd64", "initramfs-tools")
EXCLUDE_PATHS = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*")
"""Documentation is not installed (dpkg's path-exclude): it is a third of minbase and no guest reads it."""
FS_SIZE = "2G"
"""The ext4 file system's size; sparse in the qcow2 (which holds only what is used)."""


def bootstrap(root: Path, hook: Path, *, image: str, progress: Say) -> str:
    """Install the system into ``root`` (which must not exist); mmdebstrap's version line."""
    mmdebstrap = shutil.which("mmdebstrap")
    if mmdebstrap is None:
        raise ImageError("mmdebstrap not found: needed to build the Debian system image "
                         "(apt-get install mmdebstrap, or run scripts/setup-host.sh)", image=image)
    version = run_tool([mmdebstrap, "--version"], image=image).strip()
    progress(f"{version}: installing {SUITE} minbase + {', '.join(INCLUDE)} (downloads ~100 MB, a few minutes)")
    argv = [mmdebstrap, "--variant=minbase", f"--include={','.join(INCLUDE)}",
            *(f"--dpkgopt=path-exclude={p}" for p in EXCLUDE_PATHS),
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            f"--customize-hook={hook} \"$1\"", SUITE, str(root), *MIRRORS]
    run_tool(argv, image=image, what="bootstrap")
    return version


def installed_packages(root: Path) -> list[dict[str, str]]:
    """``[{"name", "version", "architecture"}]`` of every package dpkg installed in ``root``."""
    status = (root / "var/lib/dpkg/status").read_text()
    out = []
    for stanza in status.split("\n\n"):
        fields = dict(re.findall(r"^(Package|Version|Architecture|Status): (.+)$", stanza, re.M))
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            out.append({"name": fields["Package"], "version": fields.get("Version", ""),
                        "architecture": fields.get("Architecture", "")})
    return sorted(out, key=lambda p: p["name"])


def kernel_files(root: Path, *, image: str) -> tuple[str, Path, Path]:
    """(release, vmlinuz, initrd) of the one kernel installed in ``root``."""
    kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise ImageError(f"expected one kernel in {root / 'boot'}, found {len(kernels)}", image=image)
    release = kernels[0].name.removeprefix("vmlinuz-")
    initrd = root / "boot" / f"initrd.img-{release}"
    if not initrd.is_file():
        raise ImageError(f"{initrd} missing: initramfs-tools did not run", image=image)
    return release, kernels[0], initrd


def make_disk(root: Path, raw: Path, qcow2: Path, *, image: str, progress: Say) -> None:
    """ext4 of ``root`` (``mke2fs -d``) into ``raw``, then ``qcow2`` of it; ``raw`` is removed."""
    progress(f"mke2fs -t ext4 -d: {FS_SIZE} file system")
    run_tool(["mke2fs", "-q", "-t", "ext4", "-L", "debian", "-d", str(root), str(raw), FS_SIZE],
             image=image, what="make the file system")
    progress("qemu-img convert -O qcow2")
    run_tool(["qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow2)], image=image, what="make the qcow2")
    os.unlink(raw)


def create_overlay(base: Path, overlay: Path) -> Path:
    """A new qcow2 ``overlay`` whose backing file is ``base``: the guest writes go to the overlay,
    the image in the cache stays as built (its manifest's hash keeps matching)."""
    try:
        out = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
                              str(overlay)], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ImageError("qemu-img not found: needed for the Debian guest's overlay disk "
                         "(apt-get install qemu-utils)", image="debian") from None
    if out.returncode != 0:
        raise ImageError(f"qemu-img create {overlay}: {out.stderr.strip()}", image="debian")
    os.chmod(overlay, 0o600)
    return overlay
