"""Live migration between two running host processes, as libvirt's peer-to-peer migration does it.

The client asks the **source host** once (``migrate-perform``); the source host then drives the
destination host itself, over the destination's control socket, through libvirt's migration
phases: *Begin* (the source checks the VM and describes it: machine, tenant, the key's name),
*Prepare* (the destination attests, gets the tenant's key, binds a QEMU waiting with
``-incoming`` to a KeyID of its own, and listens), *Perform* (the source streams over TLS),
*Finish* (the destination runs the VM) and *Confirm* (the source closes its copy: its KeyID and
key are released). Each host owns its half, so a client killed at any moment changes nothing:

- **destination**: the incoming VM it prepared belongs to the control connection of the source host
  that asked for it. That connection gone (the source host killed), or no progress for
  :data:`STALL_TIMEOUT` seconds (QEMU's migration status unchanged and not a byte read), and it is
  torn down: QEMU killed, KeyID and key released (:meth:`.migrate.Incoming.watch`).
- **source**: the migration runs in the source host, not in the client. When the stream completed
  and the destination runs the VM (Finish answered; or, that answer lost, the destination lists
  the VM) the source closes its paused copy; otherwise it cancels the stream, tells the destination
  to tear down, and resumes the VM. Never both copies running, never neither.

    result = await migrate_between("vm1", source="h2", to="h1", tls=pki)   # the CLI, or a test

A failure is a :class:`~qemu_mktme.errors.MigrationError` (over the control socket it stays one:
:class:`~qemu_mktme.errors.RemoteError`); an unreachable host is ``AttachError``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from ..errors import AttachError, MigrationError, MktmeError
from ..qemu.machine import VmState
from .control import ControlClient, find_host
from .encrypted import EncryptedMachine
from .migrate import TIMEOUT, MigrationResult, carry_on, check_migratable, config_to_json, result_of, send

log = logging.getLogger(__name__)

STALL_TIMEOUT = 60.0
"""Seconds an incoming migration may make no progress before its destination tears it down."""


async def migrate_between(vm: str, *, to: str, source: str | None = None, pid: int | None = None,
                          tls: Path | None, insecure: bool = False, progress: Any = None,
                          timeout: float = TIMEOUT) -> MigrationResult:
    """Move VM ``vm`` from the running host named ``source`` (or process ``pid``, or the only
    one) to the running host named ``to``; the figures. ``progress(done, total)``: bytes streamed.
    The source host does the work: this call may be abandoned (or its process killed) at any
    point, and the VM ends up running on exactly one of the two hosts."""
    async with await ControlClient.connect(pid=pid, host=source) as client:
        answer = await client.call("migrate-perform", vm=vm, to=to, tls=str(tls) if tls else None,
                                   insecure=insecure, progress=progress, timeout=timeout + 60)
    return MigrationResult(**answer)


async def perform(vm: EncryptedMachine, to: str, *, tls: Path | None, insecure: bool, progress: Any = None,
                  here: str | None = None) -> MigrationResult:
    """The source host's side (Begin, Prepare through the destination, Perform, Finish, Confirm);
    ``vm`` is closed when this returns, and runs on here when it raises. ``here``: this host's
    control socket (a destination that is this very host is refused)."""
    check_migratable(vm, tls, insecure)                                     # Begin
    if here is not None and str(find_host(host=to)) == here:
        raise MigrationError(f"{vm.name}: host {to!r} is this host")
    was_running = vm.state is VmState.RUNNING
    started = time.monotonic()

    def bar(info: dict[str, Any]) -> None:
        ram = info.get("ram")
        if progress is not None and ram:
            progress(int(ram.get("transferred", 0)), int(ram.get("total", 0)) or 1)
    async with await ControlClient.connect(host=to) as dest:
        prepared = await dest.call("migrate-prepare", config=config_to_json(vm.config), tenant=vm.tenant,   # Prepare
                                   key=vm.key_name, tls=str(tls) if tls else None)
        try:
            info = await send(vm, int(prepared["port"]), tls=tls, progress=bar)                              # Perform
        except BaseException:
            await _tear_down(dest, vm.name)
            raise
        try:
            ran = await dest.call("migrate-finish", vm=vm.name, run=True, resume=was_running)               # Finish
        except MktmeError as err:
            ran = await _runs_there(to, vm.name)
            if ran is None:
                await carry_on(vm, was_running)
                raise MigrationError(f"{vm.name}: the destination {to} did not take it ({err}); it runs on here") \
                    from err
            log.warning("%s: the destination's answer was lost (%s), but %s runs the VM", vm.name, err, to)
    result = result_of(info, time.monotonic() - started, vm.keyid, int(ran["keyid"]), tls is not None)
    await vm.close()                                                                                        # Confirm
    return result


async def _tear_down(dest: ControlClient, name: str) -> None:
    """After a failed stream: the destination tears its incoming VM down now (closing the
    connection would too: this is only quicker and says so in the log)."""
    try:
        await dest.call("migrate-finish", vm=name, run=False, timeout=30)
    except MktmeError as err:
        log.info("%s: the destination's teardown: %s", name, err)


async def _runs_there(host: str, name: str) -> dict[str, Any] | None:
    """VM ``name``'s state on ``host`` when that host runs it, else None (also when unreachable)."""
    try:
        async with await ControlClient.connect(host=host) as client:
            state = await client.call("query", name=name, timeout=30)
    except (AttachError, ValueError, MktmeError):
        return None
    return state if isinstance(state, dict) and state.get("keyid") is not None else None


