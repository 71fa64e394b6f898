"""QEMU 10 beside the system's 7.2: Debian's ``bookworm-backports`` packages, unpacked into the cache.

Which Debian this is decides (:func:`qemu10_source`, from ``/etc/os-release``, as
``scripts/setup-host.sh`` decides): Debian 12 (bookworm) ships QEMU 7.2, and ``qemu10`` is the
backport below; Debian 13 (trixie) and later ship 10.x, and ``qemu10`` is the system's own QEMU
(nothing is downloaded: bookworm-backports does not apply there).

Nothing is installed: a private apt configuration (its own sources list naming only the
backports suite, its own lists, an empty dpkg status so the installed 7.2 does not hide the
backport) runs ``apt-get update`` and ``apt-get download``; ``dpkg-deb -x`` unpacks the .debs
into ``$QEMU_MKTME_CACHE/qemu/<name>/root``. A two-line wrapper ``qemu-system-x86_64`` execs the
unpacked binary with ``-L`` at the unpacked firmware (QEMU's compiled-in data directory is the
system's 7.2 one); with ``exec`` the process is QEMU itself (its pid, its ``/proc/PID/exe``). The
libraries it links come from bookworm (the backport is built against them). The manifest
records each package's version and sha256; loading re-checks the binary's hash.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ImageError, QemuError
from ..files.cache import cache_root
from ..qemu.binary import find_qemu
from .catalog import locked, staged_entry
from .tools import Say, run_tool, sha256_file


@dataclass(frozen=True)
class QemuRelease:
    """A QEMU from another Debian suite: the sources line and the packages to unpack."""

    name: str
    sources: str
    packages: tuple[str, ...]
    description: str


RELEASES = {r.name: r for r in [
    QemuRelease("qemu10", "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
                "http://deb.debian.org/debian bookworm-backports main",
                ("qemu-system-x86", "qemu-system-data", "seabios"),
                "QEMU 10 from Debian bookworm-backports, unpacked beside the system QEMU"),
]}
WRAPPER = "qemu-system-x86_64"
OS_RELEASE = Path("/etc/os-release")
BACKPORTS, SYSTEM = "bookworm-backports", "system"
"""Where ``qemu10`` comes from (:func:`qemu10_source`)."""


def os_release(path: Path = OS_RELEASE) -> dict[str, str]:
    """The fields of an os-release file (``ID``, ``VERSION_ID``, ``VERSION_CODENAME``, ...); empty if none."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() and not key.lstrip().startswith("#"):
            fields[key.strip()] = value.strip().strip("'\"")
    return fields


def qemu10_source(release: dict[str, str]) -> str:
    """:data:`BACKPORTS` on Debian 12, :data:`SYSTEM` on Debian 13 and later (its QEMU is 10.x);
    ``ImageError`` elsewhere. The same rule as ``scripts/setup-host.sh --plan``."""
    ident, codename, version = release.get("ID", ""), release.get("VERSION_CODENAME", ""), release.get("VERSION_ID", "")
    if ident == "debian":
        if codename == "bookworm" or version == "12":
            return BACKPORTS
        major = version.split(".")[0]
        if (major.isdigit() and int(major) >= 13) or (not major and codename not in ("", "bullseye", "buster")):
            return SYSTEM                          # trixie, forky, sid (no VERSION_ID): QEMU 10 or later
    name = release.get("PRETTY_NAME") or ident or "an unknown system (no /etc/os-release)"
    raise ImageError(f"qemu10 is Debian's: QEMU 10 from bookworm-backports on Debian 12, the system's on Debian 13; "
                     f"this is {name}", image="qemu10")


def system_qemu10() -> Path:
    """The system's own QEMU when it is 10.x or later (Debian 13); ``ImageError`` otherwise."""
    path = shutil.which(WRAPPER, path="/usr/bin:/usr/local/bin") or shutil.which(WRAPPER)
    try:
        qemu = find_qemu(path) if path else None
    except QemuError as err:
        raise ImageError(f"qemu10: the system QEMU does not run: {err}", image="qemu10") from None
    if qemu is None or qemu.version < (10, 0, 0):
        found = f"QEMU {qemu.version_str}" if qemu else "no qemu-system-x86_64"
        raise ImageError(f"qemu10: this Debian ships QEMU 10, but the system has {found} "
                         "(run scripts/setup-host.sh)", image="qemu10")
    return qemu.path


def _apt_options(apt: Path) -> list[str]:
    return ["-o", f"Dir::Etc::SourceList={apt / 'sources.list'}", "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={apt / 'lists'}", "-o", f"Dir::State::status={apt / 'status'}",
            "-o", f"Dir::Cache={apt / 'cache'}", "-o", "Debug::NoLocking=1"]


