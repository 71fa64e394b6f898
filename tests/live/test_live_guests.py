"""MKTME around running QEMU guests: DRAM views, KeyID isolation and sharing, foreign writes."""

from __future__ import annotations

import os
import re
import zlib

import pytest

from qemu_mktme.host.host import Host
from qemu_mktme.live.encrypted import EncryptedMachine
from qemu_mktme.qemu.machine import MachineConfig
from qemu_mktme.pytest_plugin import assert_not_in_dram, find_in_dram

from helpers import patience
from reference import user_payload, xts_lines

CRC = re.compile(r"ok crc32 \S+ \d+ 0x([0-9a-f]{8})\n")


def bm(image, name, *commands, memory="512M"):
    return MachineConfig(boot=image.boot(commands=list(commands)), memory=memory, name=name)


async def test_secret_is_plaintext_in_ram_and_ciphertext_in_dram(baremetal_image):
    host = Host(keyid_bits=6)
    key, tweak = os.urandom(16), os.urandom(16)
    serial = host.keys.add("vm1", user_payload(key, tweak), tenant="acme")
    secret = "MKTME-DRAM-SECRET-" + os.urandom(6).hex()
    cfg = bm(baremetal_image, "vm1", f"write 0x200000 {secret}")
    async with EncryptedMachine(host, cfg, key_serial=serial, tenant="acme") as vm:
        await vm.console.wait_for(r"ok write 0x200000", patience(10))
        assert vm.ram.read(0x200000, len(secret)) == secret.encode()
        line = vm.ram.read(0x200000, 64)
        hpa = vm.guest.hpa_of(0x200000)
        assert vm.guest.translate(0x200000) == (hpa, vm.keyid)
        assert vm.guest.dram(0x200000, 64) == xts_lines(key, tweak, hpa, line)
        await vm.pause()
        allocated = os.stat(vm.ram.backend_path).st_blocks
        assert_not_in_dram(vm, secret)
        assert find_in_dram(vm, secret.encode()[:12]) is None
        assert os.stat(vm.ram.backend_path).st_blocks == allocated, "a DRAM scan must not allocate guest RAM"
        q = vm.query()
        assert q["keyid"] == vm.keyid and q["key-type"] == "user" and q["consistent"]
        assert int(q["vmm-hva"], 16) != 0x7F00_0000_0000               # QEMU's real mapping was found
    assert host.guests == {} and host.keys.describe(serial)["users"] == []


async def test_linux_guest_secret_not_in_dram(linux_image):
    host = Host(keyid_bits=6)
    serial = host.keys.add("linux", "type=cpu", tenant="acme")
    secret = "LINUX-MKTME-" + os.urandom(8).hex()
    boot = linux_image.boot(workload="secret", params={"secret": secret})
    async with EncryptedMachine(host, MachineConfig(boot=boot, memory="1G", name="linux"),
                                key_serial=serial, tenant="acme") as vm:
        m = await vm.console.wait_for(r"secret at (0x[0-9a-f]+) len", patience(120))
        await vm.console.wait_for("waiting for host", patience(30))
        assert vm.ram.read(int(m[1], 16), len(secret)) == secret.encode()
        await vm.pause()
        assert vm.guest.read(int(m[1], 16), len(secret)) == secret.encode()
        assert_not_in_dram(vm, secret)
        await vm.resume()
        await vm.console.write("go\n")
        await vm.console.wait_for(r"secret-region sha256=\w{64}\n", patience(30))


async def test_two_vms_keys_isolation_sharing_and_teardown(baremetal_image):
    host = Host(keyid_bits=6)
    k_a = host.keys.add("a", user_payload(os.urandom(16), os.urandom(16)), tenant="acme")
    shared = user_payload(os.urandom(16), os.urandom(16))
    k_b = host.keys.add("b", shared, tenant="globex")
    k_c = host.keys.add("c", shared, tenant="globex")                   # same tenant, same key
    free = host.keyids.free_count
    cfgs = [bm(baremetal_image, n, f"write 0x200000 secret-of-{n}", memory="256M") for n in "abc"]
    async with EncryptedMachine(host, cfgs[0], key_serial=k_a, tenant="acme") as a, \
            EncryptedMachine(host, cfgs[1], key_serial=k_b, tenant="globex") as b, \
            EncryptedMachine(host, cfgs[2], key_serial=k_c, tenant="globex") as c:
        for vm in (a, b, c):
            await vm.console.wait_for("ok write", patience(10))
        assert a.keyid != b.keyid and b.keyid == c.keyid
        plain = a.ram.read(0x200000, 64)
        assert a.guest.read(0x200000, 64) == plain
        assert a.guest.read(0x200000, 64, keyid=b.keyid) != plain       # A's line through B's KeyID
        assert b"secret-of-a" not in a.guest.read(0x200000, 64, keyid=b.keyid)
        q = host.query()
        assert {row["keyid"]: sorted(row["users"]) for row in q["keyids"]}[b.keyid] == ["vm:b", "vm:c"]
        assert set(q["guests"]) == {"a", "b", "c"}
    for serial, tenant in ((k_a, "acme"), (k_b, "globex"), (k_c, "globex")):
        host.keys.revoke(serial, tenant=tenant)
    assert host.keyids.free_count == free + 2 and host.keys.table() == []


@pytest.mark.parametrize("through", ["foreign", "own"])
async def test_host_write_through_keyid_changes_what_guest_reads(baremetal_image, through):
    host = Host(keyid_bits=6)
    serial = host.keys.add("vm", "type=cpu", tenant="acme")
    other = host.keys.add("other", "type=cpu", tenant="globex")
    data = os.urandom(4096)
    async with EncryptedMachine(host, bm(baremetal_image, "vm"), key_serial=serial, tenant="acme") as vm:
        await vm.console.wait_for("mktme> ", patience(10))
        keyid = host.keys.describe(other)["keyid"] if through == "foreign" else vm.keyid
        vm.guest.write(0x300000, data, keyid=keyid)
        m = await vm.console.command("crc 0x300000 4096", CRC)
        assert (int(m[1], 16) == zlib.crc32(data)) == (through == "own")
        if through == "foreign":
            assert vm.ram.read(0x300000, 4096) != data
            assert vm.guest.read(0x300000, 4096, keyid=keyid) == data   # the writer's view
