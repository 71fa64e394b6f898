"""What is measured is what runs, without QEMU: a real process started from a binary, checked
against its measurement (/proc/PID/exe), the binary replaced or rewritten; the digest cache
re-hashing what may have changed; sealed boot-file copies."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time

import pytest

from qemu_mktme.errors import TenantError
from qemu_mktme.qemu.boot import BootSpec
from qemu_mktme.attest import digests
from qemu_mktme.attest.measure import check_running, sealed_boot


def _settled_copy(src: str, dst) -> None:
    shutil.copy(src, dst)
    old = time.time() - 10                      # as if installed long ago (mtime; ctime is now)
    os.utime(dst, (old, old))


def _run(path):
    return subprocess.Popen([str(path), "30"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_the_running_binary_is_the_measured_one_or_the_launch_stops(tmp_path):
    binary = tmp_path / "sleep"
    _settled_copy(shutil.which("sleep"), binary)
    measured = digests.measure_file(binary)
    assert measured.digest == hashlib.sha256(binary.read_bytes()).digest()
    assert not measured.settled                 # its ctime is seconds old at most: not trusted by state
    proc = _run(binary)
    try:
        check_running(proc.pid, measured)       # same inode, same state, and hashed again: the same bytes
        with pytest.raises(OSError):            # ETXTBSY: what runs cannot be rewritten in place
            os.open(binary, os.O_WRONLY)
    finally:
        proc.kill()
        proc.wait()
    # replaced after it was hashed (another inode at the same path), then started
    replacement = tmp_path / "other"
    shutil.copy(shutil.which("sleep"), replacement)     # the same bytes even, but not the file hashed
    os.replace(replacement, binary)
    proc = _run(binary)
    try:
        with pytest.raises(TenantError, match=r"does not run the measured .*sleep: the file changed or was replaced"):
            check_running(proc.pid, measured)
    finally:
        proc.kill()
        proc.wait()
    with pytest.raises(TenantError, match=r"QEMU \(pid \d+\) is gone"):
        check_running(proc.pid, measured)


def test_the_digest_cache_rehashes_a_file_that_may_have_changed(tmp_path, monkeypatch):
    monkeypatch.setattr(digests, "RACY", 0.3)
    f = tmp_path / "blob"
    f.write_bytes(b"a" * 4096)
    fresh = digests.measure_file(f)
    assert not fresh.settled                    # changed just now: a write in the same tick would keep its times
    f.write_bytes(b"b" * 4096)                  # same size, maybe the same coarse timestamps
    assert digests.measure_file(f).digest == hashlib.sha256(b"b" * 4096).digest()
    time.sleep(digests.RACY + 0.1)              # settled: now kept by identity
    settled = digests.measure_file(f)
    assert settled.settled and digests.measure_file(f) == settled
    with open(f, "r+b") as w:                   # rewritten in place, same size: new ctime, hashed again
        w.write(b"c")
    assert digests.measure_file(f).digest == hashlib.sha256(b"c" + b"b" * 4095).digest()


def test_boot_files_go_to_qemu_as_sealed_copies_of_the_hashed_bytes(tmp_path):
    kernel, initrd = tmp_path / "kernel", tmp_path / "initrd"
    kernel.write_bytes(b"K" * 10000)
    initrd.write_bytes(b"I" * 5000)
    with sealed_boot(BootSpec(kernel, initrd, "console=ttyS0")) as sealed:
        assert sealed.digests == {kernel: hashlib.sha256(b"K" * 10000).digest(),
                                  initrd: hashlib.sha256(b"I" * 5000).digest()}
        assert str(sealed.boot.kernel).startswith("/dev/fd/") and sealed.boot.append == "console=ttyS0"
        kernel.write_bytes(b"X" * 10000)          # the file changes after hashing: QEMU loads the copy
        assert sealed.boot.kernel.read_bytes() == b"K" * 10000
        fd = os.open(sealed.boot.kernel, os.O_WRONLY)
        try:
            with pytest.raises(PermissionError):   # F_SEAL_WRITE
                os.write(fd, b"X")
        finally:
            os.close(fd)
        fds = list(sealed.fds)
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
