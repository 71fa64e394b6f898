"""Three machines for a test: the tenant (KMIP + broker) and hosts ``a`` and ``b``, each running
``libvirtd`` with the hook and ``qemu-mktme host --libvirt``; what the ``mktme_fleet`` fixture gives.

    with FleetLab(work, boot) as lab:
        lab.define("a", "vm1", boot, memory=512 << 20)
        await lab.start("a", "vm1")
        await lab.migrate("vm1", "a", "b")
        await lab.stop("b", "vm1")

Links: tenant-a, tenant-b, a-b (:class:`.testbed.Testbed`); libvirt migrates over a-b. Both hosts
are enrolled in the tenant's policy for ``boot`` (the reference values name its kernel and
initrd). Everything runs inside the machines; this process reaches each ``libvirtd`` through its
unix socket (``/proc/HOLDER/root/run/libvirt``) and each host model through its hook socket.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..qemu.binary import find_qemu
from ..qemu.boot import BootSpec
from ..tenant import admin
from ..tenant.store import TenantDir
from . import domain as dom
from .fleet import MigrateResult, StartResult, amigrate, astart, astop, domain_bindings, host_request
from .testbed import NsMachine, TenantService, Testbed, TestbedError, serve_tenant

HOSTS = ("a", "b")
DAEMON_TIMEOUT = 60.0


def _own_copy(boot: BootSpec, directory: Path) -> BootSpec:
    """``boot`` with its kernel and initrd copied into ``directory``: what the hosts measure and the
    tenant's policy names stays the same while the lab runs, whoever rebuilds the image cache."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for field, path in (("kernel", boot.kernel), ("initrd", boot.initrd)):
        if path is not None:
            files[field] = directory / Path(path).name
            shutil.copyfile(path, files[field])
    return dataclasses.replace(boot, **files)  # type: ignore[arg-type]


