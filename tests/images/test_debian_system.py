"""The Debian system guest: stock packages recorded with their versions, an ext4 qcow2 root disk,
and a real boot from it (kernel, initramfs, root on /dev/vda, systemd). The boot to the login
prompt takes minutes under TCG: the suite boots to systemd's first line, ``make verify`` (the
``debian-boot`` workload) all the way, logged in and powered off."""

from __future__ import annotations

import re
import subprocess

import pytest
from helpers import patience

from qemu_mktme import images
from qemu_mktme.qemu.machine import Machine, MachineConfig


def test_manifest_names_every_package_and_the_disk(debian_image):
    m = debian_image.manifest
    packages = {p["name"]: p["version"] for p in m["packages"]}
    assert len(packages) > 80 and {"systemd", "systemd-sysv", "udev", "dpkg", "linux-image-cloud-amd64"} <= set(packages)
    assert f"linux-image-{m['kernel_release']}" in packages
    assert all(re.fullmatch(r"[\w.+:~-]+", v) for v in packages.values())
    assert debian_image.disk == debian_image.directory / "rootfs.qcow2"
    assert debian_image.disk.read_bytes()[:4] == b"QFI\xfb" and "rootfs.qcow2" in m["artifacts"]
    info = subprocess.run(["qemu-img", "info", "--output=json", str(debian_image.disk)], capture_output=True,
                          text=True, check=True).stdout
    assert '"virtual-size": 2147483648' in info
    assert "root=/dev/vda" in m["append"] and m["suite"] == "bookworm"


def test_overlay_leaves_the_image_untouched(debian_image, tmp_path):
    disk = images.overlay_disk(debian_image, tmp_path, name="vm1")
    assert disk.format == "qcow2" and disk.dma == "qemu" and disk.path.parent == tmp_path
    assert oct(disk.path.stat().st_mode & 0o777) == "0o600"
    info = subprocess.run(["qemu-img", "info", "--output=json", str(disk.path)], capture_output=True, text=True,
                          check=True).stdout
    assert str(debian_image.disk) in info                         # its backing file


async def test_boots_from_its_disk_to_systemd(debian_image, tmp_path):
    """Kernel and initramfs from the image, root from the virtio disk: systemd reads the system's
    os-release (on the disk only; the initramfs has no systemd) and says so."""
    disk = images.overlay_disk(debian_image, tmp_path)
    boot = debian_image.boot(append="systemd.show_status=1")     # the first status line, then stop
    async with Machine(MachineConfig(boot=boot, memory="1G", disks=(disk,), name="debian")) as vm:
        await vm.console.wait_for(r"Welcome to .*Debian GNU/Linux 12 \(bookworm\)", patience(180))
        assert "Kernel panic" not in vm.console.transcript


def test_workloads_and_refusals(debian_image):
    boot = debian_image.boot(workload="hello")
    assert boot.append.endswith("mktme.workload=hello") and "root=/dev/vda" in boot.append
    assert boot.kernel == debian_image.kernel and boot.initrd == debian_image.directory / "initrd.img"
    assert "mktme.workload" not in debian_image.boot().append            # no workload: the login prompt
    with pytest.raises(ValueError, match="has no workload 'shell'"):
        debian_image.boot(workload="shell")
    with pytest.raises(ValueError, match="takes a workload .* not commands or params"):
        debian_image.boot(params={"size_mb": 1})
