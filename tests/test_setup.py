"""Setup decides from /etc/os-release, not from an assumed Debian 12: scripts/setup-host.sh and
``images build qemu10`` (qemu_mktme.images.backports) read the same file and agree."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from qemu_mktme.errors import ImageError
from qemu_mktme.images import backports

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "setup-host.sh"
BOOKWORM = '''PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
HOME_URL="https://www.debian.org/"
'''
TRIXIE = '''PRETTY_NAME="Debian GNU/Linux 13 (trixie)"
NAME="Debian GNU/Linux"
VERSION_ID="13"
VERSION="13 (trixie)"
VERSION_CODENAME=trixie
DEBIAN_VERSION_FULL=13.1
ID=debian
HOME_URL="https://www.debian.org/"
'''
SID = 'PRETTY_NAME="Debian GNU/Linux forky/sid"\nNAME="Debian GNU/Linux"\nVERSION_CODENAME=forky\nID=debian\n'
UBUNTU = 'PRETTY_NAME="Ubuntu 24.04 LTS"\nID=ubuntu\nID_LIKE=debian\nVERSION_ID="24.04"\nVERSION_CODENAME=noble\n'


def _plan(tmp_path: Path, text: str) -> str:
    release = tmp_path / "os-release"
    release.write_text(text)
    out = subprocess.run(["sh", str(SCRIPT), "--plan"], env={**os.environ, "QEMU_MKTME_OS_RELEASE": str(release)},
                         capture_output=True, text=True, timeout=30, check=True)
    return out.stdout


@pytest.mark.parametrize("text, source, said", [
    (BOOKWORM, backports.BACKPORTS, "debian 12 (bookworm): QEMU 10 is bookworm-backports"),
    (TRIXIE, backports.SYSTEM, "debian 13 (trixie): QEMU 10 is the system QEMU (Debian 13 ships 10.x; no backports)"),
    (SID, backports.SYSTEM, "QEMU 10 is the system QEMU"),
], ids=["bookworm", "trixie", "sid"])
def test_the_script_and_images_build_qemu10_decide_alike(tmp_path, text, source, said):
    release = tmp_path / "os-release"
    release.write_text(text)
    assert backports.qemu10_source(backports.os_release(release)) == source
    assert said in _plan(tmp_path, text)


def test_elsewhere_qemu10_is_not_debians(tmp_path):
    with pytest.raises(ImageError, match="this is Ubuntu 24.04 LTS"):
        backports.qemu10_source(backports.os_release(tmp_path / "missing") or {"PRETTY_NAME": "Ubuntu 24.04 LTS"})
    assert "QEMU 10 is not Debian's on ubuntu" in _plan(tmp_path, UBUNTU)


@pytest.mark.qemu                       # asks the system QEMU its version
def test_on_trixie_qemu10_is_the_system_qemu_and_nothing_is_downloaded(tmp_path, monkeypatch):
    """No apt, no cache entry: the system binary, once it is 10.x; with Debian 12's 7.2 a clear refusal."""
    (tmp_path / "t").write_text(TRIXIE)
    trixie = backports.os_release(tmp_path / "t")
    monkeypatch.setattr(backports, "_unpack", lambda *a: pytest.fail("nothing is unpacked on Debian 13"))
    try:
        path = backports.fetch("qemu10", cache=tmp_path / "cache", system=trixie)
    except ImageError as err:                     # this machine is Debian 12: its QEMU is 7.2
        assert "this Debian ships QEMU 10, but the system has QEMU 7." in str(err)
    else:
        assert path.name == "qemu-system-x86_64" and not (tmp_path / "cache").exists()
    assert not (tmp_path / "cache").exists()