def guest_ram(pid: int, size: int) -> Path:
    """The guest-RAM memfd of QEMU ``pid`` (``size`` bytes), as a path this process can open."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        path = Path(f"/proc/{pid}/fd/{fd}")
        with contextlib.suppress(OSError):
            if os.readlink(path).startswith("/memfd:") and path.stat().st_size == size:
                return path
    raise TestbedError(f"QEMU {pid} has no guest-RAM memfd of {size >> 20} MiB")


class FleetLab:
    """The tenant and two libvirt hosts with their host models; removed at exit."""

    def __init__(self, work: Path, boot: BootSpec, *, keyid_bits: int = 6, tenant: str = "pytest") -> None:
        self.work = Path(work)
        self.boot = _own_copy(boot, self.work / "boot")
        self.keyid_bits = keyid_bits
        self.tenant_name = tenant
        self.bed = Testbed(["tenant", *HOSTS], links=[("tenant", "a"), ("tenant", "b"), ("a", "b")], hook=True)
        self.tenant: TenantService | None = None
        self.daemons: dict[str, subprocess.Popen[bytes]] = {}
        self.host_dirs = {h: self.work / "hosts" / h for h in HOSTS}
        self.timings: dict[str, float] = {}

    def __enter__(self) -> FleetLab:
        t0 = time.monotonic()
        try:
            self.bed.__enter__()
            self.timings["machines"] = self.bed.seconds
            self.tenant = serve_tenant(self.bed["tenant"], self.work / "tenant", name=self.tenant_name)
            self.timings["tenant"] = time.monotonic() - t0 - self.bed.seconds
            admin.make_policy(TenantDir(self.tenant.directory), self.boot, hosts=list(HOSTS), keyid_bits=self.keyid_bits,
                              host_dirs=self.host_dirs)
            for h in HOSTS:
                self.start_daemon(h, wait=False)
            for h in HOSTS:
                self.wait_daemon(h)
        except BaseException:
            self.close()
            raise
        self.timings["total"] = time.monotonic() - t0
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for proc in self.daemons.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.daemons.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.bed.close()

    # ------------------------------------------------------------------ machines

    def __getitem__(self, name: str) -> NsMachine:
        return self.bed[name]

    @property
    def url(self) -> str:
        assert self.tenant is not None
        return self.tenant.url

    def uri(self, host: str) -> str:
        """A URI of ``host``'s libvirtd usable from this process (its unix socket)."""
        return f"qemu:///system?socket=/proc/{self.bed[host].pid}/root/run/libvirt/libvirt-sock"

    def socket(self, host: str) -> Path:
        return self.bed[host].run_dir / "qemu-mktme/libvirt/host.sock"

    def log(self, host: str) -> Path:
        return self.work / f"host-{host}.log"

    def start_daemon(self, host: str, *, wait: bool = True) -> subprocess.Popen[bytes]:
        """``qemu-mktme host --libvirt qemu:///system`` inside ``host`` (its output: :meth:`log`)."""
        assert self.tenant is not None
        with open(self.log(host), "ab") as out:
            self.daemons[host] = self.bed[host].popen(
                [sys.executable, "-m", "qemu_mktme.cli", "-v", "host", "--libvirt", "qemu:///system", "--host-name", host,
                 "--tenant-ca", str(self.tenant.ca), "--host-dir", str(self.host_dirs[host]),
                 "--keyid-bits", str(self.keyid_bits)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if wait:
            self.wait_daemon(host)
        return self.daemons[host]

    def wait_daemon(self, host: str) -> None:
        deadline = time.monotonic() + DAEMON_TIMEOUT
        proc = self.daemons[host]
        while True:
            try:
                host_request("bindings", socket=self.socket(host), timeout=5)
                return
            except Exception:  # noqa: BLE001  not listening yet
                if proc.poll() is not None:
                    raise TestbedError(f"host model of {host} exited ({proc.returncode}): "
                                       f"{self.log(host).read_text(errors='replace')[-2000:]}") from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    # ------------------------------------------------------------------ domains

    def domain_xml(self, name: str, boot: BootSpec | None = None, *, memory: int = 512 << 20, opt: bool = True,
                   key: str = "vm", policy: str = "shared") -> str:
        o = dom.Opt(self.tenant_name, key, self.url, policy) if opt else None
        return dom.guest_domain(name, boot or self.boot, memory=memory, opt=o, emulator=str(find_qemu().path),
                                serial_log=f"/var/log/libvirt/qemu/{name}-serial.log")

    def define(self, host: str, name: str, boot: BootSpec | None = None, **kw: Any) -> str:
        """Define domain ``name`` on ``host`` (``virsh define``); its XML."""
        xml = self.domain_xml(name, boot, **kw)
        path = self.work / f"{name}.xml"
        path.write_text(xml)
        self.bed[host].virsh("define", str(path), check=True)
        return xml

    def serial(self, host: str, name: str) -> str:
        """What domain ``name`` wrote on its serial console while it ran on ``host``."""
        try:
            return (self.bed[host].root / "log/qemu" / f"{name}-serial.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def qemu_pid(self, host: str, name: str) -> int:
        """The QEMU process of domain ``name`` on ``host``."""
        for pid in self.bed[host].processes():
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[0].endswith(b"qemu-system-x86_64") and f"guest={name}".encode() in b" ".join(argv):
                return pid
        raise TestbedError(f"no QEMU of domain {name} on {host}")

    def state(self, host: str, name: str) -> str:
        """libvirt's state of domain ``name`` on ``host`` (``virsh domstate``)."""
        return self.bed[host].virsh("domstate", name).stdout.strip()

    def bindings(self, host: str) -> dict[str, Any]:
        return host_request("bindings", socket=self.socket(host))  # type: ignore[no-any-return]

    def domains(self, host: str) -> dict[str, Any]:
        return {n: b.to_json() for n, b in domain_bindings(self.uri(host), socket=self.socket(host)).items()}

    async def start(self, host: str, name: str) -> StartResult:
        return await astart(self.uri(host), name, socket=self.socket(host))

    async def migrate(self, name: str, source: str, dest: str, *, tls: bool = True) -> MigrateResult:
        return await amigrate(self.uri(source), name, self.bed[dest].uri, tls=tls)

    async def stop(self, host: str, name: str) -> None:
        await astop(self.uri(host), name)
