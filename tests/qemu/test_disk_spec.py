"""``--disk`` / :class:`DiskSpec`: the option's grammar, the format read from the file (never left
to QEMU's probing), and one clear line for files that cannot be disks. No QEMU here."""

from __future__ import annotations

import json
import os

import pytest

from qemu_mktme.qemu.devices import DiskSpec, disk_args
from qemu_mktme.qemu.machine import MachineConfig



@pytest.fixture
def raw(tmp_path):
    path = tmp_path / "d,isk.raw"               # a comma in the name: the JSON -blockdev carries it
    path.write_bytes(b"\0" * 4096)
    return path


def test_parse_defaults_and_options(raw, tmp_path):
    spec = DiskSpec(raw)
    assert (spec.format, spec.dma, spec.readonly) == ("raw", None, False)
    q = tmp_path / "q.img"
    q.write_bytes(b"QFI\xfb" + b"\0" * 100)
    assert DiskSpec.parse(str(q)).format == "qcow2"                  # from the header
    assert DiskSpec.parse(f"{q},format=raw,dma=qemu,readonly=on") == DiskSpec(q, "raw", "qemu", True)


@pytest.mark.parametrize("opts, words", [
    (",format=vmdk", "format must be"), (",dma=kvm", "dma must be"), (",readonly=yes", "readonly must be"),
    (",cache=unsafe", "cache must be"), (",aio=native", "unknown disk option"), (",format=qcow2,dma=vhost", "raw images only"), (",format=raw,format=raw", "given twice"), (",format=", "unknown"),
])
def test_parse_refuses(tmp_path, opts, words):
    with pytest.raises(ValueError, match=words):
        DiskSpec.parse(f"{tmp_path / 'x'}{opts}")


def test_check_refuses_what_cannot_be_a_disk(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    luks = tmp_path / "luks"
    luks.write_bytes(b"LUKS\xba\xbe" + b"\0" * 100)
    ro = tmp_path / "ro"
    ro.write_bytes(b"\0" * 512)
    ro.chmod(0o400)
    for path, words in [(tmp_path / "missing", "does not exist"), (fifo, "not a regular file"),
                        ("/dev/zero", "not a regular file"), (tmp_path, "not a regular file")]:
        with pytest.raises(ValueError, match=words):
            DiskSpec(path).check()
    with pytest.raises(ValueError, match="LUKS"):
        DiskSpec.parse(str(luks))                  # sniffing a FIFO did not block either
    assert DiskSpec.parse(str(fifo)).format == "raw"
    if os.geteuid() != 0:                          # root may write a 0400 file
        with pytest.raises(ValueError, match="writable"):
            DiskSpec(ro).check()
    DiskSpec(ro, readonly=True).check()


def test_blockdev_json_and_vhost_left_out(raw):
    args = disk_args((DiskSpec(raw, readonly=True), DiskSpec(raw, dma="vhost"), DiskSpec(raw, dma="qemu")))
    assert args[0] == "-blockdev" and args[2] == "-device" and len(args) == 8
    node = json.loads(args[1])
    assert node == {"driver": "raw", "node-name": "disk0", "read-only": True,
                    "file": {"driver": "file", "filename": str(raw), "read-only": True}}
    assert args[3].startswith("virtio-blk-pci,drive=disk0,") and "drive=disk2" in args[7]


def test_machine_config_takes_only_disk_specs(raw):
    assert MachineConfig(disks=[DiskSpec(raw)]).disks == (DiskSpec(raw),)
    with pytest.raises(ValueError, match="DiskSpec"):
        MachineConfig(disks=(str(raw),))


def test_cache_none_is_o_direct_for_qemu_and_our_backend(tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    spec = DiskSpec.parse(f"{disk},cache=none,dma=qemu")
    assert spec.cache == "none"
    node = json.loads(spec.blockdev("d0"))
    assert node["cache"] == {"direct": True} and node["file"]["cache"] == {"direct": True}
    assert "cache" not in json.loads(DiskSpec.parse(str(disk)).blockdev("d0"))
    with pytest.raises(ValueError, match="cache must be one of writeback, none"):
        DiskSpec.parse(f"{disk},cache=unsafe")
