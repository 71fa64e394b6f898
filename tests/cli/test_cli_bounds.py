"""Counts and sizes the platform model allocates for are bounded on the command line, written in
ASCII digits, finite and positive; a snapshot never replaces a FIFO, device or symlink (issue 22,
item 7). Each refusal: exit 2 (1 for the snapshot path), one line, nothing started."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from qemu_mktme import cli

from helpers import patience


def _main(args: list[str], capsys) -> tuple[int, str]:
    try:
        code = cli.main(args)
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["run", "--packages", "1000000000", "-c", "poweroff", "--no-input"], "CPU packages must be 1..64"),
    (["run", "--packages", "0"], "CPU packages must be 1..64"),
    (["run", "--cpus", "100000"], "vCPUs must be 1..288"),
    (["run", "--cpus", "１"], "vCPUs: not a whole number: '１'"),
    (["run", "--cpus", "1_0"], "not a whole number"),
    (["run", "-m", "１G"], "not a size: '１G'"),
    (["run", "-m", "٣G"], "not a size"),
    (["run", "-m", "2T"], "at most 1024 GiB"),
    (["run", "--keyid-bits", "６"], "KeyID bits: not a whole number"),
    (["run", "--iommu-keyid", "99999"], "KeyID must be 0..32767"),
    (["run", "--trace-interval", "0"], "trace interval must be more than 0"),
    (["run", "--trace-interval", "nan"], "trace interval: not a positive number of seconds: 'nan'"),
    (["run", "--trace-interval", "inf"], "not a positive number of seconds"),
    (["run", "--trace-interval", "-5"], "not a positive number of seconds"),
    (["run", "--trace-interval", "1e9"], "not a positive number of seconds"),
    (["run", "--trace-interval", "86400"], "at most 3600"),
    (["host", "start", "hb", "--tenant-server", "https://127.0.0.1:1", "--packages", "1000000000"],
     "CPU packages must be 1..64"),
    (["query", "--pid", "１２"], "process id: not a whole number"),
    (["tenant", "policy", "--host", "h", "--keyid-bits", "99"], "KeyID bits must be 1..15"),
])
def test_counts_are_bounded_before_anything_starts(args, message, no_qemu, capsys, baremetal_image):
    code, err = _main(args, capsys)
    assert code == 2, (args, code, err)
    assert message in err and "Traceback" not in err, (args, err)
    assert err.strip().splitlines()[-1].startswith("qemu-mktme"), err


def test_a_billion_packages_is_refused_at_once_by_the_real_command_line():
    """It hung (allocating a key table per package) and ignored SIGTERM."""
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "qemu_mktme.cli", "run", "--packages", "1000000000", "-c", "poweroff",
                          "--no-input"], capture_output=True, text=True, timeout=patience(10))
    assert out.returncode == 2 and "CPU packages must be 1..64" in out.stderr
    assert time.monotonic() - t0 < patience(10)


def test_the_library_bounds_what_it_allocates():
    from qemu_mktme.engine.platform import Platform
    from qemu_mktme.qemu.machine import MachineConfig
    with pytest.raises(ValueError, match="packages must be in 1..64"):
        Platform(packages=1_000_000_000)
    with pytest.raises(ValueError, match="cpus must be in 1..288"):
        MachineConfig(cpus=100_000)
    with pytest.raises(ValueError, match="not a size"):
        MachineConfig(memory="１G")
    with pytest.raises(ValueError, match="at most 1024 GiB"):
        MachineConfig(memory="2T")


@pytest.mark.parametrize("kind", ["fifo", "symlink", "socket"])
def test_snapshot_save_refuses_what_is_not_a_regular_file(kind, tmp_path, capsys, no_qemu):
    kek = tmp_path / "kek"
    kek.write_text(os.urandom(32).hex() + "\n")
    kek.chmod(0o600)
    target = tmp_path / "vm.snap"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "symlink":
        (tmp_path / "real").write_text("keep")
        target.symlink_to(tmp_path / "real")
    else:
        import socket
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(target))
        s.close()
    before = os.lstat(target)
    code, err = _main(["snapshot", "save", str(target), "--kek-file", str(kek)], capsys)
    assert code == 1 and err.count("\n") == 1, err
    expected = {"fifo": "is a FIFO, not a regular file: refusing to replace it",
                "symlink": "is a symbolic link", "socket": "is a socket, not a regular file"}[kind]
    assert expected in err, err
    after = os.lstat(target)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)          # untouched
