"""images.machine_config: the one place a guest and its options become a MachineConfig (run, the
pytest plugin and the verifier build there)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qemu_mktme import images
from qemu_mktme.errors import ImageError
from qemu_mktme.qemu.devices import DiskSpec

pytestmark = pytest.mark.qemu          # needs the guest images in the cache


def test_an_image_by_name_with_its_defaults(baremetal_image):
    config = images.machine_config("baremetal", commands=["poweroff"], name="vm", start_paused=True)
    assert config.boot == baremetal_image.boot(commands=["poweroff"])
    assert config.memory == images.default_memory("baremetal") and config.name == "vm" and config.start_paused
    assert config.disks == () and config.extra_args == ()
    same = images.machine_config("baremetal", image=baremetal_image, commands=["poweroff"], name="vm",
                                 start_paused=True)
    assert same == config                                           # a loaded image: the same machine
    assert images.machine_config("baremetal", memory="96M").memory == 96 << 20


def test_options_that_cannot_work_together_are_refused(baremetal_image, tmp_path):
    with pytest.raises(ValueError, match="--initrd is for a kernel given as --guest PATH"):
        images.machine_config("baremetal", initrd=str(tmp_path / "initrd"))
    with pytest.raises(ValueError, match="takes --append, not a workload"):
        images.machine_config(str(baremetal_image.kernel), workload="hello")
    with pytest.raises(ImageError, match="neither an image"):
        images.machine_config(str(tmp_path / "no-such-kernel"))
    missing = DiskSpec(Path(tmp_path / "absent.img"))
    with pytest.raises(ValueError, match="absent.img does not exist"):
        images.machine_config("baremetal", disks=[missing])


def test_a_kernel_file_boots_as_given(baremetal_image):
    config = images.machine_config(str(baremetal_image.kernel), append="console=ttyS0", memory="64M")
    assert config.boot.kernel == Path(baremetal_image.kernel).resolve() and config.boot.append == "console=ttyS0"


def test_a_disk_booted_guest_gets_a_throwaway_overlay(debian_image, tmp_path):
    with pytest.raises(ValueError, match="the debian guest needs a root disk: give --disk FILE"):
        images.machine_config("debian", image=debian_image)
    config = images.machine_config("debian", image=debian_image, overlay_dir=tmp_path, name="d1")
    (disk,) = config.disks
    assert disk.path.parent == tmp_path and disk.path.name == "d1-overlay.qcow2" and disk.path.is_file()
    assert disk.format == "qcow2" and disk.dma == "qemu"
    assert debian_image.disk is not None and debian_image.disk.stat().st_size > disk.path.stat().st_size
