"""The controller against the real distro QEMU: boots, RAM both ways, attach, and every failure."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import tempfile
import time
import zlib
from pathlib import Path

import pytest

from qemu_mktme.errors import (AddressError, AttachError, ConsoleTimeout, ImageError, LaunchError,
                               QemuError, QemuExited, QemuNotFound)
from qemu_mktme import images
from qemu_mktme.qemu.machine import Machine, MachineConfig, VmState

from helpers import eventually, patience

CRC = re.compile(r"ok crc32 (0x[0-9a-f]+) (\d+) 0x([0-9a-f]{8})")


def bm(image, *commands, **config) -> Machine:
    return Machine(MachineConfig(boot=image.boot(commands=list(commands)), **config))


async def test_guest_writes_secret_python_reads_it(baremetal_image):
    secret = "MKTME-SECRET-0123456789"
    async with bm(baremetal_image, f"write 0x200000 {secret}") as vm:
        await vm.console.wait_for(r"ok write 0x200000 23", patience(10))
        assert vm.ram.read(0x200000, len(secret)) == secret.encode()
        assert vm.ram.read(0x200000 + len(secret), 8) == bytes(8)
        assert bytes(vm.ram.view(0x200000, 4)) == b"MKTM"


async def test_python_writes_guest_checksums(baremetal_image):
    data = os.urandom(64 << 10)
    async with bm(baremetal_image) as vm:
        await vm.console.wait_for("mktme> ", patience(10))
        vm.ram.write(0x300000, data)
        match = await vm.console.command(f"crc 0x300000 {len(data)}", CRC, patience(30))
        assert int(match[3], 16) == zlib.crc32(data)


async def test_ram_above_4g_is_mapped_and_shared(baremetal_image):
    async with bm(baremetal_image, memory="5G") as vm:
        assert [r.gpa for r in vm.ram.ranges][-1] == 0x1_0000_0000
        await vm.console.wait_for("mktme> ", patience(10))
        high = 0x1_2345_6000
        vm.ram.write(high, b"above four gig")
        match = await vm.console.command(f"crc {high:#x} 14", CRC)
        assert int(match[3], 16) == zlib.crc32(b"above four gig")
        # and the other way: the guest fills, Python reads at the offset QEMU's layout says
        await vm.console.command(f"fill {high + 0x1000:#x} 4096 0x5a 8", "ok fill")
        assert vm.ram.read(high + 0x1000, 4096) == b"\x5a" * 4096
        assert vm.ram.offset_of(high) == high - 0x1_0000_0000 + 0x8000_0000


async def test_out_of_range_gpa_is_a_clear_error(baremetal_image):
    async with bm(baremetal_image, memory="512M") as vm:
        with pytest.raises(AddressError, match="not guest RAM"):
            vm.ram.read(0x2000_0000, 16)
        with pytest.raises(AddressError, match="runs past the end"):
            vm.ram.read(0x1FFF_FFF0, 32)
        with pytest.raises(AddressError):
            vm.ram.write(0xFEC0_0000, b"ioapic")          # MMIO, not RAM
        with pytest.raises(ValueError):
            vm.ram.read(0x1000, -1)


async def test_stop_cont_and_events(baremetal_image):
    async with bm(baremetal_image, "ticks 0 200000") as vm:
        await vm.console.wait_for(r"tick 3\n", patience(10))
        with vm.qmp.listen("STOP", "RESUME") as events:
            await vm.pause()
            assert (await asyncio.wait_for(anext(events), patience(5)))["event"] == "STOP"
            assert vm.state is VmState.PAUSED
            frozen = vm.console.transcript.count("tick")
            await asyncio.sleep(0.3)
            assert vm.console.transcript.count("tick") == frozen
            await vm.resume()
            assert (await asyncio.wait_for(anext(events), patience(5)))["event"] == "RESUME"
        await vm.console.wait_for(rf"tick {frozen + 2}\n", patience(10))


async def test_control_needs_a_launched_machine(baremetal_image):
    vm = bm(baremetal_image)
    for control in (vm.pause, vm.resume, vm.quit):
        with pytest.raises(QemuError, match=rf"{control.__name__}\(\) needs the machine .* it is idle"):
            await control()
    assert vm.state is VmState.IDLE
    async with vm:
        await vm.pause()
        await vm.pause()                                   # stop and cont are idempotent, as in QMP
        assert vm.state is VmState.PAUSED
        await vm.resume()
        assert vm.state is VmState.RUNNING
        with pytest.raises(AttributeError):
            vm.state = VmState.PAUSED                      # type: ignore[misc]  # one writer: _set_state
    with pytest.raises(QemuError, match=r"pause\(\) needs the machine running or paused, it is exited"):
        await vm.pause()


async def test_guest_poweroff_ends_qemu(baremetal_image):
    async with bm(baremetal_image, "echo bye", "poweroff") as vm:
        assert await vm.wait(patience(10)) == 0
        assert "ok echo bye" in vm.console.transcript


async def test_linux_boots_and_runs_workload(linux_image):
    n = 4 << 20
    boot = linux_image.boot(workload="checksum", params={"size_mb": 4})
    async with Machine(MachineConfig(boot=boot, memory="1G")) as vm:
        await vm.console.wait_for(r"mktme-linux: boot kernel=6\.\S+-cloud-amd64 busybox=v1\.", patience(60))
        match = await vm.console.wait_for(r"mktme-linux: checksum bytes=(\d+) sha256=(\w{64})\n", patience(120))
        line = b"qemu-mktme checksum workload: the quick brown fox jumps over the lazy dog 0123456789\n"
        expected = (line * (n // len(line) + 1))[:n]
        assert int(match[1]) == n and match[2] == hashlib.sha256(expected).hexdigest()
        await vm.console.wait_for(r"workload checksum exit=0", patience(30))
        assert await vm.wait(patience(30)) == 0


async def test_linux_devmem_secret_is_in_guestram(linux_image):
    secret = "LINUX-DEVMEM-SECRET-42"
    boot = linux_image.boot(workload="secret", params={"secret": secret})
    async with Machine(MachineConfig(boot=boot, memory="1G")) as vm:
        match = await vm.console.wait_for(r"secret at (0x[0-9a-f]+) len=(\d+)", patience(120))
        gpa = int(match[1], 16)
        assert gpa == images.LINUX_RESERVED_GPA
        assert vm.ram.read(gpa, len(secret)) == secret.encode()
        await vm.console.wait_for("waiting for host", patience(10))
        vm.ram.write(gpa, b"X" * len(secret))                      # the host changes it
        await vm.console.write("go\n")
        match = await vm.console.wait_for(r"secret-region sha256=(\w{64})\n", patience(30))
        assert match[1] == hashlib.sha256(b"X" * len(secret)).hexdigest()


def _start_foreign_qemu(tmp_path: Path, baremetal_image, backend: str) -> tuple[subprocess.Popen, Path]:
    """A QEMU started by someone else (not by Machine), as a user would start it by hand."""
    qmp = tmp_path / "foreign-qmp.sock"
    mem = 256 << 20
    if backend == "file":
        ram = tmp_path / "qemu-mktme-foreign.ram"
        obj = f"memory-backend-file,id=pc.ram,size={mem},share=on,mem-path={ram}"
    else:
        obj = f"memory-backend-memfd,id=pc.ram,size={mem},share=on"
    argv = ["qemu-system-x86_64", "-nodefaults", "-display", "none", "-machine", "q35,memory-backend=pc.ram",
            "-m", "256M", "-object", obj, "-qmp", f"unix:{qmp},server=on,wait=off",
            "-kernel", str(baremetal_image.kernel), "-append", "write 0x280000 attached-secret;halt"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + patience(5)
    while not qmp.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    return proc, qmp


@pytest.mark.parametrize("backend", ["memfd", "file"])
async def test_attach_to_running_qemu(tmp_path, baremetal_image, backend):
    proc, qmp = _start_foreign_qemu(tmp_path, baremetal_image, backend)
    try:
        vm = await Machine.attach(qmp)
        try:
            await eventually(lambda: vm.ram.read(0x280000, 15) == b"attached-secret")
            assert vm.ram.backend_id == "pc.ram"
            assert (await vm.qmp.execute("query-status"))["running"]
        finally:
            await vm.close()
        assert proc.poll() is None, "closing an attached machine must not kill it"
    finally:
        proc.kill()
        proc.wait()


async def test_attach_errors(tmp_path):
    with pytest.raises(AttachError, match="cannot connect"):
        await Machine.attach(tmp_path / "nothing.sock")
    dead = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(dead))
    s.close()                                  # the file exists, nobody listens
    with pytest.raises(AttachError, match="refused"):
        await Machine.attach(dead)


async def test_missing_qemu_binary(baremetal_image):
    with pytest.raises(QemuNotFound, match="qemu-system-nonexistent: not found.*apt-get install qemu-system-x86"):
        await bm(baremetal_image, qemu="qemu-system-nonexistent").launch()


async def test_qemu_exiting_during_startup_reports_stderr(baremetal_image):
    vm = bm(baremetal_image, extra_args=("-device", "no-such-device"))
    with pytest.raises(QemuExited) as info:
        await vm.launch()
    assert "no-such-device" in info.value.stderr_tail and info.value.returncode == 1
    assert "no-such-device" in str(info.value)
    assert vm.runtime_dir is None and vm.returncode is not None


async def test_missing_or_corrupt_boot_file(tmp_path, baremetal_image):
    with pytest.raises(LaunchError, match="does not exist"):
        await Machine(MachineConfig(boot=images.BootSpec(tmp_path / "gone"))).launch()
    junk = bytearray(os.urandom(4096))
    # QEMU boots any file as an old zImage whose setup sectors (byte 0x1f1) fit in it: random
    # bytes passed for a kernel 1 run in 32 (and the QEMU outlived the test). Its count past the file:
    junk[0x1F1] = 0xFF
    (tmp_path / "junk.bin").write_bytes(junk)
    vm = Machine(MachineConfig(boot=images.BootSpec(tmp_path / "junk.bin")))
    try:
        with pytest.raises(QemuExited, match="status 1") as info:
            await vm.launch()
    finally:
        await vm.close()                      # a QEMU that took it anyway goes with the failed test
    assert "linux kernel" in info.value.stderr_tail.lower() or "kernel" in info.value.stderr_tail
    with pytest.raises(ImageError):
        images.guest_boot(str(tmp_path / "nope"))


async def test_console_timeout_keeps_transcript(baremetal_image):
    async with bm(baremetal_image, "echo something else") as vm:
        with pytest.raises(ConsoleTimeout) as info:
            await vm.console.wait_for("never printed", timeout=0.5)
        assert "ok echo something else" in info.value.transcript_tail
        assert "never printed" in str(info.value)


async def test_waiting_on_a_dead_guest_says_qemu_exited(baremetal_image):
    async with bm(baremetal_image, "poweroff") as vm:
        with pytest.raises(QemuExited, match="exited with status 0"):
            await vm.console.wait_for("never printed", timeout=patience(30))


async def test_file_backend_is_private_and_removed(baremetal_image):
    async with bm(baremetal_image, ram_backend="file") as vm:
        path = vm.ram.backend_path
        assert path.parent == Path("/dev/shm")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(vm.runtime_dir.stat().st_mode) == 0o700
    assert not path.exists()


def _gone(pid: int) -> bool:
    """The process is gone or a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def test_cancellation_during_launch_leaves_nothing(baremetal_image):
    cancelled = 0
    for delay in (0.0, 0.005, 0.02, 0.04, 0.06, 0.08):
        vm = bm(baremetal_image)
        task = asyncio.create_task(vm.launch())
        await asyncio.sleep(delay)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            cancelled += 1
        else:
            await vm.close()                    # launch won the race; close it as a user would
        assert vm.runtime_dir is None, f"runtime dir left after cancel at {delay}s"
        if vm.pid is not None:
            await eventually(lambda vm=vm: _gone(vm.pid), 1, f"QEMU gone after cancel at {delay}s")
    assert cancelled >= 3, "the test must really cancel launches midway"


