"""Adding an encrypted disk to a QEMU that already runs (paused), with QEMU's own mechanisms.

An attested launch starts QEMU before the disk key exists on the host; the disk comes once the
key broker released it, before any vCPU runs:

1. at start, a per-launch **master secret** (32 random bytes) reaches QEMU through an inherited
   pipe (``-object secret,id=...,format=raw,file=/dev/fd/N``): never the command line, never a
   file; on q35 also an empty ``pcie-root-port`` (its root bus takes no hot-plug);
2. the LUKS passphrase travels over QMP only as AES-256-CBC ciphertext under that master secret
   (``object-add secret`` with ``keyid``, ``iv``, base64 data: QEMU's documented way to pass
   secrets at run time, ``docs/system/secrets.rst``);
3. the image file, opened and checked by us, goes to QEMU as that very open file (SCM_RIGHTS and
   ``add-fd``; QEMU opens ``/dev/fdset/N``), ``blockdev-add`` opens qcow2 + LUKS over it,
   ``device_add`` plugs a ``virtio-blk-pci`` (ACPI hot-plug on i440fx's ``pci.0``, the root
   port on q35), and the secret object is deleted again (the block driver keeps its own key).

Written here because QEMU gives the pieces, not the sequence.
"""

from __future__ import annotations

import base64
import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ..errors import LaunchError, QmpCommandError
from .machine import Machine

MASTER_ID = "mktme-master-secret"
ROOT_PORT = "mktme-hotplug-port"


@dataclass
class MasterSecret:
    """A launch's master secret: QEMU reads it from a pipe at start; later secrets go encrypted."""

    key: bytes
    fd: int | None = None

    @classmethod
    @contextlib.contextmanager
    def for_launch(cls) -> Iterator[MasterSecret]:
        """A fresh secret and the read end of a pipe holding it (closed after the block)."""
        master = cls(os.urandom(32))
        r, w = os.pipe()
        try:
            os.write(w, master.key)
        finally:
            os.close(w)
        master.fd = r
        try:
            yield master
        finally:
            os.close(r)
            master.fd = None

    def argv(self) -> list[str]:
        assert self.fd is not None
        return ["-object", f"secret,id={MASTER_ID},format=raw,file=/dev/fd/{self.fd}"]

    def wrap(self, secret: str) -> dict[str, str]:
        """``object-add`` arguments of a ``secret`` holding ``secret``, encrypted under this one."""
        iv = os.urandom(16)
        padder = padding.PKCS7(128).padder()
        data = padder.update(secret.encode()) + padder.finalize()
        enc = Cipher(algorithms.AES(self.key), modes.CBC(iv)).encryptor()
        return {"keyid": MASTER_ID, "format": "base64", "iv": base64.b64encode(iv).decode(),
                "data": base64.b64encode(enc.update(data) + enc.finalize()).decode()}


def hotplug_argv(machine_type: str) -> list[str]:
    """What the machine needs at start to take a PCI device later: a root port on q35."""
    if "q35" in machine_type:
        return ["-device", f"pcie-root-port,id={ROOT_PORT},bus=pcie.0,chassis=1"]
    return []


def hotplug_bus(machine_type: str) -> str:
    return ROOT_PORT if "q35" in machine_type else "pci.0"


async def add_luks_disk(vm: Machine, fd: int, passphrase: str, master: MasterSecret, *, node: str = "disk0",
                        fdset: int = 1, readonly: bool = True) -> None:
    """Plug the LUKS-in-qcow2 image open at ``fd`` into paused ``vm`` as a virtio disk.

    ``QmpCommandError`` (QEMU's reason, e.g. a wrong passphrase) leaves nothing of it in QEMU.
    """
    secret_id = f"{node}-secret"
    ro = {"read-only": True} if readonly else {}
    await vm.qmp.add_fd(fd, fdset)
    try:
        await vm.qmp.execute("object-add", {"qom-type": "secret", "id": secret_id, **master.wrap(passphrase)})
        try:
            await vm.qmp.execute("blockdev-add", {
                "driver": "qcow2", "node-name": node, **ro, "encrypt": {"format": "luks", "key-secret": secret_id},
                "file": {"driver": "file", "filename": f"/dev/fdset/{fdset}", **ro}})
        except QmpCommandError as err:
            raise LaunchError(f"{vm.name}: QEMU cannot open the encrypted disk: {str(err).split(': ', 2)[-1]}",
                              stderr_tail=vm.stderr_tail()) from None
        finally:
            with contextlib.suppress(QmpCommandError):   # the open image keeps its own key
                await vm.qmp.execute("object-del", {"id": secret_id})
        try:
            await vm.qmp.execute("device_add", {"driver": "virtio-blk-pci", "drive": node, "id": f"{node}-dev",
                                                "bus": hotplug_bus(vm.config.machine),
                                                "serial": f"qemu-mktme-{node}"})
        except BaseException:
            with contextlib.suppress(QmpCommandError):
                await vm.qmp.execute("blockdev-del", {"node-name": node})
            raise
    finally:
        with contextlib.suppress(QmpCommandError):       # QEMU holds its dup while the disk is open
            await vm.qmp.execute("remove-fd", {"fdset-id": fdset})
