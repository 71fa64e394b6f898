"""Output files: whole or nothing, 0600, never overwriting what another writer put there."""

from __future__ import annotations

import os
import stat

import pytest

from qemu_mktme.errors import SnapshotError
from qemu_mktme.files.atomic import atomic_directory, atomic_output, holds_only
from qemu_mktme.files.runtime import process_start_time


def test_a_file_that_appears_meanwhile_is_kept(tmp_path):
    target = tmp_path / "o"
    with pytest.raises(SnapshotError, match="exists already"), atomic_output(target) as f:
        f.write(b"ours")
        target.write_bytes(b"theirs")              # another writer, after our first check
    assert target.read_bytes() == b"theirs" and list(tmp_path.iterdir()) == [target]


def test_failure_in_the_body_leaves_nothing_and_force_replaces(tmp_path):
    target = tmp_path / "o"
    with pytest.raises(RuntimeError), atomic_output(target) as f:
        f.write(b"half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"old")
    os.chmod(target, 0o644)
    with atomic_output(target, force=True) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o600
    with pytest.raises(SnapshotError, match="is a directory"), atomic_output(tmp_path):
        pass
    with pytest.raises(SnapshotError, match="no directory"), atomic_output(tmp_path / "missing" / "o"):
        pass


def test_a_directory_appears_whole_and_is_never_replaced(tmp_path):
    target = tmp_path / "d"
    with pytest.raises(RuntimeError), atomic_directory(target, what="dump") as partial:
        (partial / "a").write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with atomic_directory(target, what="dump") as partial:
        (partial / "a").write_bytes(b"whole")
    assert (target / "a").read_bytes() == b"whole" and stat.S_IMODE(target.stat().st_mode) == 0o700
    with pytest.raises(SnapshotError, match="exists already; dumps never overwrite"), \
            atomic_directory(target, what="dump"):
        pass
    other = tmp_path / "e"
    with pytest.raises(SnapshotError, match="exists already; dumps never overwrite"), \
            atomic_directory(other, what="dump"):
        other.mkdir()                                  # another writer, after our first check
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "e"]


def test_temporaries_of_a_killed_writer_are_removed(tmp_path):
    target = tmp_path / "o"
    dead = tmp_path / ".o.partial-999999999"           # no such PID
    dead.write_bytes(b"left by kill -9")
    with atomic_output(target) as f:
        f.write(b"new")
    assert list(tmp_path.iterdir()) == [target]


def test_a_dead_writers_directory_of_another_name_goes_only_when_its_members_prove_it(tmp_path):
    """A dump killed mid-write leaves ``.d1.partial-PID-START/``; the next dump into the directory
    removes it when it holds only a dump's members, and leaves anything else alone."""
    ours = tmp_path / ".d1.partial-999999999-5"
    ours.mkdir()
    (ours / "dram.bin").write_bytes(b"\0" * 64)
    theirs = tmp_path / ".d2.partial-999999999-5"
    theirs.mkdir()
    (theirs / "dram.bin").write_bytes(b"x")
    (theirs / "notes.txt").write_text("the user's")
    alive = tmp_path / f".d3.partial-{os.getpid()}-{process_start_time(os.getpid())}"
    alive.mkdir()
    with atomic_directory(tmp_path / "d4", what="dump", proof=holds_only(["dram.bin", "manifest.json"])) as d:
        (d / "dram.bin").write_bytes(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([theirs.name, alive.name, "d4"])
