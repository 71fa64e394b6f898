"""Stock Debian packages for the Linux image: ``apt-get download`` of the version apt's index
names, the .deb checked against the index's sha256, and single files read out of it with
``dpkg-deb`` (nothing unpacked, nothing modified)."""

from __future__ import annotations

import os
import re
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ImageError
from .tools import Say, run_tool, sha256_file


@dataclass
class DebPackage:
    """A .deb fetched with ``apt-get download``; ``index_sha256`` is what apt's index says."""

    name: str
    version: str
    sha256: str
    index_sha256: str
    path: Path | None = field(default=None)


def apt_download(package: str, dest: Path, progress: Say) -> DebPackage:
    show = run_tool(["apt-cache", "show", "--no-all-versions", package], image="linux", what="look up packages")
    fields = dict(re.findall(r"^(Version|SHA256|Filename): (.+)$", show, re.M))
    if "Version" not in fields:
        raise ImageError(f"apt knows no package {package} (run 'apt-get update' as root)", image="linux")
    version = fields["Version"]
    deb = dest / os.path.basename(fields.get("Filename", f"{package}_{version}_amd64.deb"))
    if not deb.exists() or sha256_file(deb) != fields.get("SHA256"):
        progress(f"apt-get download {package}={version}")
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            os.chmod(tmp, 0o755)  # apt's _apt sandbox user must be able to write here
            run_tool(["apt-get", "download", "-q", f"{package}={version}"], cwd=Path(tmp), image="linux",
                 what="download packages")
            got = list(Path(tmp).glob("*.deb"))
            if len(got) != 1:
                raise ImageError(f"apt-get download {package} gave {len(got)} files", image="linux")
            os.replace(got[0], deb)
    digest = sha256_file(deb)
    if fields.get("SHA256") and digest != fields["SHA256"]:
        raise ImageError(f"{deb.name}: sha256 {digest} differs from apt's index {fields['SHA256']}",
                         image="linux")
    return DebPackage(package, version, digest, fields.get("SHA256", ""), deb)


def deb_field(deb: Path | None, name: str) -> str:
    assert deb is not None
    return run_tool(["dpkg-deb", "-f", str(deb), name], image="linux", what="read packages").strip()


def deb_member(deb: Path | None, member: str, *, image: str) -> bytes:
    """One file out of a .deb's data archive, without unpacking the rest."""
    return deb_members(deb, [member], image=image)[member]


def deb_members(deb: Path | None, members: list[str], *, image: str) -> dict[str, bytes]:
    """Several files out of a .deb's data archive in one pass over it."""
    assert deb is not None
    wanted, found = set(members), {}
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for info in tar:
                if info.name in wanted and info.isfile():
                    extracted = tar.extractfile(info)
                    assert extracted is not None
                    found[info.name] = extracted.read()
                    if len(found) == len(wanted):
                        return found
    finally:
        proc.kill()
        proc.wait()
    missing = sorted(wanted - set(found))
    raise ImageError(f"{deb.name} has no {missing[0]}", image=image)
