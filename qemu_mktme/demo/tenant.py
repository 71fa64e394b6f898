"""``qemu-mktme demo --tenant``: the tenant's story, every claim checked as it is printed.

A tenant with its own key server, an image encrypted at rest, a good host attested and booting
the VM from the encrypted disk, and a host with one changed byte in its measured set refused
with the PCR and event that differ, getting no key and no node key. Everything lives in a
temporary directory that is removed at the end.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import AttestationError, TpmError
from ..qemu.binary import find_qemu
from ..qemu.machine import MachineConfig
from ..attest import image
from ..tenant import admin, keyserver
from ..attest.hostid import AttestedHost
from ..attest.launch import TenantLaunch, attested_session
from ..attest.measure import measured_set
from ..tenant.store import TenantDir


def _check(out: Callable[[str], None], ok: bool, text: str) -> None:
    out(f"      {'ok  ' if ok else 'FAIL'}  {text}")
    if not ok:
        raise AssertionError(text)


async def run_tenant_demo(out: Callable[[str], None] = print) -> None:
    from .. import images
    t0 = time.monotonic()
    out("qemu-mktme demo --tenant: the tenant's key server, attested hosts, an image encrypted at rest")
    boot = images.build("baremetal").boot()
    with tempfile.TemporaryDirectory(prefix="mktme-tenant-demo-") as tmp:
        base = Path(tmp)
        tenant = TenantDir(base / "tenant")
        tenant.init("acme")
        out("\n[1/5] the tenant: PKI (QEMU's file names), PyKMIP over mutual TLS 1.2, the key broker")
        info = keyserver.start(tenant)
        try:
            out(f"      key server pid {info.pid}: KMIP 127.0.0.1:{info.kmip_port}, broker {info.url}")
            uid = admin.add_key(tenant, "vm")
            out(f"      memory key 'vm' created in the KMIP server (id {uid}); it exists nowhere else")
            raw = base / "disk.raw"
            raw.write_bytes(b"ACME-CONFIDENTIAL-DISK".ljust(512, b".") * 2048)
            admin.encrypt_image(tenant, raw, base / "disk.qcow2", key_name="disk")
            raw.unlink()
            meta = image.info(base / "disk.qcow2")
            enc = meta["format-specific"]["data"]["encrypt"]
            _check(out, meta["encrypted"] and b"ACME-CONFIDENTIAL" not in (base / "disk.qcow2").read_bytes(),
                   f"disk.qcow2: LUKS in qcow2, {enc['cipher-alg']} {enc['cipher-mode']}, no plaintext in the file; "
                   "manifest signed (Ed25519)")

            out("\n[2/5] reference values from a known-good machine; host0's TPM (swtpm) enrolled")
            hostdir = base / "hosts" / "host0"
            policy = admin.make_policy(tenant, boot, hosts=["host0"], host_dirs={"host0": hostdir})
            for e in policy.reference:
                out(f"      PCR {e.pcr:2}  {e.digest.hex()[:16]}...  {e.description}")

            out("\n[3/5] host0 boots: measured launch, quote, key release into its TPM, VM from the encrypted disk")
            launch = TenantLaunch(info.url, tenant.pki.ca, image=base / "disk.qcow2", host_dir=hostdir)
            async with attested_session(launch, MachineConfig(boot=boot, memory="128M", name="vm1"),
                                        tenant="acme", control=False) as session:
                vm = session.machines["vm1"]
                await vm.console.wait_for(re.escape(images.BAREMETAL.prompt), 60)
                att = session.query()["attestation"]
                _check(out, att["attested"], att["verdict"])
                out(f"      memory key: {att['key_origin']['memory']}")
                out(f"      disk: {att['key_origin']['disk']}")
                blocks = await vm.qmp.execute("query-block")
                _check(out, any(b.get("inserted", {}).get("encrypted") for b in blocks),
                       "QEMU opened the LUKS disk hot-plugged before the vCPUs ran (its secret encrypted under "
                       "the launch's master secret); the guest booted")
                g = session.query()["guests"]["vm1"]
                _check(out, g["key-type"] == "user", f"VM memory under KeyID {g['keyid']} with the tenant's key "
                       "(type=user, straight from the TPM unwrap into the key service)")
            t = launch.timings
            out(f"      measure {t['measure']:.3f} s, attest {t['attest']:.3f} s, release {t['release']:.3f} s "
                f"(QEMU starting paused beside), then bind and disk {t['launch']:.3f} s")
            with AttestedHost("host0", hostdir).boot(measured_set(boot, keyid_bits=6)) as good:
                good.node_key()
            _check(out, (hostdir / "node-key.sealed").is_file(), "node key sealed to host0's PCRs 8-12")

            out("\n[4/5] host0 with one changed byte in its QEMU binary")
            bad_qemu = base / "qemu-system-x86_64"
            shutil.copy(find_qemu().path, bad_qemu)
            data = bytearray(bad_qemu.read_bytes())
            data[-1] ^= 1
            bad_qemu.write_bytes(bytes(data))
            bad_qemu.chmod(0o755)
            launch = TenantLaunch(info.url, tenant.pki.ca, image=base / "disk.qcow2", host_dir=hostdir)
            try:
                async with attested_session(launch, MachineConfig(boot=boot, memory="128M", name="vm1",
                                                                  qemu=str(bad_qemu)), tenant="acme", control=False):
                    _check(out, False, "the tampered host must not start a VM")
            except AttestationError as err:
                _check(out, "PCR 8 differs" in str(err), f"refused: {str(err).split(': ', 1)[1]}")
            last = (tenant.path / "broker.log").read_text().splitlines()[-1]
            _check(out, "REFUSED host0" in last, f"broker log: {last.split(' ', 1)[1][:110]}")
            with AttestedHost("host0", hostdir).boot(measured_set(boot, keyid_bits=6, qemu=bad_qemu)) as bad:
                try:
                    bad.node_key()
                    _check(out, False, "the node key must not unseal")
                except TpmError:
                    _check(out, True, "its node key does not unseal (PCR 8 differs from the sealed state)")

            out("\n[5/5] no key material on disk")
            kmip = keyserver.kmip_client(tenant, info)
            keys = [kmip.get_key(tenant.key_uid(n)) for n in ("vm", "disk")]
            needles = [k for key in keys for k in (key, key[:16], key[16:], key.hex().encode())]
            files = [p for p in base.rglob("*") if p.is_file() and p.name != "pykmip.db"]
            _check(out, not any(n in p.read_bytes() for p in files for n in needles),
                   f"{len(files)} files written by these flows hold no key byte (the KMIP database aside)")
        finally:
            keyserver.stop(tenant)
    out(f"\ndone in {time.monotonic() - t0:.1f} s")


def main() -> int:
    asyncio.run(run_tenant_demo())
    return 0