def qemu_path(name: str = "qemu10", *, cache: Path | None = None, system: dict[str, str] | None = None) -> Path:
    """The wrapper of an unpacked release, checked against its manifest (on Debian 13: the system
    QEMU); ``ImageError`` if not built. ``system``: os-release fields (default: this machine's)."""
    if name not in RELEASES:
        raise ImageError(f"unknown QEMU release {name!r} (known: {', '.join(RELEASES)})", image=name)
    if qemu10_source(os_release() if system is None else system) == SYSTEM:
        return system_qemu10()
    directory = (cache or cache_root()) / "qemu" / name
    hint = f"(run 'qemu-mktme images build {name}')"
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        raise ImageError(f"{name} is not unpacked in {directory} {hint}", image=name) from None
    binary = directory / str(manifest["binary"])
    if not binary.is_file() or sha256_file(binary) != manifest["binary_sha256"]:
        raise ImageError(f"{name}: {binary} is missing or does not match its manifest {hint}", image=name)
    return directory / WRAPPER


def fetch(name: str = "qemu10", *, cache: Path | None = None, force: bool = False,
          progress: Say | None = None, system: dict[str, str] | None = None) -> Path:
    """Download and unpack ``name`` unless it is there; the wrapper's path (on Debian 13, where
    the system QEMU is 10.x, that QEMU: nothing to download)."""
    if name not in RELEASES:
        raise ImageError(f"unknown QEMU release {name!r} (known: {', '.join(RELEASES)})", image=name)
    if qemu10_source(os_release() if system is None else system) == SYSTEM:
        if progress:
            progress("the system QEMU is 10.x (Debian 13 or later): bookworm-backports does not apply")
        return system_qemu10()
    release = RELEASES[name]
    root = cache or cache_root()
    say = progress or (lambda _m: None)
    with locked(root):
        if not force:
            try:
                return qemu_path(name, cache=root)
            except ImageError:
                pass
        with staged_entry(root / "qemu", name) as work:
            manifest = _unpack(release, work, say)
            (work / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return qemu_path(name, cache=root)


def _unpack(release: QemuRelease, work: Path, say: Say) -> dict[str, object]:
    apt = work / "apt"
    for sub in ("lists/partial", "cache/archives/partial", "debs"):
        (apt / sub).mkdir(parents=True)
    (apt / "sources.list").write_text(release.sources + "\n")
    (apt / "status").write_text("")
    opts = _apt_options(apt)
    say(f"apt-get update ({release.sources.split('] ', 1)[-1]})")
    run_tool(["apt-get", *opts, "-q", "update"], image=release.name, what="read the package lists")
    packages = []
    debs = apt / "debs"
    os.chmod(debs, 0o777)                     # apt's _apt sandbox user downloads into it
    for package in release.packages:
        show = run_tool(["apt-cache", *opts, "show", "--no-all-versions", package], image=release.name)
        fields = dict(re.findall(r"^(Version|SHA256|Filename): (.+)$", show, re.M))
        if "Version" not in fields:
            raise ImageError(f"{package} is not in {release.sources}", image=release.name)
        say(f"apt-get download {package}={fields['Version']}")
        run_tool(["apt-get", *opts, "-q", "download", f"{package}={fields['Version']}"], cwd=debs,
                 image=release.name, what="download packages")
        deb = debs / os.path.basename(fields["Filename"])
        if not deb.is_file():
            got = sorted(debs.glob(f"{package}_*.deb"))
            if len(got) != 1:
                raise ImageError(f"apt-get download {package} left no single .deb", image=release.name)
            deb = got[0]
        digest = sha256_file(deb)
        if digest != fields.get("SHA256"):
            raise ImageError(f"{deb.name}: sha256 {digest} differs from the index's {fields.get('SHA256')}",
                             image=release.name)
        run_tool(["dpkg-deb", "-x", str(deb), str(work / "root")], image=release.name, what="unpack packages")
        packages.append({"name": package, "version": fields["Version"], "sha256": digest})
    shutil.rmtree(apt)
    binary = Path("root/usr/bin/qemu-system-x86_64")
    if not (work / binary).is_file():
        raise ImageError(f"{release.packages[0]} has no usr/bin/qemu-system-x86_64", image=release.name)
    firmware = [p for p in ("root/usr/share/qemu", "root/usr/share/seabios") if (work / p).is_dir()]
    wrapper = work / WRAPPER
    quoted = " ".join(f"-L '{work.parent / release.name / p}'" for p in firmware)
    wrapper.write_text(f"#!/bin/sh\n# {release.description}: the unpacked binary with its own firmware\n"
                       f"exec '{work.parent / release.name / binary}' {quoted} \"$@\"\n")
    os.chmod(wrapper, 0o755)
    version = run_tool([str(work / binary), "--version"], image=release.name).splitlines()[0]
    say(version)
    return {"name": release.name, "description": release.description, "sources": release.sources,
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "packages": packages,
            "binary": str(binary), "binary_sha256": sha256_file(work / binary), "version": version}
