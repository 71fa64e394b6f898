"""A snapshot's KEK and target are checked the same way whatever the door (the control socket,
a library call): an all-zero KEK and a path that is a FIFO are refused before the VM pauses."""

from __future__ import annotations

import os

import pytest

from qemu_mktme.errors import SnapshotError
from qemu_mktme.live.session import HostSession, VmSpec
from qemu_mktme.qemu.machine import MachineConfig, VmState

from helpers import patience

pytestmark = pytest.mark.qemu


async def test_the_library_door_refuses_what_the_socket_refuses(baremetal_image, tmp_path):
    key = f"type=user key={os.urandom(16).hex()} tweak={os.urandom(16).hex()}"
    config = MachineConfig(boot=baremetal_image.boot(), memory="64M", name="doors")
    async with HostSession([VmSpec(config, "t", key)], keyid_bits=4, control=False) as session:
        vm = session.machines["doors"]
        await vm.console.wait_for("mktme> ", patience(20))
        with pytest.raises(ValueError, match="all zeros"):
            await session.save("doors", str(tmp_path / "z.snap"), bytes(32))
        fifo = tmp_path / "f.snap"
        os.mkfifo(fifo)
        with pytest.raises(SnapshotError, match="is a FIFO, not a regular file: refusing to replace it"):
            await session.save("doors", str(fifo), os.urandom(32))
        assert vm.state is VmState.RUNNING and os.path.exists(fifo) and not (tmp_path / "z.snap").exists()
        saved = await session.save("doors", str(tmp_path / "ok.snap"), os.urandom(32))
        assert saved.path == str(tmp_path / "ok.snap") and vm.state is VmState.RUNNING
