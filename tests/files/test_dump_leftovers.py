"""``dump X --vm a --vm a`` once wrote 128 MiB to X, then said "VM named twice" and left X behind
(issue 10, item 8): a dump is validated before anything is written. No QEMU."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from qemu_mktme.files.dumpfile import write_dump
from qemu_mktme.live.session import HostSession


def test_a_vm_named_twice_writes_nothing(tmp_path):
    target = tmp_path / "X"
    session = HostSession([], control=False)
    with pytest.raises(ValueError, match="VM 'a' named twice"):
        asyncio.run(session.dump(target, ["a", "a"]))
    guest = SimpleNamespace(name="a")
    with pytest.raises(ValueError, match="a VM is named twice"):
        write_dump([guest, guest], target)
    assert list(tmp_path.iterdir()) == []
