"""A running emulated host: one MKTME platform, several VMs with their key handles, and the
control socket through which ``qemu-mktme query`` (and dump, snapshot) reach it.

VMs of one tenant given the same key share a KeyID, as the cloud table says; a VM whose key
spec is ``none`` runs as plain QEMU next to the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import KeyServiceError, MigrationError
from ..files import Progress
from ..files.dumpfile import Dump
from ..host.host import Host
from ..host.sanitizer import Sanitizer
from ..host.payload import Payload
from ..keymaterial import kek_from_request
from ..qemu.machine import Machine, MachineConfig, VmState
from ..trace.tracer import Tracer
from .capture import capture
from .control import BOOL, STR, STR_LIST, Arg, Command, Connection, ControlServer
from .encrypted import EncryptedMachine, PendingKeyMachine
from .launch import launch_machine, launch_with_key
from .migrate import Incoming, MigrateProgress, MigrationResult, check_tls_dir, config_from_json, migrate
from . import p2p
from .nvdimm import NvdimmMedia
from .snapshot import SaveResult, restore_snapshot, save_snapshot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VmSpec:
    """One VM to run: its machine, its tenant and its ``mktme`` payload (None: no MKTME).

    The payload may still be on its way (an awaitable: the host attests for it): QEMU then starts
    paused beside it and binds once it arrived, before any vCPU runs (``spawned(pid)`` is called
    as soon as QEMU was exec'd, ``prepare(machine)`` once the key is there, beside the binding)."""

    config: MachineConfig
    tenant: str = "default"
    payload: str | Payload | Awaitable[Payload | OwnedPayload] | None = "type=cpu"
    trace: bool = False                    # load the TCG plugin shim and attribute every access
    iommu_keyid: int | None = None         # fault injection: the IOMMU domain tagged with this KeyID
    spawned: Callable[[int], object] | None = None
    prepare: Callable[[Machine], Awaitable[object]] | None = None
    nvdimms: tuple[NvdimmMedia, ...] = ()   # persistent memory with its media images (live/nvdimm.py)
    nvdimm_strict: bool = False             # refuse media written at another HPA (default: warn)


@dataclass(frozen=True)
class OwnedPayload:
    """A key that arrived for a VM with the name of the tenant that owns it, as the key's source
    (an attested release) established it: the VM's tenant in the key service."""

    payload: Payload
    tenant: str


KeySource = Callable[[MachineConfig, str, "str | None"], Awaitable[Payload]]
"""key_source(config, tenant, key_name) -> the key of an incoming VM of ``tenant`` whose key the
tenant calls ``key_name`` (None: the host's own choice), obtained by this host (attestation)."""


MAX_INCOMING = 8
"""Incoming migrations a host prepares at a time (each is a QEMU with guest RAM and a KeyID)."""


def _hex_kek(text: str) -> bytes:
    """A KEK sent over the control socket: 64 hex digits, checked as every KEK is
    (:func:`qemu_mktme.keymaterial.kek_from_request`)."""
    return kek_from_request(text, "key-encryption key")


def _tls_dir(text: str) -> Path:
    return check_tls_dir(Path(text))


def _config(obj: dict[str, Any]) -> MachineConfig:
    try:
        return config_from_json(obj)
    except KeyError as err:
        raise ValueError(f"the machine configuration lacks {err}") from None


class HostSession:
    """``async with HostSession(specs, keyid_bits=6) as s:`` runs every VM, serves control requests."""

    def __init__(self, specs: list[VmSpec], *, keyid_bits: int = 6, packages: int = 1,
                 control: bool = True, integrity: str | None = None, sanitizer: Sanitizer | None = None,
                 attestation: dict[str, Any] | None = None, name: str | None = None,
                 key_source: KeySource | None = None, stall_timeout: float = p2p.STALL_TIMEOUT,
                 mitigation: str | None = None, dimm_alias: int | None = None) -> None:
        names = [s.config.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"VM names must be unique, got {names}")
        self.specs = specs
        self.host = Host(keyid_bits=keyid_bits, packages=packages, integrity=integrity, sanitizer=sanitizer,
                         mitigation=mitigation, dimm_alias=dimm_alias)
        self.machines: dict[str, Machine] = {}
        self.tracers: dict[str, Tracer] = {}
        self.name = name
        self.key_source = key_source       # how an incoming VM's key reaches this host (tenant layer)
        self.identity: Any = None          # the host's attested identity while it runs (tenant layer)
        path = Arg((str,), required=True)
        self.commands: dict[str, Command] = {
            "query": Command(self._query, {"name": STR}),
            "dump": Command(self._dump, {"path": path, "vms": STR_LIST}),
            "snapshot-save": Command(self._save, {"path": path, "vm": STR,
                                                  "kek": Arg((str,), required=True, convert=_hex_kek)}),
            # migration between host processes (:mod:`.p2p`): the client asks the source...
            "migrate-perform": Command(self._migrate_perform, {
                "vm": Arg((str,), required=True), "to": Arg((str,), required=True),
                "tls": Arg((str,), convert=_tls_dir), "insecure": BOOL}),
            # ... and the source host asks the destination host
            "migrate-prepare": Command(self._migrate_prepare, {
                "config": Arg((dict,), required=True, convert=_config), "tenant": Arg((str,), required=True),
                "key": STR, "tls": Arg((str,), convert=_tls_dir)}),
            "migrate-finish": Command(self._migrate_finish, {"vm": Arg((str,), required=True),
                                                             "run": Arg((bool,), required=True), "resume": BOOL}),
        }
        self.stall_timeout = stall_timeout
        self._incoming: dict[str, Incoming] = {}
        self._migrating: set[str] = set()
        self._serials: list[tuple[int, str]] = []
        self.attestation = attestation     # how the keys were obtained (tenant/launch.py), for query
        self._control = ControlServer(self.commands, name=name) if control else None
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> HostSession:
        try:
            for spec in self.specs:
                await self._start(spec)
            if self._control is not None:
                await self._stack.enter_async_context(self._control)
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def _start(self, spec: VmSpec) -> None:
        name = spec.config.name
        tracer = await self._stack.enter_async_context(Tracer()) if spec.trace else None
        if spec.payload is not None and not isinstance(spec.payload, (str, Payload)):
            vm = await self._launch_pending(spec, spec.payload, tracer)
        else:
            machine: Callable[[MachineConfig], Machine] = Machine
            if spec.payload is not None:
                try:
                    serial = self.host.keys.add(f"{spec.tenant}:{name}", spec.payload, tenant=spec.tenant)
                except KeyServiceError as err:
                    raise self._key_error(name, err) from None
                self._serials.append((serial, spec.tenant))
                machine = functools.partial(EncryptedMachine, self.host, key_serial=serial, tenant=spec.tenant,
                                            iommu_keyid=spec.iommu_keyid, nvdimms=spec.nvdimms,
                                            nvdimm_strict=spec.nvdimm_strict)
            elif spec.nvdimms:
                raise ValueError(f"VM {name!r}: --nvdimm needs the MKTME host model: not with --key none")
            vm = await launch_machine(spec.config, tracer=tracer, machine=machine)
        self.machines[name] = await self._stack.enter_async_context(vm)
        if tracer is not None:
            self.tracers[name] = tracer

    async def _launch_pending(self, spec: VmSpec, payload: Awaitable[Payload | OwnedPayload],
                              tracer: Tracer | None) -> Machine:
        """QEMU started paused while ``payload`` is on its way; bound once it is in the key service
        (owned by the tenant it names, if it names one: ``spec.tenant`` is then a placeholder)."""
        name = spec.config.name
        made: list[PendingKeyMachine] = []

        def machine(cfg: MachineConfig, k: asyncio.Future[int]) -> PendingKeyMachine:
            made.append(PendingKeyMachine(self.host, cfg, key=k, tenant=spec.tenant, iommu_keyid=spec.iommu_keyid,
                                          spawned=spec.spawned, prepare=spec.prepare))
            return made[-1]

        async def key() -> int:
            got = await payload
            tenant = spec.tenant
            if isinstance(got, OwnedPayload):
                tenant = got.tenant
                got = got.payload
            if made:
                made[-1].tenant = tenant
            try:
                return self.host.keys.add(f"{tenant}:{name}", got, tenant=tenant)
            except KeyServiceError as err:
                raise self._key_error(name, err) from None
        return await launch_with_key(spec.config, key(),
                                     lambda serial: self.host.keys.revoke(serial, tenant=made[-1].tenant),
                                     tracer=tracer, machine=machine)

    def _key_error(self, name: str, err: KeyServiceError) -> KeyServiceError:
        """``err`` naming the VM, and for KeyID exhaustion how to get more KeyIDs."""
        text = str(err).split(": ", 1)[-1]
        if err.errno == errno.ENOKEY and len(self.host.keys.keyids.in_use) >= self.host.keys.keyids.max_keyid:
            bits = self.host.platform.layout.keyid_bits
            text += (f" (with {bits} KeyID bit{'s' if bits != 1 else ''}); VM {name!r} needs one more: "
                     "raise --keyid-bits, or share a KeyID by giving VMs of one tenant the same user key")
        else:
            text = f"VM {name!r}: {text}"
        return KeyServiceError(err.errno, text)

    async def restore(self, path: str, kek: bytes, *, name: str | None = None, trace: bool = False,
                      progress: Any = None) -> EncryptedMachine:
        """Restore a snapshot into this host; the VM runs until the session ends."""
        tracer = await self._stack.enter_async_context(Tracer()) if trace else None
        vm = await restore_snapshot(self.host, path, kek, name=name, progress=progress, tracer=tracer)
        await self._stack.enter_async_context(vm)
        self.machines[vm.name] = vm
        if tracer is not None:
            self.tracers[vm.name] = tracer
        return vm

    async def attach(self, qmp_socket: str, *, name: str, tenant: str = "default", payload: str = "type=cpu",
                     ram_path: str | None = None, console_socket: str | None = None) -> EncryptedMachine:
        """Bind a QEMU someone else started to this host (:meth:`EncryptedMachine.attach`); it is
        unbound and disconnected, not stopped, when the session ends."""
        if name in self.machines:
            raise ValueError(f"VM name {name!r} is taken")
        try:
            serial = self.host.keys.add(f"{tenant}:{name}", payload, tenant=tenant)
        except KeyServiceError as err:
            raise self._key_error(name, err) from None
        self._serials.append((serial, tenant))
        vm = await EncryptedMachine.attach(self.host, qmp_socket, key_serial=serial, tenant=tenant, name=name,
                                           ram_path=ram_path, console_socket=console_socket)
        await self._stack.enter_async_context(vm)
        self.machines[name] = vm
        return vm

    async def save(self, name: str | None, path: str, kek: bytes, progress: Any = None) -> SaveResult:
        """Save VM ``name`` (or the only one) as an encrypted snapshot at ``path``."""
        if name:
            vm = self.machines.get(name)
        else:
            vm = next(iter(self.machines.values())) if len(self.machines) == 1 else None
        if vm is None:
            raise ValueError(f"name the VM to save (have: {', '.join(self.machines)})")
        if not isinstance(vm, EncryptedMachine):
            raise ValueError(f"{vm.name} does not run under MKTME; nothing to seal it with")
        vm.refuse_nvdimm("a snapshot")
        return await save_snapshot(vm, path, kek, progress=progress)

    async def migrate(self, name: str, dest: HostSession, payload: Payload | str | Awaitable[Payload], *, tls: Any,
                      insecure: bool = False, dest_tls: Any = None, progress: MigrateProgress | None = None,
                      via: Callable[[int], int] | None = None) -> MigrationResult:
        """Live-migrate VM ``name`` to the host of session ``dest`` (see :mod:`.migrate`): on success
        it runs there under a KeyID ``dest`` chose, and its key and KeyID here are released."""
        vm = self.machines.get(name)
        if vm is None:
            raise MigrationError(f"no VM named {name!r} (have: {', '.join(self.machines) or 'none'})")
        if not isinstance(vm, EncryptedMachine):
            raise MigrationError(f"{name} does not run under MKTME; migrate it with plain QEMU")
        if name in dest.machines:
            raise MigrationError(f"the destination already runs a VM named {name!r}")
        vm.refuse_nvdimm("live migration")
        target, result = await migrate(vm, dest.host, payload, tls=tls, insecure=insecure, dest_tls=dest_tls,
                                       progress=progress, via=via)
        self._gone(vm)
        await dest.adopt(target)
        return result

    def _gone(self, vm: EncryptedMachine) -> None:
        """``vm`` left this host: forget it, and revoke its key unless another VM here uses it."""
        self.machines.pop(vm.name, None)
        self.tracers.pop(vm.name, None)
        entry = (vm.key_serial, vm.tenant)
        if entry in self._serials and not any(isinstance(m, EncryptedMachine) and m.key_serial == vm.key_serial
                                              for m in self.machines.values()):
            self._serials.remove(entry)
            try:
                self.host.keys.revoke(vm.key_serial, tenant=vm.tenant)
            except KeyServiceError as err:
                log.warning("revoking key %#x of tenant %s: %s", vm.key_serial, vm.tenant, err)

    def on_close(self, callback: Callable[[], object]) -> None:
        """Run ``callback`` when the session ends (after its VMs are gone)."""
        self._stack.callback(callback)

    async def adopt(self, vm: Machine) -> None:
        """Run ``vm`` (launched, bound to this host) until the session ends."""
        await self._stack.enter_async_context(vm)
        self.machines[vm.name] = vm

    async def dump(self, path: str | os.PathLike[str], vms: Sequence[str] = (),
                   progress: Progress | None = None) -> Dump:
        """A consistent DRAM dump of ``vms`` (default: every VM under MKTME) at ``path``."""
        twice = sorted({n for n in vms if list(vms).count(n) > 1})
        if twice:
            raise ValueError(f"VM {twice[0]!r} named twice; name each VM to dump once")
        unknown = [n for n in vms if n not in self.machines]
        if unknown:
            raise ValueError(f"no VM named {unknown[0]!r} (have: {', '.join(self.machines)})")
        chosen = [self.machines[n] for n in vms] or list(self.machines.values())
        for vm in chosen:                 # a dump is a persist point: NVDIMM media written too, paused
            if isinstance(vm, EncryptedMachine) and vm.media:
                running = vm.state.value == "running"
                if running:
                    await vm.pause()
                try:
                    await asyncio.to_thread(vm.flush_nvdimms, "dump")
                finally:
                    if running:
                        await vm.resume()
        layout = self.host.platform.layout
        info = {"maxphyaddr": layout.maxphyaddr, "keyid_bits": layout.keyid_bits,
                "packages": self.host.platform.packages}
        return await capture([vm for vm in chosen if isinstance(vm, EncryptedMachine)], path, info, progress)

    async def __aexit__(self, *exc: object) -> None:
        for incoming in list(self._incoming.values()):
            await incoming.abort()
        self._incoming.clear()
        try:
            await self._stack.aclose()
        finally:
            for serial, tenant in self._serials:
                try:
                    self.host.keys.revoke(serial, tenant=tenant)
                except Exception as err:  # noqa: BLE001  teardown goes on; the key is gone with the host
                    log.warning("revoking key %#x of tenant %s: %s", serial, tenant, err)
            self._serials.clear()

    @property
    def control_path(self) -> str | None:
        return str(self._control.path) if self._control else None

    def query(self, name: str | None = None) -> dict[str, Any]:
        """The host and its VMs (or one VM) as JSON-ready data."""
        if name is not None:
            vm = self.machines.get(name)
            if vm is None:
                raise ValueError(f"no VM named {name!r} (have: {', '.join(self.machines)})")
            return self._vm(vm)
        state = self.host.query()
        state["guests"] = {n: self._vm(vm) for n, vm in self.machines.items()}
        state["incoming"] = {n: {"keyid": i.machine.keyid, "port": i.port, "pid": i.machine.pid,
                                 "state": "closing" if i.closing else "waiting"} for n, i in self._incoming.items()}
        if self.attestation is not None:
            state["attestation"] = self.attestation
        return state

    def _vm(self, vm: Machine) -> dict[str, Any]:
        if isinstance(vm, EncryptedMachine):
            return vm.query()
        return {"name": vm.name, "enabled": False, "pid": vm.pid, "state": vm.state.value}

    # ------------------------------------------------------------------ control commands

    async def _query(self, args: dict[str, Any], conn: Connection) -> dict[str, Any]:
        return self.query(args["name"])

    async def _dump(self, args: dict[str, Any], conn: Connection) -> dict[str, Any]:
        d = await self.dump(args["path"], args["vms"] or (), conn.progress)
        return {"path": str(d.path), "regions": [r.to_json() for r in d.regions]}

    async def _save(self, args: dict[str, Any], conn: Connection) -> dict[str, Any]:
        """The client read the KEK from its file and sends it over the 0600 socket: the host opens no user file."""
        result = await self.save(args["vm"], args["path"], args["kek"], conn.progress)
        return dataclasses.asdict(result)

    # ------------------------------------------------------------------ migration between processes
    # (:mod:`.p2p`) The client asks the source (migrate-perform); the source host asks the
    # destination host to prepare (an incoming QEMU, owned by the source host's connection), streams,
    # asks it to finish, then closes its own copy; or cancels, tears the destination down and resumes.

    def _encrypted(self, name: str) -> EncryptedMachine:
        vm = self.machines.get(name)
        if vm is None:
            raise MigrationError(f"no VM named {name!r} (have: {', '.join(self.machines) or 'none'})")
        if not isinstance(vm, EncryptedMachine):
            raise MigrationError(f"{name} does not run under MKTME; migrate it with plain QEMU")
        return vm

    async def _migrate_perform(self, args: dict[str, Any], conn: Connection) -> dict[str, Any]:
        name = args["vm"]
        vm = self._encrypted(name)
        vm.refuse_nvdimm("live migration")
        if name in self._migrating:
            raise MigrationError(f"{name} is migrating already")
        self._migrating.add(name)
        try:
            result = await p2p.perform(vm, args["to"], tls=args["tls"], insecure=bool(args["insecure"]),
                                       progress=conn.progress, here=self.control_path)
        finally:
            self._migrating.discard(name)
            if vm.state is VmState.EXITED:   # closed by perform (or gone): its KeyID is free, its key goes now
                self._gone(vm)
        return dataclasses.asdict(result)

    async def _migrate_prepare(self, args: dict[str, Any], conn: Connection) -> dict[str, Any]:
        config: MachineConfig = args["config"]
        tenant: str = args["tenant"]
        if config.name in self.machines or config.name in self._incoming:
            raise MigrationError(f"host {self.name or 'here'} already runs a VM named {config.name!r}")
        if len(self._incoming) >= MAX_INCOMING:
            raise MigrationError(f"host {self.name or os.getpid()} takes {MAX_INCOMING} incoming migrations at a "
                                 "time; try again once one ended")
        if self.key_source is None:
            raise MigrationError(f"host {self.name or os.getpid()} has no way to obtain the tenant's key: start it "
                                 "with --tenant-server (the key is released only to an attested host)")
        payload = await self.key_source(config, tenant, args["key"])
        if config.name in self.machines or config.name in self._incoming:      # (while it attested)
            raise MigrationError(f"host {self.name or 'here'} already runs a VM named {config.name!r}")
        incoming = await Incoming.start(self.host, config, payload, tenant=tenant, tls=args["tls"],
                                        key_name=args["key"])
        self._incoming[config.name] = incoming

        async def abandon(why: str) -> None:
            if self._incoming.get(config.name) is incoming and not incoming.closing:
                log.warning("incoming VM %s abandoned (%s): torn down, KeyID %d and its key released",
                            config.name, why, incoming.machine.keyid)
                try:
                    await incoming.abort()
                finally:
                    if self._incoming.get(config.name) is incoming:
                        del self._incoming[config.name]
        incoming.watch(lambda: abandon(f"no progress for {self.stall_timeout:g} s"), self.stall_timeout)
        conn.own(f"incoming:{config.name}", lambda: abandon("the source host's connection closed"))
        return {"port": incoming.port, "keyid": incoming.machine.keyid}

    async def _migrate_finish(self, args: dict[str, Any], conn: Connection) -> dict[str, Any]:
        name = args["vm"]
        incoming = self._incoming.get(name)
        if incoming is None or incoming.closing:
            raise MigrationError(f"no incoming migration of VM {name!r} here (torn down, or never prepared)")
        if conn.disown(f"incoming:{name}") is None:
            raise MigrationError(f"the incoming migration of VM {name!r} belongs to another connection")
        del self._incoming[name]
        if not args["run"]:
            await incoming.abort()
            return {"aborted": name}
        vm = await incoming.finish(resume=args["resume"] is not False)
        await self.adopt(vm)
        return vm.query()
