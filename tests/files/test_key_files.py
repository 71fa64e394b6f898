"""The one bounded key-file reader (issue 10, items 5 and 6): regular files or an explicit
/dev/fd/N pipe, a size limit, a time limit, a permission warning, errors that name the file and
never its content. No QEMU here."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from qemu_mktme.keymaterial import MAX_KEY_FILE, KeyFileError, key_payload, load_kek, read_key_file
from qemu_mktme.keymaterial import xts_key as parse_key_spec


def private(path, data: bytes | str, mode: int = 0o600):
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    os.chmod(path, mode)
    return path


def test_a_regular_file_is_read(tmp_path):
    k = private(tmp_path / "k", "ab" * 16 + " " + "cd" * 16 + "\n")
    warnings = []
    assert read_key_file(k, warn=warnings.append).split() == ["ab" * 16, "cd" * 16]
    assert warnings == []
    link = tmp_path / "link"
    link.symlink_to(k)
    assert read_key_file(link, warn=warnings.append).split()[0] == "ab" * 16


def test_readable_by_others_warns_like_ssh(tmp_path):
    k = private(tmp_path / "k", "ab" * 32, 0o644)
    warnings = []
    read_key_file(k, warn=warnings.append)
    assert len(warnings) == 1 and f"{k} is readable by group and others (mode 0644)" in warnings[0]
    assert "ab" * 4 not in warnings[0]


@pytest.mark.parametrize("make, message", [
    (lambda p: os.mkfifo(p), "a FIFO, not a regular file (pass a key through a pipe as /dev/fd/N"),
    (lambda p: p.symlink_to("/dev/zero"), "a character device, not a regular file"),
    (lambda p: p.mkdir(), "a directory, not a regular file"),
    (lambda p: None, "No such file or directory"),
    (lambda p: private(p, b"\x00" * 32), "not a key file (binary data)"),
    (lambda p: private(p, os.urandom(32) + b"\xff"), "not a key file (binary data)"),
    (lambda p: private(p, "ab" * (MAX_KEY_FILE)), f"larger than {MAX_KEY_FILE} bytes"),
])
def test_what_is_not_a_key_file_is_refused_at_once(tmp_path, make, message):
    path = tmp_path / "key"
    make(path)
    started = time.monotonic()
    with pytest.raises(KeyFileError) as info:
        read_key_file(path)
    assert time.monotonic() - started < 2            # a FIFO with no writer must not block
    assert str(info.value).startswith(f"key file {path}: ") and message in str(info.value)


def test_dev_zero_itself_is_refused():
    with pytest.raises(KeyFileError, match="/dev/zero: a character device"):
        read_key_file("/dev/zero")


def test_a_pipe_given_as_dev_fd_is_read_with_a_time_limit():
    r, w = os.pipe()
    try:
        threading.Timer(0.2, lambda: (os.write(w, b"ab" * 32 + b"\n"), os.close(w))).start()
        assert read_key_file(f"/dev/fd/{r}").strip() == "ab" * 32
    finally:
        os.close(r)
    r, w = os.pipe()                                  # a writer that never finishes
    try:
        os.write(w, b"ab")
        started = time.monotonic()
        with pytest.raises(KeyFileError, match=r"no complete key within 0.3 s"):
            read_key_file(f"/proc/self/fd/{r}", timeout=0.3)
        assert time.monotonic() - started < 2
    finally:
        os.close(r)
        os.close(w)


def test_bash_process_substitution_reaches_the_reader():
    kek = os.urandom(32).hex()
    code = ("import sys; from qemu_mktme.keymaterial import read_key_file; "
            "from qemu_mktme.keymaterial import load_kek; print(load_kek(read_key_file(sys.argv[1])).hex())")
    out = subprocess.run(["bash", "-c", f'"$0" -c "$1" <(printf %s {kek})', sys.executable, code],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == kek


# ------------------------------------------------------------------------- KEK format (item 6)

_RANDOM = bytes(range(7, 71))                            # fixed: test ids must not change between runs (xdist)


@pytest.mark.parametrize("content, found", [
    (b" " * 32, "found nothing"),
    (b"\x00" * 32, None),                               # binary: the reader refuses it first
    (_RANDOM[:16].hex().encode(), "found 32 hex digits"),
    (_RANDOM[:32].hex().encode()[:-1], "found 1 word of text"),
    (b"00" * 32 + b"\n", "all zeros"),
    (_RANDOM[32:].hex().encode() + b" extra", "found 2 words of text"),
], ids=["spaces", "binary", "32-hex", "63-hex", "zeros", "two-words"])
def test_a_kek_is_exactly_64_hex_digits(tmp_path, content, found):
    path = private(tmp_path / "kek", content)
    with pytest.raises(ValueError) as info:
        load_kek(read_key_file(path), f"key-encryption key file {path}")
    assert str(path) in str(info.value)
    assert found is None or found in str(info.value)


def test_a_kek_with_whitespace_around_it_is_fine(tmp_path):
    kek = os.urandom(32)
    path = private(tmp_path / "kek", f"\n  {kek.hex().upper()}  \n\n")
    assert load_kek(read_key_file(path)) == kek


# ------------------------------------------------------------------------- user keys

def test_user_keys_refuse_zero_and_equal_keys(tmp_path):
    k = os.urandom(16).hex()
    for spec, message in ((f"user:{'00' * 16}:{k}", "key= is all zeros"),
                          (f"user:{k}:{'00' * 16}", "tweak= is all zeros"),
                          (f"user:{k}:{k}", "IEEE 1619")):
        with pytest.raises(ValueError, match=message) as info:
            key_payload(spec)
        assert k not in str(info.value)
    equal = private(tmp_path / "equal", f"{k} {k}\n")
    with pytest.raises(ValueError, match=f"key file {equal}: .*IEEE 1619") as info:
        key_payload(f"user:@{equal}")
    assert k not in str(info.value)


def test_every_key_file_reader_refuses_binary_with_the_file_named(tmp_path):
    binary = private(tmp_path / "k.bin", os.urandom(64) + b"\xff")
    for call in (lambda: key_payload(f"user:@{binary}"), lambda: parse_key_spec(f"@{binary}")):
        with pytest.raises(ValueError, match=f"key file {binary}: not a key file \\(binary data\\)"):
            call()
