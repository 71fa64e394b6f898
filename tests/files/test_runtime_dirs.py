"""Runtime directories: one private parent, a marker in each, and a sweep that removes only what
it can prove the tool made for a dead process (issue 10, item 1). No QEMU here."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from qemu_mktme.files import runtime


@pytest.fixture
def parent(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "rt"
    monkeypatch.setenv(runtime.ENV_PARENT, str(path))
    return path


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def claim(directory: Path, pid: int, start: int) -> Path:
    directory.mkdir()
    (directory / runtime.MARKER).write_text(json.dumps({"kind": "qemu-mktme runtime directory",
                                                        "pid": pid, "start": start}))
    return directory


def test_runtime_dir_is_private_and_marked(parent):
    d = runtime.make_runtime_dir("../x y")
    assert d.parent == parent and d.name.startswith(f"_x_y-{os.getpid()}-")
    assert stat.S_IMODE(parent.stat().st_mode) == 0o700 and stat.S_IMODE(d.stat().st_mode) == 0o700
    marker = json.loads((d / runtime.MARKER).read_text())
    assert marker["pid"] == os.getpid() and marker["start"] == runtime.process_start_time(os.getpid())
    assert runtime.sweep() == 0 and d.exists()          # our own, alive


def test_sweep_removes_only_proven_dead_owners(parent, tmp_path):
    parent.mkdir(mode=0o700)
    me, my_start = os.getpid(), runtime.process_start_time(os.getpid())
    dead = claim(parent / "vm-dead", dead_pid(), 12345)
    reused = claim(parent / "vm-reused", me, my_start + 1)            # our pid, another process's start
    alive = claim(parent / "vm-alive", me, my_start)
    unmarked = parent / "vm-123-abcd"                                   # looks like ours, no marker
    unmarked.mkdir()
    (unmarked / "keep").write_text("user data")
    bad_marker = parent / "vm-bad"
    bad_marker.mkdir()
    (bad_marker / runtime.MARKER).write_text("not json")
    victim = tmp_path / "victim"                                        # a symlink to a marked dead dir
    claim(victim, dead_pid(), 1)
    (victim / "data").write_text("must survive")
    (parent / "link").symlink_to(victim)
    marker_link = parent / "vm-marker-link"                             # the marker itself a symlink
    marker_link.mkdir()
    (marker_link / runtime.MARKER).symlink_to(victim / runtime.MARKER)
    assert runtime.sweep() == 2
    assert not dead.exists() and not reused.exists()
    assert alive.exists() and (unmarked / "keep").exists() and bad_marker.exists() and marker_link.exists()
    assert (parent / "link").is_symlink() and (victim / "data").read_text() == "must survive"


def test_a_users_look_alikes_outside_the_parent_survive(parent, tmp_path, monkeypatch):
    """The probe's victims: names the old sweep matched, next to (not in) the parent."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv(runtime.ENV_PARENT)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    backup = tmp_path / "qemu-mktme-backup-20240115-final"
    backup.mkdir()
    (backup / "vm.snap").write_bytes(b"precious")
    dump = tmp_path / f"qemu-mktme-dump-{dead_pid()}-monday"
    dump.mkdir()
    (dump / "manifest.json").write_text("{}")
    d = runtime.make_runtime_dir("vm")
    assert d.parent == tmp_path / f"qemu-mktme-{os.getuid()}"
    runtime.sweep()
    assert (backup / "vm.snap").read_bytes() == b"precious" and (dump / "manifest.json").exists()


@pytest.mark.parametrize("spoil, message", [
    (lambda p: p.symlink_to(p.parent / "elsewhere", target_is_directory=True), "is a symlink"),
    (lambda p: p.mkdir(mode=0o755), "has mode 0755, not 0700"),
    (lambda p: p.write_text("a file"), "cannot be opened"),
])
def test_a_parent_that_is_not_private_is_refused(parent, spoil, message):
    (parent.parent / "elsewhere").mkdir(mode=0o700)
    spoil(parent)
    if parent.is_dir() and not parent.is_symlink():
        os.chmod(parent, 0o755)
    with pytest.raises(PermissionError, match=message):
        runtime.make_runtime_dir("vm")
    assert list((parent.parent / "elsewhere").iterdir()) == []


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to chown")
def test_a_parent_owned_by_someone_else_is_refused(parent):
    parent.mkdir(mode=0o700)
    os.chown(parent, 65534, 65534)
    with pytest.raises(PermissionError, match="owned by uid 65534"):
        runtime.private_parent()


def test_xdg_runtime_dir_is_used_when_usable(tmp_path, monkeypatch):
    monkeypatch.delenv(runtime.ENV_PARENT, raising=False)
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    assert runtime.private_parent() == xdg / "qemu-mktme"


def test_process_start_time():
    assert runtime.process_start_time(os.getpid()) == runtime.process_start_time(os.getpid()) is not None
    assert runtime.process_start_time(dead_pid()) is None
