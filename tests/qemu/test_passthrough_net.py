"""``run ... -- QEMU-OPTIONS`` checked against the real QEMU's ``-help`` and the refusal list;
``--net user`` and a passed-through device reaching a real QEMU; a disk another QEMU holds."""

from __future__ import annotations

import re
import socket

import pytest
from helpers import patience, qm

from qemu_mktme.errors import QemuExited
from qemu_mktme.qemu.binary import find_qemu
from qemu_mktme.qemu.devices import DiskSpec, NetSpec
from qemu_mktme.qemu.machine import Machine, MachineConfig
from qemu_mktme.qemu.passthrough import REFUSED, check_passthrough, qemu_options

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def qemu():
    return str(find_qemu().path)


def test_qemu_help_is_read_with_each_options_argument(qemu):
    options = qemu_options(qemu)
    assert options["-device"] and options["-m"] and options["-machine"]
    assert not options["-S"] and not options["-no-reboot"] and not options["-snapshot"]
    assert set(REFUSED) - set(options) <= {"-run-with", "-runas", "-chroot"}   # names of another QEMU version


@pytest.mark.parametrize("argv, words", [
    (["-m", "2G"], "-m is refused: guest RAM is the emulated DRAM: use --memory"),
    (["-object", "memory-backend-ram,id=x,size=1G"], "a second one would not be emulated DRAM"),
    (["-machine", "memory-backend=x"], "-machine memory-backend=x is refused"),
    (["-M", "pc"], "-M pc is refused"), (["-machine", "q35,hpet=off"], "refused"),
    (["-accel", "kvm"], "use --accel"), (["-enable-kvm"], "use --accel"),
    (["-incoming", "defer"], "snapshot restore"), (["-S"], "use --paused"),
    (["-device", "pc-dimm,memdev=m"], "hot-pluggable memory"), (["-numa", "node"], "NUMA"),
    (["-device", "nvdimm,memdev=m"], "use --nvdimm PATH"),
    (["-chardev", "socket,id=console0,path=/x"], "ids qmp0 and console0"),
    (["-devic", "virtio-rng-pci"], "-devic is unknown to this QEMU"),
    (["-device"], "-device needs a value"), (["virtio-rng-pci"], "QEMU option expected after --"),
])
def test_refused_and_unknown_options(qemu, argv, words):
    with pytest.raises(ValueError, match=words) as err:
        check_passthrough(argv, qemu)
    assert "\n" not in str(err.value)


def test_accepted_options_pass_unchanged(qemu):
    argv = ["-device", "virtio-rng-pci", "--rtc", "base=utc", "-machine", "hpet=off", "-no-reboot"]
    assert check_passthrough(argv, qemu) == tuple(argv)


def test_command_line_refusals_are_usage_errors(baremetal_image):
    r = qm("run", "--guest", "baremetal", "--key", "none", "--no-input", "--", "-m", "1G")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "qemu-mktme: error: QEMU option -m is refused: guest RAM is the emulated DRAM: use --memory"]
    r = qm("query", "--", "-m", "1G")
    assert r.returncode == 2 and "-- QEMU-OPTIONS is only for 'run'" in r.stderr
    r = qm("run", "--net", "tap", "--no-input")
    assert r.returncode == 2 and "mode must be one of user" in r.stderr


async def test_user_net_hostfwd_and_a_passed_device_reach_qemu(baremetal_image, qemu):
    with socket.socket() as s:                          # a free port (the race with others is harmless:
        s.bind(("127.0.0.1", 0))                         # QEMU would fail and say so)
        port = s.getsockname()[1]
    config = MachineConfig(boot=baremetal_image.boot(), memory="64M", name="net",
                           nets=(NetSpec("user", (f"tcp:127.0.0.1:{port}-:7777",)),),
                           extra_args=check_passthrough(["-device", "virtio-rng-pci,id=rng0"], qemu))
    async with Machine(config) as vm:
        await vm.console.wait_for(r"mktme> ", patience(30))
        devices = [d for bus in await vm.qmp.execute("query-pci") for d in bus["devices"]]
        ids = {d.get("qdev_id"): (d["id"]["vendor"], d["id"]["device"]) for d in devices}
        assert ids["net0-dev"] == (0x1AF4, 0x1000) and ids["rng0"] == (0x1AF4, 0x1005)  # virtio-net, -rng
        usernet = await vm.qmp.hmp("info usernet")
        assert re.search(rf"TCP\[HOST_FORWARD\]\s+\d+\s+127\.0\.0\.1\s+{port}\s+10\.0\.2\.15\s+7777", usernet), usernet
        with socket.create_connection(("127.0.0.1", port), timeout=patience(5)):
            pass                                         # slirp listens on the host side


async def test_disk_held_by_another_qemu_is_one_line(baremetal_image, tmp_path):
    disk = tmp_path / "shared.raw"
    disk.write_bytes(b"\0" * (1 << 20))
    first = MachineConfig(boot=baremetal_image.boot(), memory="64M", name="holder", disks=(DiskSpec(disk, dma="qemu"),))
    async with Machine(first):
        second = Machine(MachineConfig(boot=baremetal_image.boot(), memory="64M", name="second",
                                       disks=(DiskSpec(disk, dma="qemu"),)))
        with pytest.raises(QemuExited) as err:
            await second.launch()
    first_line = str(err.value).splitlines()[0]                  # then "QEMU said:" and its stderr
    assert first_line.startswith(f"second: QEMU exited with status 1: disk {disk} is in use by another process "
                                 "(QEMU's image locking refused the write lock")
