"""Attested launches of the bare-metal guest on the distro QEMU: measured host, broker, keys
released into the TPM, the memory key into the mktme key service, QEMU started paused beside the
attestation and the LUKS disk hot-plugged over QMP before its vCPUs run; a refused host's QEMU
never runs and is gone, a wrong disk key opens nothing."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys

import pytest

from qemu_mktme.errors import AttestationError, LaunchError
from qemu_mktme.live.encrypted import PendingKeyMachine
from qemu_mktme.qemu.machine import MachineConfig
from qemu_mktme.qemu.monitor import Monitor
from qemu_mktme.attest import image
from qemu_mktme.tenant import admin
from qemu_mktme.attest.launch import TenantLaunch, attested_session

from helpers import load_script, patience

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def world(mktme_keyserver, baremetal_image, tenant_image, tmp_path_factory):
    """A policy from this machine with host0 enrolled, and the encrypted image."""
    base = tenant_image[0].parent
    hostdir = tmp_path_factory.mktemp("attested") / "hosts" / "host0"
    boot = baremetal_image.boot()
    admin.make_policy(mktme_keyserver.tenant, boot, hosts=["host0"], host_dirs={"host0": hostdir})
    return base, hostdir, boot


async def test_a_good_host_boots_from_its_encrypted_disk_with_the_tenant_key(world, mktme_keyserver):
    base, hostdir, boot = world
    launch = TenantLaunch(mktme_keyserver.url, mktme_keyserver.ca, image=base / "disk.qcow2", host_dir=hostdir)
    async with attested_session(launch, MachineConfig(boot=boot, memory="128M", name="bm"), tenant="pytest",
                                control=False) as session:
        vm = session.machines["bm"]
        await vm.console.wait_for("mktme> ", patience(20))
        # what the guest's disk holds, read through QEMU's own NBD export (decrypted by QEMU, in memory)
        sock = hostdir / "nbd.sock"
        await vm.qmp.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": str(sock)}}})
        await vm.qmp.execute("block-export-add", {"type": "nbd", "id": "e0", "node-name": "disk0"})
        out = subprocess.run(["qemu-io", "-r", "-f", "raw", f"nbd+unix:///disk0?socket={sock}", "-c", "read -v 0 32"],
                             capture_output=True, text=True, timeout=patience(20))
        assert "54 45 4e 41 4e 54 2d 44 49 53 4b 2d 50 4c 41 49  TENANT.DISK.PLAI" in out.stdout, out.stdout + out.stderr
        q = session.query()
        att = q["attestation"]
        assert att["attested"] is True and att["host"] == "host0"
        assert att["keys"] == {"vm": "released to this host's TPM", "disk-test": "released to this host's TPM"}
        assert "manifest verified" in att["key_origin"]["disk"] and "'vm'" in att["key_origin"]["memory"]
        g = q["guests"]["bm"]
        assert g["key-type"] == "user" and g["enabled"]
        serial = next(k.serial for k in session.host.keys.keys())  # noqa: SIM118 - the key service, not a dict
        payload = session.host.keys.payload(serial, "pytest")
        assert payload.key + payload.tweak == mktme_keyserver.kmip().get_key(mktme_keyserver.tenant.key_uid("vm"))
        blocks = await vm.qmp.execute("query-block")
        assert any(b.get("inserted", {}).get("encrypted") for b in blocks)
        # hot-plugged before the vCPUs ran: the guest's firmware found it and gave it its BARs
        pci = await vm.qmp.hmp("info pci")
        assert re.search(r'BAR\d: .*memory at 0x[0-9a-f]+ .*\n\s+id "disk0-dev"', pci), pci
        # the secrets that carried the passphrase are gone from QEMU once the disk is open
        objects = await vm.qmp.execute("qom-list", {"path": "/objects"})
        assert not any(o["name"].endswith("-secret") and o["name"] != "mktme-master-secret" for o in objects)
        assert "secret" not in " ".join(vm.argv).replace("secret,id=mktme-master-secret,format=raw,file=/dev/fd/", "")
    _assert_no_key_bytes(mktme_keyserver, [base, hostdir], ["vm", "disk-test"])


async def test_a_refused_host_s_paused_qemu_never_runs_and_is_gone(world, mktme_keyserver, monkeypatch):
    """QEMU starts paused beside the attestation. The broker refuses (PCR 11: another platform
    configuration than the policy's): that QEMU never ran a vCPU, got no key and no disk, and is
    gone with its files; the error says why."""
    base, hostdir, boot = world
    seen: dict = {"commands": []}
    bind = PendingKeyMachine._bind
    execute = Monitor.execute

    async def watched_bind(self):
        seen.update(vm=self, pid=self.pid, rundir=self.runtime_dir)
        seen["status"] = (await self.qmp.execute("query-status"))["status"]
        await bind(self)

    async def watched_execute(self, command, arguments=None, timeout=60.0):
        seen["commands"].append(command)
        return await execute(self, command, arguments, timeout)
    monkeypatch.setattr(PendingKeyMachine, "_bind", watched_bind)
    monkeypatch.setattr(Monitor, "execute", watched_execute)
    launch = TenantLaunch(mktme_keyserver.url, mktme_keyserver.ca, image=base / "disk.qcow2", host_dir=hostdir)
    with pytest.raises(AttestationError, match=r"refused this host: PCR 11 differs at event 'platform: 5 KeyID bits"):
        async with attested_session(launch, MachineConfig(boot=boot, memory="128M", name="bm"), tenant="pytest",
                                    keyid_bits=5, control=False):
            pytest.fail("the session must not start")
    vm = seen["vm"]
    assert seen["status"] == "prelaunch"                  # -S, never continued
    assert vm.console.transcript == ""                    # the guest never printed a thing
    assert not {"cont", "object-add", "blockdev-add", "device_add", "add-fd"} & set(seen["commands"])
    assert not os.path.exists(f"/proc/{seen['pid']}")
    assert not seen["rundir"].exists()
    assert vm.returncode is not None


async def test_the_integrity_mode_is_part_of_the_measured_platform(world, mktme_keyserver):
    """A host that would run the VM with per-line memory integrity is another platform than the
    policy's (made without): PCR 11 differs, nothing is released."""
    _, hostdir, boot = world
    launch = TenantLaunch(mktme_keyserver.url, mktme_keyserver.ca, host_dir=hostdir)
    with pytest.raises(AttestationError, match=r"PCR 11 differs at event 'platform: 6 KeyID bits, 1 package\(s\), "
                                               r"integrity mac'"):
        async with attested_session(launch, MachineConfig(boot=boot, memory="128M", name="bm"), tenant="pytest",
                                    integrity="mac", control=False):
            pytest.fail("the session must not start")


@pytest.fixture
def linux_policy(world, mktme_keyserver, linux_image):
    """The tenant's policy for the Linux guest's boot files (PCR 12) on host0; put back after."""
    _, hostdir, _ = world
    tenant = mktme_keyserver.tenant
    before = tenant.policy()
    boot = linux_image.boot(workload="disk", params={"size_mb": 1})
    admin.make_policy(tenant, boot, hosts=["host0"], host_dirs={"host0": hostdir})
    yield boot
    tenant.save_policy(before)


async def test_the_guest_reads_the_disk_plugged_after_the_key_release(world, mktme_keyserver, linux_policy,
                                                                      tenant_image):
    """The stock Linux guest's virtio_blk finds the LUKS disk QEMU opened after the release and reads
    the tenant's plaintext (the workload's write fails: the disk is attached read-only). The VM's
    tenant in the key service is the broker's (its client certificate's CN)."""
    base, hostdir, _ = world
    launch = TenantLaunch(mktme_keyserver.url, mktme_keyserver.ca, image=base / "disk.qcow2", host_dir=hostdir)
    async with attested_session(launch, MachineConfig(boot=linux_policy, memory="512M", name="linux"),
                                control=False) as session:
        vm = session.machines["linux"]
        # no tenant given: the key service files the key under the tenant the broker speaks for
        assert session.query()["guests"]["linux"]["tenant"] == mktme_keyserver.tenant.pki.client_cn() == "pytest"
        await vm.console.wait_for(r"mktme-linux: disk before sha256=[0-9a-f]{64}", patience(60))   # the whole hash, not its first bytes
        text = vm.console.transcript
    assert "ro=1" in text
    _assert_no_key_bytes(mktme_keyserver, [base, hostdir], ["vm", "disk-test"])
    plain = b"TENANT-DISK-PLAINTEXT".ljust(512, b".") * 2048      # what the tenant_image fixture encrypted
    assert re.search(r"disk before sha256=(\w+)", text)[1] == hashlib.sha256(plain).hexdigest()


async def test_a_tampered_host_is_refused_and_starts_nothing(world, mktme_keyserver, tmp_path):
    base, hostdir, boot = world
    qemu = _tampered_qemu(tmp_path)
    launch = TenantLaunch(mktme_keyserver.url, mktme_keyserver.ca, image=base / "disk.qcow2", host_dir=hostdir)
    with pytest.raises(AttestationError, match=r"refused this host: PCR 8 differs at event 'QEMU binary"):
        async with attested_session(launch, MachineConfig(boot=boot, memory="128M", name="bm", qemu=str(qemu)),
                                    tenant="pytest", control=False):
            pytest.fail("the session must not start")
    log = (mktme_keyserver.tenant.path / "broker.log").read_text().splitlines()
    assert "REFUSED host0: PCR 8 differs" in log[-1]


def test_run_tenant_server_on_a_tampered_host_is_one_clear_error(world, mktme_keyserver, tmp_path):
    """The command line: a changed QEMU binary; exit 1, the PCR and event, and no QEMU started."""
    base, hostdir, _ = world
    qemu = _tampered_qemu(tmp_path)
    env = {**os.environ, "QEMU_MKTME_QEMU": str(qemu), "QEMU_MKTME_HOSTS_DIR": str(hostdir.parent)}
    out = subprocess.run([sys.executable, "-m", "qemu_mktme.cli", "run", "--no-input", "--tenant-server",
                          mktme_keyserver.url, "--tenant-ca", str(mktme_keyserver.ca), "--tenant", "pytest",
                          "--image", str(base / "disk.qcow2")], env=env, capture_output=True, text=True,
                         timeout=patience(60))
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith("qemu-mktme: error: the key broker refused this host: PCR 8 differs at event "
                                 "'QEMU binary"), out.stderr
    assert "QEMU pid" not in out.stderr and "Traceback" not in out.stderr


def _tampered_qemu(tmp_path):
    qemu = tmp_path / "qemu-system-x86_64"
    shutil.copy(shutil.which("qemu-system-x86_64"), qemu)
    data = bytearray(qemu.read_bytes())
    data[-1] ^= 0x01                                   # one byte of the measured set changed
    qemu.write_bytes(bytes(data))
    qemu.chmod(0o755)
    return qemu


async def test_a_wrong_disk_key_is_refused_by_qemu(world, mktme_keyserver, tmp_path):
    """The manifest (signed by the tenant) names another key than the image's: QEMU cannot unlock."""
    base, hostdir, boot = world
    wrong = tmp_path / "disk.qcow2"
    shutil.copy(base / "disk.qcow2", wrong)
    admin.add_key(mktme_keyserver.tenant, "disk-other", "disk")
    image.write_manifest(wrong, "disk-other", "pytest", mktme_keyserver.tenant.signing_key())
    launch = TenantLaunch(mktme_keyserver.url, mktme_keyserver.ca, image=wrong, host_dir=hostdir)
    with pytest.raises(LaunchError, match="Invalid password, cannot unlock any keyslot"):
        async with attested_session(launch, MachineConfig(boot=boot, memory="128M", name="bm"),
                                    tenant="pytest", control=False):
            pytest.fail("the session must not start")
    _assert_no_key_bytes(mktme_keyserver, [tmp_path, base, hostdir], ["disk-other", "disk-test"])


def _assert_no_key_bytes(ks, roots, names):
    needles = []
    for name in names:
        key = ks.kmip().get_key(ks.tenant.key_uid(name))
        needles += [key, key[:16], key[16:], key.hex().encode(), key[:16].hex().encode(), key[16:].hex().encode()]
    roots = [*roots, ks.tenant.path]
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and path.name != "pykmip.db":
                data = path.read_bytes()
                assert not any(n in data for n in needles), f"key material in {path}"


async def test_attested_launches_go_on_while_attackers_hold_connections(world, mktme_keyserver):
    """Issue 22: one idle TCP connection to the broker stopped every attested launch. Silent
    connections and half ClientHellos to the broker and KMIP, reopened whenever dropped, held
    through three launches in a row (scripts/bench_attest_siege.py runs 50)."""
    bench = load_script("bench_attest_siege")
    _, hostdir, boot = world
    launch = TenantLaunch(mktme_keyserver.url, mktme_keyserver.ca, host_dir=hostdir)
    info = mktme_keyserver.info
    result = await bench.launches(launch, boot, [info.broker_port, info.kmip_port], 3, tenant="pytest",
                                  timeout=patience(20), log=lambda line: None)
    assert result["failures"] == [] and result["ok"] == 3


def test_the_plugins_attested_host_fixture(mktme_attested_host, mktme_keyserver):
    """Last in this module: the fixture enrols its own host0 (its own TPM) in the tenant's policy."""
    keys = mktme_attested_host.fetch(mktme_keyserver.client, ["vm"])
    assert keys["vm"] == mktme_keyserver.kmip().get_key(mktme_keyserver.tenant.key_uid("vm"))
    assert mktme_attested_host.result["attested"] is True
