"""Output files: whole or nothing, 0600, never overwriting what another writer put there."""

from __future__ import annotations

import os
import stat

import pytest

from qemu_mktme.errors import SnapshotError
from qemu_mktme.files.atomic import atomic_output


def test_a_file_that_appears_meanwhile_is_kept(tmp_path):
    target = tmp_path / "o"
    with pytest.raises(SnapshotError, match="exists already"):
        with atomic_output(target) as f:
            f.write(b"ours")
            target.write_bytes(b"theirs")              # another writer, after our first check
    assert target.read_bytes() == b"theirs" and list(tmp_path.iterdir()) == [target]


def test_failure_in_the_body_leaves_nothing_and_force_replaces(tmp_path):
    target = tmp_path / "o"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as f:
            f.write(b"half")
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"old")
    os.chmod(target, 0o644)
    with atomic_output(target, force=True) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o600
    with pytest.raises(SnapshotError, match="is a directory"):
        with atomic_output(tmp_path):
            pass
    with pytest.raises(SnapshotError, match="no directory"):
        with atomic_output(tmp_path / "missing" / "o"):
            pass
