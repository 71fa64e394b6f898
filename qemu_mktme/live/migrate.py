"""Live migration of an MKTME guest to another emulated host, over QEMU's own TLS.

The hosts share no memory: QEMU sends all of guest RAM (no ``x-ignore-shared``). The sequence:

1. the destination host programs the tenant key into a KeyID of **its own** choosing (the caller
   brings the key: :mod:`qemu_mktme.tenant.migrate` gets it from the broker after the
   destination's attestation);
2. a fresh QEMU with ``-incoming defer`` is launched and bound to the destination host model (a new
   :class:`EncryptedMachine`: EPT, VMM page table and IOMMU tagged with the new KeyID) while its
   vCPUs are held, so every migrated page lands in the CPU view of the new KeyID;
3. ``tls-creds-x509`` objects on both sides (destination ``endpoint=server``, source
   ``endpoint=client``, both ``verify-peer=on``) and ``migrate-set-parameters tls-creds`` and a
   raised ``max-bandwidth`` (QEMU 7.2 caps migration at 128 MiB/s); ``migrate-incoming`` on a
   port QEMU picks, ``migrate`` on the source, ``query-migrate`` polled for progress;
4. once both ends report ``completed`` the destination runs and the source QEMU is closed, which
   unbinds it: its KeyID is free again.

Any failure before step 4 cancels the migration, lets the source carry on (resumed if QEMU left it
paused) and tears the destination down (its KeyID and key released). Without TLS credentials the
migration is refused unless ``insecure=True``: the stream would carry the guest's plaintext.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MigrationError, MktmeError, QemuError
from ..host.host import Host
from ..host.payload import Payload
from ..qemu.machine import MachineConfig, VmState
from .encrypted import EncryptedMachine
from .launch import launch_machine

log = logging.getLogger(__name__)

TLS_ID = "mktme-migrate-tls"
MAX_BANDWIDTH = 1 << 40
"""``max-bandwidth`` in bytes/s: in effect unlimited (QEMU 7.2's default is 128 MiB/s)."""
TIMEOUT = 600.0
TLS_FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem")

MigrateProgress = Callable[[dict[str, Any]], None]
"""Called with each ``query-migrate`` answer of the source while the migration runs."""


@dataclass(frozen=True)
class MigrationResult:
    """What ``query-migrate`` said at the end, and the KeyIDs on each side."""

    seconds: float                     # wall time: destination launch to destination running
    total_ms: int                      # QEMU's own total time of the migration
    downtime_ms: int
    transferred: int                   # bytes on the wire (RAM + device state)
    mbps: float                        # QEMU's last throughput figure
    source_keyid: int
    dest_keyid: int
    tls: bool


def check_tls_dir(pki: Path) -> Path:
    """``pki`` if it holds QEMU's tls-creds-x509 files, else a one-line ``MigrationError``."""
    missing = [n for n in TLS_FILES if not (pki / n).is_file()]
    if missing:
        raise MigrationError(f"{pki}: not a TLS credentials directory (missing {', '.join(missing)})")
    return pki


async def migrate(vm: EncryptedMachine, dest: Host, payload: Payload | str, *, tls: Path | None,
                  insecure: bool = False, dest_tls: Path | None = None, progress: MigrateProgress | None = None,
                  via: Callable[[int], int] | None = None) -> tuple[EncryptedMachine, MigrationResult]:
    """Move ``vm`` to host model ``dest`` with key ``payload``; the running destination machine
    (owned by the caller) and the figures. ``vm`` is closed on success and untouched on failure.

    ``tls``: the credentials directory of the source (client end); ``dest_tls`` the destination's
    (server end; default: the same). ``via(port) -> port``: where the source connects instead of
    the destination's port (a relay on the path, for captures).
    """
    if tls is None and not insecure:
        raise MigrationError(f"{vm.name}: refusing to migrate an encrypted VM without TLS: QEMU's migration "
                             "stream carries guest RAM in the clear (give TLS credentials, or --insecure)")
    if tls is not None:
        check_tls_dir(tls)
        dest_tls = check_tls_dir(dest_tls or tls)
    if vm.state is not VmState.RUNNING and vm.state is not VmState.PAUSED:
        raise MigrationError(f"{vm.name}: cannot migrate a VM in state {vm.state.value}")
    if vm.config.disks:
        raise MigrationError(f"{vm.name}: a VM with disks cannot migrate: the hosts share no storage")
    if vm.name in dest.guests:
        raise MigrationError(f"the destination host already has a guest named {vm.name!r}")
    started = time.monotonic()
    try:
        serial = dest.keys.add(f"{vm.tenant}:{vm.name}:migrated", payload, tenant=vm.tenant)
    except MktmeError as err:
        raise MigrationError(f"{vm.name}: the destination host cannot take the key: {err}") from None
    config = dataclasses.replace(vm.config, incoming=True, start_paused=True, plugins=())
    try:
        target = await launch_machine(config, machine=functools.partial(
            EncryptedMachine, dest, key_serial=serial, tenant=vm.tenant, revoke_key_on_close=True))
    except BaseException:
        with contextlib.suppress(MktmeError):
            dest.keys.revoke(serial, tenant=vm.tenant)
        raise
    was_running = vm.state is VmState.RUNNING
    try:
        await _prepare(target, dest_tls, "server")
        await _prepare(vm, tls, "client")
        await target.qmp.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        port = await _listening_port(target)
        if via is not None:
            port = via(port)
        await vm.qmp.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        info = await _wait(vm, "source", progress)
        await _wait(target, "destination", None)
        if was_running:
            await target.resume()
    except BaseException as err:
        await _abandon(vm, target, was_running)
        if isinstance(err, (QemuError, asyncio.TimeoutError)) and not isinstance(err, MigrationError):
            raise MigrationError(f"{vm.name}: migration failed: {err}") from err
        raise
    result = MigrationResult(time.monotonic() - started, int(info.get("total-time", 0)),
                             int(info.get("downtime", 0)), int(info.get("ram", {}).get("total", 0)),
                             float(info.get("ram", {}).get("mbps", 0.0)), vm.keyid, target.keyid, tls is not None)
    await vm.close()                      # unbinds: the source host's KeyID is free again
    return target, result


async def _prepare(vm: EncryptedMachine, tls: Path | None, endpoint: str) -> None:
    params: dict[str, Any] = {"max-bandwidth": MAX_BANDWIDTH}
    if tls is not None:
        with contextlib.suppress(QemuError):        # a credentials object left by a failed attempt
            await vm.qmp.execute("object-del", {"id": TLS_ID})
        await vm.qmp.execute("object-add", {"qom-type": "tls-creds-x509", "id": TLS_ID, "dir": str(tls),
                                            "endpoint": endpoint, "verify-peer": True})
        params["tls-creds"] = TLS_ID
    else:
        params["tls-creds"] = ""
    await vm.qmp.execute("migrate-set-parameters", params)


async def _listening_port(target: EncryptedMachine) -> int:
    info = await target.qmp.execute("query-migrate")
    for addr in info.get("socket-address", []):
        if addr.get("type") == "inet" and int(addr.get("port", 0)):
            return int(addr["port"])
    raise MigrationError(f"{target.name}: the destination QEMU did not report its listening port")


async def _wait(vm: EncryptedMachine, side: str, progress: MigrateProgress | None) -> dict[str, Any]:
    deadline = time.monotonic() + TIMEOUT
    while True:
        if vm.state is VmState.EXITED:
            raise MigrationError(f"{vm.name}: the {side} QEMU exited during the migration: {vm.stderr_tail}")
        info = await vm.qmp.execute("query-migrate")
        status = info.get("status")
        if progress is not None and status:
            progress(info)
        if status == "completed":
            return info
        if status in ("failed", "cancelled"):
            desc = info.get("error-desc") or status
            if any(w in desc for w in ("certificate", "TLS", "handshake", "issuer")):
                raise MigrationError(f"{vm.name}: the TLS handshake between the hosts failed ({side}): {desc} "
                                     "(are both hosts' credentials issued by the same CA?)")
            raise MigrationError(f"{vm.name}: migration {status} on the {side}: {desc}")
        if time.monotonic() > deadline:
            raise MigrationError(f"{vm.name}: migration did not finish in {TIMEOUT:g} s")
        await asyncio.sleep(0.02)


async def _abandon(vm: EncryptedMachine, target: EncryptedMachine, was_running: bool) -> None:
    """The source carries on; the destination goes (its KeyID and key with it)."""
    with contextlib.suppress(Exception):
        await target.close()
    if vm.state is VmState.EXITED:
        return
    with contextlib.suppress(Exception):
        info = await vm.qmp.execute("query-migrate")
        if info.get("status") not in (None, "completed", "failed", "cancelled"):
            await vm.qmp.execute("migrate_cancel")
            for _ in range(500):
                if (await vm.qmp.execute("query-migrate")).get("status") in ("failed", "cancelled"):
                    break
                await asyncio.sleep(0.01)
    with contextlib.suppress(Exception):
        status = (await vm.qmp.execute("query-status"))["status"]
        if was_running and status != "running":
            await vm.qmp.execute("cont")
