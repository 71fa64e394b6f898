"""An incoming VM runs under its own tenant's key, not the key its destination host was
configured with (issue 22, item 9): the VM's tenant and key name travel with the migration, and
the broker releases that key only to a destination its policy allows, refused before RAM moves."""

from __future__ import annotations

import os
import secrets

import pytest

from qemu_mktme.attest.launch import TenantLaunch, attested_session
from qemu_mktme.attest.migrate import broker_key_source
from qemu_mktme.errors import AttestationError, MigrationError, RemoteError
from qemu_mktme.live.p2p import migrate_between
from qemu_mktme.live.session import HostSession, VmSpec
from qemu_mktme.qemu.machine import MachineConfig
from qemu_mktme.tenant import admin

from helpers import patience
from reference import xts_lines

BITS = 4
WORD = "00112233445566778899aabbccddeeff"


def _clean(host: HostSession) -> None:
    q = host.query()
    assert q["guests"] == {} and q["incoming"] == {} and host.host.keys.keys() == [], q


@pytest.mark.qemu
async def test_a_vm_keeps_its_tenants_key_on_a_host_configured_with_another(mktme_keyserver, baremetal_image,
                                                                          tmp_path_factory):
    ks = mktme_keyserver
    base = tmp_path_factory.mktemp("migrate-key")
    x1, x2, x3 = (f"{h}-{os.getpid()}" for h in ("kx1", "kx2", "kx3"))
    dirs = {h: base / h for h in (x1, x2, x3)}
    own_key = f"mig-x-{secrets.token_hex(4)}"                     # the VM's key: on x1 and x2 only
    admin.add_key(ks.tenant, own_key)
    boot = baremetal_image.boot()
    admin.make_policy(ks.tenant, boot, hosts=[x1, x2, x3], keyid_bits=BITS, host_dirs=dirs,
                      key_hosts={own_key: [x1, x2]})
    tls = ks.tenant.pki.directory
    launch = TenantLaunch(ks.url, ks.ca, key=own_key, host=x1, host_dir=dirs[x1])
    config = MachineConfig(boot=boot, memory="128M", name="bm")
    async with attested_session(launch, config, keyid_bits=BITS) as h1, \
            HostSession([], keyid_bits=BITS, name=x2) as h2, HostSession([], keyid_bits=BITS, name=x3) as h3:
        for host in (h2, h3):            # both configured with the tenant's default key 'vm'
            broker_key_source(host, TenantLaunch(ks.url, ks.ca, key="vm", host=host.name, host_dir=dirs[host.name]))
        vm = h1.machines["bm"]
        assert vm.key_name == own_key and vm.tenant == "pytest"
        await vm.console.wait_for("mktme> ", patience(20))
        await vm.console.command(f"writehex 0x200000 {WORD}", r"ok writehex .*\n")

        # x3 is enrolled, attests fine, but the VM's key is not for it: refused before any RAM moves
        with pytest.raises(AttestationError, match=f"key '{own_key}' is not for host {x3}") as refused:
            await migrate_between("bm", source=x1, to=x3, tls=tls)
        assert isinstance(refused.value, RemoteError)
        _clean(h3)
        assert "status" not in await vm.qmp.execute("query-migrate")          # no stream ever began
        await vm.console.command("crc 0x200000 16", r"ok crc32 .*\n", patience(20))     # runs on

        result = await migrate_between("bm", source=x1, to=x2, tls=tls)
        moved = h2.machines["bm"]
        assert moved.key_name == own_key and moved.tenant == "pytest" and result.dest_keyid == moved.keyid
        _clean(h1)
        await moved.console.command("crc 0x200000 16", r"ok crc32 .*\n", patience(20))
        plain = moved.ram.read(0x200000, 64)
        assert plain[:16] == bytes.fromhex(WORD)
        hpa = int(moved.guest.hpa_of(0x200000))
        key = ks.kmip().get_key(ks.tenant.key_uid(own_key))
        configured = ks.kmip().get_key(ks.tenant.key_uid("vm"))
        assert moved.guest.dram(0x200000, 64) == xts_lines(key[:16], key[16:], hpa, plain)          # X's key
        assert moved.guest.dram(0x200000, 64) != xts_lines(configured[:16], configured[16:], hpa, plain)


@pytest.mark.qemu
async def test_a_vm_whose_key_came_from_no_broker_is_refused_by_a_broker_keyed_host(mktme_keyserver, baremetal_image,
                                                                                   tmp_path):
    """A local (cpu) key has no name at the tenant's broker: the destination would have run it under
    its own configured key; it refuses instead, and the VM runs on where it was."""
    from qemu_mktme.tenant.pki import create_pki
    ks = mktme_keyserver
    tls = create_pki(tmp_path / "pki", client_cn="t").directory
    a, b = f"kl1-{os.getpid()}", f"kl2-{os.getpid()}"
    config = MachineConfig(boot=baremetal_image.boot(), memory="128M", name="loc")
    async with HostSession([VmSpec(config, "t", "type=cpu")], keyid_bits=BITS, name=a) as src, \
            HostSession([], keyid_bits=BITS, name=b) as dst:
        broker_key_source(dst, TenantLaunch(ks.url, ks.ca, key="vm", host=b, host_dir=tmp_path / b))
        with pytest.raises(MigrationError, match="its key did not come from a tenant's broker"):
            await migrate_between("loc", source=a, to=b, tls=tls)
        _clean(dst)
        assert "loc" in src.machines


def test_the_policy_binds_keys_to_hosts_and_reads_older_files():
    from qemu_mktme.tenant.store import Policy
    old = Policy.from_json({"pcrs": [8], "reference": [], "hosts": {"ak": "h1"}})      # written before key_hosts
    assert old.allows("h1", "vm") and old.key_hosts == {}
    bound = Policy.from_json({**old.to_json(), "key_hosts": {"vm": ["h1"]}})
    assert bound.allows("h1", "vm") and not bound.allows("h2", "vm") and bound.allows("h2", "other")
    assert Policy.from_json(bound.to_json()) == bound


def test_key_hosts_on_the_command_line(capsys):
    from qemu_mktme import cli
    with pytest.raises(SystemExit) as exited:
        cli.main(["tenant", "policy", "--host", "h1", "--key-hosts", "vm"])
    assert exited.value.code == 2 and "expected KEY=HOST[,HOST...], got 'vm'" in capsys.readouterr().err