async def test_cancellation_inside_context_tears_down(baremetal_image):
    pids = []

    async def user():
        async with bm(baremetal_image) as vm:
            pids.append(vm.pid)
            await asyncio.sleep(3600)

    task = asyncio.create_task(user())
    while not pids:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: _gone(pids[0]), 1, "QEMU gone after the cancel")


async def test_exception_inside_context_tears_down(baremetal_image):
    with pytest.raises(RuntimeError):
        async with bm(baremetal_image) as vm:
            rundir = vm.runtime_dir
            raise RuntimeError("user code failed")
    assert not rundir.exists() and vm.returncode is not None


async def test_launch_sweeps_only_its_own_dead_runtime_dirs(baremetal_image):
    """Issue 10: a launch once deleted a user's /tmp/qemu-mktme-backup-20240115-final/. Look-alikes
    next to the real runtime parent survive; a dead owner's marked directory in it does not."""
    from qemu_mktme.files import runtime
    dead = subprocess.Popen(["true"])
    dead.wait()
    parent = runtime.private_parent()
    lookalikes = [Path(tempfile.gettempdir()) / f"qemu-mktme-backup-{dead.pid}-final{os.urandom(3).hex()}",
                  parent.parent / f"qemu-mktme-dump-{dead.pid}-monday{os.urandom(3).hex()}"]
    stale = parent / f"vm-{dead.pid}-stale{os.urandom(3).hex()}"
    try:
        for d in lookalikes:
            d.mkdir()
            (d / "vm.snap").write_bytes(b"user data")
        stale.mkdir(mode=0o700)
        (stale / runtime.MARKER).write_text(json.dumps({"kind": "qemu-mktme runtime directory",
                                                        "pid": dead.pid, "start": 1}))
        async with bm(baremetal_image) as vm:
            assert vm.runtime_dir.parent == parent
            assert (vm.runtime_dir / runtime.MARKER).exists()
        for d in lookalikes:
            assert (d / "vm.snap").read_bytes() == b"user data", d
        assert not stale.exists()
    finally:
        for d in [*lookalikes, stale]:
            shutil.rmtree(d, ignore_errors=True)