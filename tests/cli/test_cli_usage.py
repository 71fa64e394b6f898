"""Bad invocations fail with one clear line and exit 2 before anything starts (issue 10, items 5,
6, 8, 9). No QEMU: launching one, or reaching a running host, fails the test."""

from __future__ import annotations

import os

import pytest

from qemu_mktme import cli

from helpers import qm


@pytest.fixture
def files(tmp_path):
    def make(name: str, data: bytes | str, mode: int = 0o600) -> str:
        path = tmp_path / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
        os.chmod(path, mode)
        return str(path)
    return make


K, T = "0123456789abcdef" * 2, "fedcba9876543210" * 2


def cases(files):
    kb = files("k.bin", b"\x00\x01KEYCONTENT\xff" * 4)
    k32 = files("kek32", b" " * 32)
    return [
        (["run", "--guest", "linux", "--workload", "nosuch"], "no workload 'nosuch' (have: bits, checksum"),
        (["run", "--guest", "linux", "--param", "bogus=1"], "workload hello takes no parameter 'bogus'"),
        (["run", "--guest", "linux", "--workload", "checksum", "--param", "size_mb=-5"],
         "size_mb must be a positive whole number"),
        (["run", "--guest", "linux", "--workload", "counter", "--param", "period=soon"], "positive number of seconds"),
        (["run", "--initrd", "/etc/hostname"], "--initrd is for a kernel given as --guest PATH"),
        (["run", "--memory", "1M"], "the baremetal guest needs at least 4 MiB"),
        (["run", "--guest", "linux", "--memory", "128M"], "needs at least 512 MiB"),
        (["run", "--guest", "linux", "-c", "halt"], "takes a workload"),
        (["run", "-c", ""], "argument --command/-c: empty bare-metal command"),
        (["run", "-c", "   "], "empty bare-metal command"),
        (["run", "--name", "../x"], "argument --name: invalid VM name '../x'"),
        (["run", "--name=-x"], "invalid VM name"),
        (["run", "--vm", "name=a/b"], "invalid VM name 'a/b'"),
        (["run", "--vm", "name=a", "--vm", "name=a"], "VM name 'a' given twice"),
        (["run", "--keyid-bits", "0"], "KeyID bits must be 1..15"),
        (["run", "--key", f"user:@{kb}"], f"key file {kb}: not a key file (binary data)"),
        (["run", "--key", "user:@/dev/zero"], "key file /dev/zero: a character device, not a regular file"),
        (["run", "--key", f"user:{'00' * 16}:{T[:32]}"], "key= is all zeros"),
        (["run", "--key", f"user:{K}:{K}"], "IEEE 1619"),
        (["run", "--key", "user:00:11"], "must be 16 bytes"),
        (["run", "--key", "user:@/nonexistent/key"], "key file /nonexistent/key: No such file or directory"),
        (["run", "--key", "gpu"], "key spec must be"),
        (["snapshot", "restore", "x.snap", "--kek-file", "k", "--name", "../x"], "invalid VM name"),
        (["snapshot", "verify", "/nonexistent.snap", "--kek-file", kb], f"{kb}: not a key file (binary data)"),
        (["snapshot", "verify", "/nonexistent.snap", "--kek-file", k32],
         f"key-encryption key file {k32}: not a key-encryption key: expected 64 hex digits"),
        (["snapshot", "save", "/tmp/x.snap", "--kek-file", "/dev/zero"], "/dev/zero: a character device"),
        (["dump", "/nonexistent/d", "--vm", "a", "--vm", "a"], "--vm a given twice"),
        (["inspect", "/nonexistent", "entropy", "--threshold", "-1"], "threshold must be in (0, 8]"),
        (["inspect", "/nonexistent", "entropy", "--threshold", "99"], "threshold must be in (0, 8]"),
        (["run", "--disk", "/nonexistent.raw,dma=nope"], "disk dma must be one of qemu, vhost, got 'nope'"),
        (["run", "--disk", "/nonexistent.raw"], "disk /nonexistent.raw does not exist"),
        (["run", "--disk", "/dev/zero"], "disk /dev/zero is not a regular file or block device"),
    ]


def test_bad_invocations_exit_2_with_one_clear_line(files, no_qemu, capsys, baremetal_image, linux_image):
    secrets = (K, T, K[:16], "KEYCONTENT")
    for args, message in cases(files):
        try:
            code = cli.main(args)
        except SystemExit as exit_:                    # argparse's own usage errors
            code = exit_.code
        err = capsys.readouterr().err
        assert code == 2, (args, code, err)
        assert message in err, (args, err)
        last = err.strip().splitlines()[-1]
        assert last.startswith("qemu-mktme") and ": error: " in last, (args, err)
        assert "Traceback" not in err and not any(s in err for s in secrets), (args, err)


def test_a_usage_error_from_the_real_command_line(files):
    path = files("k.bin", os.urandom(40) + b"\xff")
    out = qm("run", "--key", f"user:@{path}")
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "not a key file (binary data)" in out.stderr


def test_a_world_readable_key_file_warns(files, no_qemu, capsys, baremetal_image):
    path = files("k", f"{K} {T}\n", 0o644)
    with pytest.raises(AssertionError, match="started something"):
        cli.main(["run", "--key", f"user:@{path}", "--no-input"])
    err = capsys.readouterr().err
    assert f"warning: key file {path} is readable by group and others (mode 0644)" in err and K not in err
