"""``run --nvdimm`` on the command line, ``nvdimm show`` and ``nvdimm rekey``: thin over the library
(tests/files/test_nvdimm_media.py, tests/qemu/test_nvdimm_guest.py), checked as a user runs them."""

from __future__ import annotations

import json
import os
import re

import pytest

from helpers import qm


def test_show_rekey_and_bad_input(tmp_path):
    key = f"user:{os.urandom(16).hex()}:{os.urandom(16).hex()}"
    missing = qm("nvdimm", "show", str(tmp_path / "none.img"))
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "No such file" in missing.stderr
    (tmp_path / "raw.img").write_bytes(b"x" * 4096)
    raw = qm("nvdimm", "rekey", str(tmp_path / "raw.img"), "--key", key, "--to-hpa", "0x200000000")
    assert raw.returncode == 1 and "not a qemu-mktme NVDIMM media image" in raw.stderr
    assert (tmp_path / "raw.img").read_bytes() == b"x" * 4096
    bad = qm("nvdimm", "rekey", str(tmp_path / "raw.img"), "--key", key, "--to-hpa", "zz")
    assert bad.returncode == 2 and "not an address" in bad.stderr
    usage = qm("run", "--guest", "linux", "--nvdimm", "m.img,size=3M")
    assert usage.returncode == 2 and "multiple of 2 MiB" in usage.stderr
    nokey = qm("run", "--guest", "linux", "--key", "none", "--nvdimm", str(tmp_path / "m.img") + ",size=2M")
    assert nokey.returncode == 2 and "not with --key none" in nokey.stderr


@pytest.mark.qemu
def test_run_writes_then_show_and_rekey(linux_image, tmp_path):
    """One boot through the command line (the guest-side proof is tests/qemu/test_nvdimm_guest.py)."""
    key = f"user:{os.urandom(16).hex()}:{os.urandom(16).hex()}"
    media = tmp_path / "pm.img"
    first = qm("run", "--guest", "linux", "--memory", "512M", "--key", key, "--workload", "pmem", "--param", "mode=write",
               "--nvdimm", f"{media},size=16M,hpa=0x200000000", "--nvdimm-strict", "--no-input", timeout=120)
    assert first.returncode == 0, first.stderr
    assert re.search(r"pmem write pattern sha256=\w{64} secret sha256=\w{64}", first.stdout)
    shown = json.loads(qm("nvdimm", "show", str(media), "--json").stdout)
    assert (shown["size"], shown["hpa"], shown["reason"]) == (16 << 20, "0x200000000", "shutdown")
    assert shown["digests"].startswith("ok")
    assert qm("nvdimm", "rekey", str(media), "--key", key, "--to-hpa", "0x400000000").returncode == 0
    assert json.loads(qm("nvdimm", "show", str(media), "--json").stdout)["hpa"] == "0x400000000"
