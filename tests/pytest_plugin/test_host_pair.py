"""The plugin's ``mktme_host_pair``: two running hosts a test migrates a VM between with
``await migrate_between(...)``, through the same control-socket protocol as two processes."""

from __future__ import annotations

import os

import pytest

from qemu_mktme.pytest_plugin import migrate_between
from qemu_mktme.qemu.machine import MachineConfig
from qemu_mktme.tenant.pki import create_pki

from helpers import patience
from reference import xts_lines

pytestmark = pytest.mark.qemu


async def test_a_tenant_key_goes_along_between_the_pair(mktme_host_pair, baremetal_image, tmp_path):
    a, b = mktme_host_pair
    key, tweak = os.urandom(16), os.urandom(16)
    vm = await a.start_vm(MachineConfig(boot=baremetal_image.boot(), memory="128M", name="pair"), "acme",
                          f"type=user key={key.hex()} tweak={tweak.hex()}")
    await vm.console.wait_for("mktme> ", patience(20))
    await vm.console.command("writehex 0x200000 0123456789abcdef0123456789abcdef", r"ok writehex .*\n")
    result = await migrate_between("pair", source=a.name, to=b.name, tls=create_pki(tmp_path / "pki", client_cn="t").directory)
    moved = b.machines["pair"]
    assert result.dest_keyid == moved.keyid and a.machines == {} and a.host.keys.keys() == []
    await moved.console.command("crc 0x200000 16", r"ok crc32 .*\n", patience(20))
    plain = moved.ram.read(0x200000, 64)
    assert plain[:16] == bytes.fromhex("0123456789abcdef0123456789abcdef")
    hpa = int(moved.guest.hpa_of(0x200000))
    assert moved.guest.dram(0x200000, 64) == xts_lines(key, tweak, hpa, plain)      # the same tenant key
