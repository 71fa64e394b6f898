"""Live migration of an MKTME guest to another emulated host, over QEMU's own TLS.

The hosts share no memory: QEMU sends all of guest RAM (no ``x-ignore-shared``). The sequence:

1. a fresh QEMU with ``-incoming defer`` starts on the destination while its key is on the way
   (the caller brings the key, or an awaitable of it: :mod:`qemu_mktme.attest.migrate` gets it
   from the broker after the destination's attestation, beside QEMU's start);
2. the destination host programs the key into a KeyID of **its own** choosing and binds the new
   QEMU to its host model (a new :class:`EncryptedMachine`: EPT, VMM page table and IOMMU tagged
   with the new KeyID) while its vCPUs are held and before it listens, so every migrated page
   lands in the CPU view of the new KeyID; no key, no listening port;
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
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import MigrationError, MktmeError, QemuError
from ..host.host import Host
from ..host.payload import Payload
from ..qemu.boot import BootSpec
from ..qemu.machine import Machine, MachineConfig, VmState
from .encrypted import EncryptedMachine, PendingKeyMachine
from .launch import launch_with_key

log = logging.getLogger(__name__)

TLS_ID = "mktme-migrate-tls"
MAX_BANDWIDTH = 1 << 40
"""``max-bandwidth`` in bytes/s: in effect unlimited (QEMU 7.2's default is 128 MiB/s)."""
TIMEOUT = 600.0
STALL_BYTES = 64 << 10
"""Bytes an incoming QEMU must read to count as progress (a stalled stream reads none; QMP and
its own event loop read a few bytes now and then)."""
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


def config_to_json(config: MachineConfig) -> dict[str, Any]:
    """What the destination needs to start the same machine (the kernel command line included:
    it travels over the 0600 control sockets only)."""
    boot = config.boot
    return {"name": config.name, "memory": int(config.memory), "cpus": config.cpus, "accel": config.accel,
            "cpu": config.cpu, "machine": config.machine, "qemu": config.qemu, "extra_args": list(config.extra_args),
            "boot": None if boot is None else {"kernel": str(boot.kernel), "initrd": str(boot.initrd) if boot.initrd
                                               else None, "append": boot.append, "min_memory": boot.min_memory,
                                               "image": boot.image}}


def config_from_json(obj: dict[str, Any]) -> MachineConfig:
    b = obj.get("boot")
    boot = None if b is None else BootSpec(Path(b["kernel"]), Path(b["initrd"]) if b.get("initrd") else None,
                                           b.get("append", ""), int(b.get("min_memory", 0)), b.get("image"))
    return MachineConfig(boot=boot, memory=int(obj["memory"]), cpus=int(obj["cpus"]), accel=obj["accel"],
                         cpu=obj.get("cpu"), machine=obj["machine"], name=obj["name"], qemu=obj.get("qemu"),
                         extra_args=tuple(obj.get("extra_args", ())))


def check_tls_dir(pki: Path) -> Path:
    """``pki`` if it holds QEMU's tls-creds-x509 files, else a one-line ``MigrationError``."""
    missing = [n for n in TLS_FILES if not (pki / n).is_file()]
    if missing:
        raise MigrationError(f"{pki}: not a TLS credentials directory (missing {', '.join(missing)})")
    return pki


class Incoming:
    """The destination side: a bound, paused QEMU waiting for the stream on a port it chose.

    ``await Incoming.start(...)`` -> ``.port``; then ``await finish(resume)`` once the source is
    done (the machine, running), or ``await abort()`` (the destination and its key gone).
    """

    def __init__(self, machine: EncryptedMachine, port: int) -> None:
        self.machine = machine
        self.port = port
        self.closing = False              # being torn down (abort called)
        self._watchdog: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, dest: Host, config: MachineConfig, payload: Payload | str | Awaitable[Payload], *, tenant: str,
                    tls: Path | None, key_name: str | None = None) -> Incoming:
        if config.name in dest.guests:
            raise MigrationError(f"the destination host already has a guest named {config.name!r}")
        if config.disks:
            raise MigrationError(f"{config.name}: a VM with disks cannot migrate: the hosts share no storage")
        async def key_serial() -> int:
            key = payload if isinstance(payload, (Payload, str)) else await payload
            try:
                return dest.keys.add(f"{tenant}:{config.name}:migrated", key, tenant=tenant)
            except MktmeError as err:
                raise MigrationError(f"{config.name}: the destination host cannot take the key: {err}") from None
        config = dataclasses.replace(config, incoming=True, start_paused=True, plugins=())
        target = await launch_with_key(config, key_serial(), lambda serial: dest.keys.revoke(serial, tenant=tenant),
                                       machine=lambda cfg, key: PendingKeyMachine(dest, cfg, key=key, tenant=tenant))
        target.key_name = key_name
        try:
            await _prepare(target, tls, "server")
            await target.qmp.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
            return cls(target, await _listening_port(target))
        except BaseException:
            await target.close()
            raise

    def watch(self, stalled: Callable[[], Awaitable[object]], timeout: float) -> None:
        """Call ``stalled()`` once the incoming migration has made no progress for ``timeout``
        seconds: its QMP status unchanged and its QEMU reading less than :data:`STALL_BYTES`
        (``rchar`` of ``/proc/PID/io``: the stream, beside QMP's and the event loop's small reads);
        until :meth:`finish` or :meth:`abort`."""
        async def watchdog() -> None:
            last, since = ("", -STALL_BYTES), time.monotonic()
            while True:
                await asyncio.sleep(min(1.0, timeout / 4))
                status, read = await self._progress()
                if status != last[0] or read - last[1] >= STALL_BYTES or read < last[1]:
                    last, since = (status, read), time.monotonic()
                elif time.monotonic() - since > timeout:
                    self._watchdog = None          # not cancelled by the abort it leads to
                    await stalled()
                    return
        self._watchdog = asyncio.create_task(watchdog(), name=f"incoming-{self.machine.name}-watchdog")

    async def _progress(self) -> tuple[str, int]:
        """(QEMU's incoming migration status, bytes its process has read so far)."""
        try:
            status = str((await self.machine.qmp.execute("query-migrate")).get("status"))
        except QemuError as err:
            status = f"unreachable: {err}"
        try:
            io = Path(f"/proc/{self.machine.pid}/io").read_text()
            read = int(next(line.split()[1] for line in io.splitlines() if line.startswith("rchar:")))
        except (OSError, StopIteration, ValueError):
            read = -1
        return status, read

    def _stop_watching(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    async def finish(self, resume: bool = True) -> EncryptedMachine:
        self._stop_watching()
        try:
            await _wait(self.machine, "destination", None)
            if resume:
                await self.machine.resume()
        except BaseException:
            await self.abort()
            raise
        return self.machine

    async def abort(self) -> None:
        """Tear the destination down: QEMU gone, its KeyID and key released."""
        self.closing = True
        self._stop_watching()
        try:
            await self.machine.close()
        except (MktmeError, OSError) as err:
            log.warning("%s: tearing down the incoming QEMU: %s", self.machine.name, err)


async def send(vm: EncryptedMachine, port: int, *, tls: Path | None, progress: MigrateProgress | None = None
               ) -> dict[str, Any]:
    """The source side: stream ``vm`` to 127.0.0.1:``port``; the last ``query-migrate`` answer.
    On failure the migration is cancelled and the source carries on (resumed if it ran)."""
    was_running = vm.state is VmState.RUNNING
    try:
        await _prepare(vm, tls, "client")
        await vm.qmp.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        return await _wait(vm, "source", progress)
    except BaseException as err:
        await carry_on(vm, was_running)
        if isinstance(err, QemuError) and not isinstance(err, MigrationError):
            raise MigrationError(f"{vm.name}: migration failed: {err}") from err
        raise


def check_migratable(vm: EncryptedMachine, tls: Path | None, insecure: bool) -> None:
    """The refusals that need no destination (one-line ``MigrationError``)."""
    if tls is None and not insecure:
        raise MigrationError(f"{vm.name}: refusing to migrate an encrypted VM without TLS: QEMU's migration "
                             "stream carries guest RAM in the clear (give TLS credentials, or --insecure)")
    if tls is not None:
        check_tls_dir(tls)
    if vm.state is not VmState.RUNNING and vm.state is not VmState.PAUSED:
        raise MigrationError(f"{vm.name}: cannot migrate a VM in state {vm.state.value}")
    if vm.config.disks:
        raise MigrationError(f"{vm.name}: a VM with disks cannot migrate: the hosts share no storage")


def result_of(info: dict[str, Any], seconds: float, source_keyid: int, dest_keyid: int, tls: bool) -> MigrationResult:
    ram = info.get("ram", {})
    return MigrationResult(seconds, int(info.get("total-time", 0)), int(info.get("downtime", 0)),
                           int(ram.get("total", 0)), float(ram.get("mbps", 0.0)), source_keyid, dest_keyid, tls)


async def migrate(vm: EncryptedMachine, dest: Host, payload: Payload | str | Awaitable[Payload] | None = None, *,
                  tls: Path | None, insecure: bool = False, dest_tls: Path | None = None,
                  progress: MigrateProgress | None = None,
                  via: Callable[[int], int] | None = None) -> tuple[EncryptedMachine, MigrationResult]:
    """Move ``vm`` to host model ``dest`` (in this process) with key ``payload``; the running
    destination machine (owned by the caller) and the figures. ``vm`` is closed on success and
    carries on on failure.

    ``payload``: the destination's key. Default: a tenant (``user``) key is the same key again;
    a CPU-generated key never leaves the CPU, so the destination's CPU generates its own (the
    stream carries plaintext under TLS either way, as on hardware). To have the destination
    attest for the key, use :func:`qemu_mktme.attest.migrate.attested_migration`.

    ``tls``: the credentials directory of the source (client end); ``dest_tls`` the destination's
    (server end; default: the same). ``via(port) -> port``: where the source connects instead of
    the destination's port (a relay on the path, for captures).
    """
    vm.refuse_nvdimm("live migration")
    check_migratable(vm, tls, insecure)
    if payload is None:
        own = vm.host.keys.payload(vm.key_serial, vm.tenant)
        payload = own if own.type.value == "user" else "type=cpu"
    if tls is not None:
        dest_tls = check_tls_dir(dest_tls or tls)
    started = time.monotonic()
    was_running = vm.state is VmState.RUNNING
    incoming = await Incoming.start(dest, vm.config, payload, tenant=vm.tenant, tls=dest_tls)
    try:
        info = await send(vm, via(incoming.port) if via else incoming.port, tls=tls, progress=progress)
        target = await incoming.finish(resume=was_running)
    except BaseException:
        await incoming.abort()
        await carry_on(vm, was_running)
        raise
    result = result_of(info, time.monotonic() - started, vm.keyid, target.keyid, tls is not None)
    await vm.close()                      # unbinds: the source host's KeyID is free again
    return target, result


async def plain_migrate(vm: Machine, *, tls: Path | None) -> tuple[Machine, dict[str, Any]]:
    """The baseline: stock QEMU migrating ``vm`` into a fresh plain QEMU on this machine (the same
    steps, no host model, no key); the running destination and the source's last ``query-migrate``."""
    was_running = vm.state is VmState.RUNNING
    target = Machine(dataclasses.replace(vm.config, incoming=True, start_paused=True, plugins=()))
    await target.launch()
    try:
        await _prepare(target, tls, "server")
        await target.qmp.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
        port = await _listening_port(target)
        await _prepare(vm, tls, "client")
        await vm.qmp.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        info = await _wait(vm, "source", None)
        await _wait(target, "destination", None)
        if was_running:
            await target.resume()
    except BaseException:
        await target.close()
        await carry_on(vm, was_running)
        raise
    await vm.close()
    return target, info


async def _prepare(vm: Machine, tls: Path | None, endpoint: str) -> None:
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


async def _listening_port(target: Machine) -> int:
    info = await target.qmp.execute("query-migrate")
    for addr in info.get("socket-address", []):
        if addr.get("type") == "inet" and int(addr.get("port", 0)):
            return int(addr["port"])
    raise MigrationError(f"{target.name}: the destination QEMU did not report its listening port")


async def _wait(vm: Machine, side: str, progress: MigrateProgress | None) -> dict[str, Any]:
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
            if any(w in desc for w in ("certificate", "handshake", "issuer")):
                raise MigrationError(f"{vm.name}: the TLS handshake between the hosts failed ({side}): {desc} "
                                     "(are both hosts' credentials issued by the same CA?)")
            raise MigrationError(f"{vm.name}: migration {status} on the {side}: {desc}")
        if time.monotonic() > deadline:
            raise MigrationError(f"{vm.name}: migration did not finish in {TIMEOUT:g} s")
        await asyncio.sleep(0.02)


async def carry_on(vm: Machine, was_running: bool) -> None:
    """After a failed or abandoned migration: cancel it if still under way, run the source again."""
    if vm.state is VmState.EXITED:
        return
    try:
        info = await vm.qmp.execute("query-migrate")
        if info.get("status") not in (None, "completed", "failed", "cancelled"):
            await vm.qmp.execute("migrate_cancel")
            for _ in range(500):
                if (await vm.qmp.execute("query-migrate")).get("status") in ("failed", "cancelled"):
                    break
                await asyncio.sleep(0.01)
    except (QemuError, OSError) as err:
        log.warning("%s: cancelling the migration: %s", vm.name, err)
    try:
        status = (await vm.qmp.execute("query-status"))["status"]
        if was_running and status != "running":
            await vm.qmp.execute("cont")
    except (QemuError, OSError) as err:
        log.warning("%s: resuming after the migration failed: %s", vm.name, err)
