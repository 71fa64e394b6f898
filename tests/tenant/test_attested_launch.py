"""Attested launches of the bare-metal guest on the distro QEMU: measured host, broker, keys
released into the TPM, the memory key into the mktme key service, the LUKS disk opened by QEMU
through an inherited fd; a tampered host and a wrong disk key get nothing and start nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from qemu_mktme.errors import AttestationError, LaunchError
from qemu_mktme.qemu.machine import MachineConfig
from qemu_mktme.tenant import admin, image
from qemu_mktme.tenant.launch import TenantLaunch, attested_session

from helpers import patience

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
        serial = next(k.serial for k in session.host.keys.keys())
        payload = session.host.keys.payload(serial, "pytest")
        assert payload.key + payload.tweak == mktme_keyserver.kmip().get_key(mktme_keyserver.tenant.key_uid("vm"))
        blocks = await vm.qmp.execute("query-block")
        assert any(b.get("inserted", {}).get("encrypted") for b in blocks)
    _assert_no_key_bytes(mktme_keyserver, [base, hostdir], ["vm", "disk-test"])


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


def test_the_plugins_attested_host_fixture(mktme_attested_host, mktme_keyserver):
    """Last in this module: the fixture enrols its own host0 (its own TPM) in the tenant's policy."""
    keys = mktme_attested_host.fetch(mktme_keyserver.client, ["vm"])
    assert keys["vm"] == mktme_keyserver.kmip().get_key(mktme_keyserver.tenant.key_uid("vm"))
    assert mktme_attested_host.result["attested"] is True
