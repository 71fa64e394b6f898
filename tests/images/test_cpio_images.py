"""Image building and verification, and the cpio writer the initramfs is made with."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess

import pytest

from qemu_mktme.errors import ImageError
from qemu_mktme import images
from qemu_mktme.images import cpio


def test_cpio_round_trip_and_cpio_tool_agree(tmp_path):
    entries = [cpio.directory("bin"), cpio.file("bin/tool", b"\x7fELF" + bytes(range(256)), 0o755),
               cpio.symlink("bin/sh", "tool"), cpio.file("init", b"#!/bin/sh\n", 0o755)]
    buf = io.BytesIO()
    cpio.write(buf, entries)
    data = buf.getvalue()
    assert cpio.read_member(io.BytesIO(data), "bin/tool") == b"\x7fELF" + bytes(range(256))
    with pytest.raises(KeyError):
        cpio.read_member(io.BytesIO(data), "missing")
    again = io.BytesIO()
    cpio.write(again, reversed(entries))
    assert again.getvalue() == data, "output must not depend on input order"
    if shutil.which("cpio"):
        listing = subprocess.run(["cpio", "-t", "--quiet"], input=data, capture_output=True, check=True)
        assert listing.stdout.decode().split() == ["bin", "bin/sh", "bin/tool", "init"]


def test_linux_image_is_stock_debian(linux_image):
    manifest = linux_image.manifest
    packages = {p["name"]: p for p in manifest["packages"]}
    assert "linux-image-cloud-amd64" in packages and "busybox-static" in packages
    for p in packages.values():
        assert p["sha256"] == p["index_sha256"], "the .deb must be the one apt's index names"
    stock = manifest["stock_files"]
    assert hashlib.sha256(linux_image.kernel.read_bytes()).hexdigest() == stock["vmlinuz"]["sha256"]
    busybox = images.read_stock_file(linux_image, "bin/busybox")
    assert hashlib.sha256(busybox).hexdigest() == stock["bin/busybox"]["sha256"]
    assert {"hello", "secret", "checksum", "counter"} <= set(linux_image.workloads)


def test_build_is_idempotent_and_fast_when_current(baremetal_image):
    before = baremetal_image.kernel.stat().st_mtime_ns
    again = images.build("baremetal")
    assert again.kernel.stat().st_mtime_ns == before


@pytest.fixture
def cache_copy(tmp_path, baremetal_image):
    shutil.copytree(baremetal_image.directory, tmp_path / "images" / "baremetal")
    return tmp_path


def test_missing_image_is_a_clear_error(tmp_path):
    with pytest.raises(ImageError, match=r"not built.*images build baremetal"):
        images.load("baremetal", cache=tmp_path)
    with pytest.raises(ImageError, match="unknown image 'windows'"):
        images.load("windows", cache=tmp_path)


def test_corrupt_image_is_detected(cache_copy):
    kernel = cache_copy / "images" / "baremetal" / "baremetal.bin"
    blob = bytearray(kernel.read_bytes())
    blob[100] ^= 1
    kernel.write_bytes(bytes(blob))
    with pytest.raises(ImageError, match="corrupt"):
        images.load("baremetal", cache=cache_copy)
    assert [s.state for s in images.status(cache=cache_copy) if s.name == "baremetal"] == ["corrupt"]
    images.build("baremetal", cache=cache_copy)   # a build repairs it
    images.load("baremetal", cache=cache_copy)


def test_future_manifest_format_is_refused(cache_copy):
    path = cache_copy / "images" / "baremetal" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(ImageError, match="format 99"):
        images.load("baremetal", cache=cache_copy)


def test_boot_spec_validation(baremetal_image, linux_image):
    spec = baremetal_image.boot(commands=["echo a", "crc 0x200000 16"])
    assert spec.append == "echo a;crc 0x200000 16"
    with pytest.raises(ValueError, match="must not contain ';'"):
        baremetal_image.boot(commands=["echo a;halt"])
    spec = linux_image.boot(workload="secret", params={"secret": "xyz"})
    assert "mktme.workload=secret mktme.secret=xyz" in spec.append and "memmap=" in spec.append
    with pytest.raises(ValueError, match="one word"):
        linux_image.boot(params={"secret": "two words"})


def test_each_recipe_knows_its_default_memory():
    assert images.default_memory("baremetal") == 512 << 20
    assert images.default_memory("linux") == 1 << 30
    assert images.default_memory("/boot/vmlinuz") == 512 << 20          # a kernel given by path
    assert images.default_memory_help() == "512M baremetal, 1G linux, 1G debian"
