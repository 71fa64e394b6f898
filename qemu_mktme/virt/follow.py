"""The host model of one machine, following its ``libvirtd``: ``qemu-mktme host --libvirt URI``.

    async with LibvirtHost("qemu:///system", host_name="a", tenant_ca=ca) as host:
        await host.serve()

One emulated MKTME host (key service, KeyID table, EPT / VMM page table / IOMMU) per machine.
libvirt's ``qemu`` hook (:mod:`.hookscript`) hands it every operation on a domain that opts in
(:mod:`.domain`), over a unix socket in the machine's ``/run``, and libvirt waits for the answer:

    migrate   (incoming, destination) noted: this QEMU will receive a stream, not be resumed here
    prepare   before QEMU exists: the host attests to the domain's broker (its TPM's quote of the
              measured launch: QEMU binary, shim, package, platform, the domain's kernel and
              initrd) and gets the tenant's key; a refusal stops the start or the incoming
              migration there, with the broker's reason in virsh's error (QEMU never starts)
    started   QEMU exists and no vCPU has run (a start with ``--paused``; an incoming migration:
              QEMU waits for the stream): the key goes into the key service, which programs a
              KeyID; QEMU's RAM is bound (EPT, VMM page table, IOMMU tagged with it) through the
              domain's own QMP monitor, after checking QEMU runs the measured binary. A start is
              then resumed through libvirt, once libvirt has finished it. A start whose vCPUs
              already run (libvirt 9.0 runs this hook after them on a plain ``virsh start``) is
              refused: libvirt stops the domain, virsh says how to start it. An incoming QEMU
              gets a guard (:mod:`.guard`, its own process): no hook runs here after the stream,
              so if this host model dies before the guest resumes here bound, the guard ends
              that QEMU and the migration fails, the guest staying on its source
    stopped / release
              QEMU is gone (destroy, shutdown, crash, the source after a migration completed):
              the binding, the KeyID and the key are released

The hook never calls back into libvirt, and neither does anything here while libvirt waits for
the hook; the resume is issued after the answer. A QEMU that exits without the hook reaching us
is noticed through its QMP monitor closing, and released the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import KeyServiceError, MktmeError, logged
from ..host.payload import Payload
from ..live.control import STR, STR_REQUIRED, Command, Connection, ControlServer
from ..live.encrypted import EncryptedMachine
from ..live.session import HostSession
from ..qemu.machine import MachineConfig
from ..attest.launch import TenantLaunch
from ..attest.measure import check_running, measure_binary
from ..attest.migrate import broker_key_source
from . import guard
from .domain import RUN_DIR, Domain, DomainError, parse, problems
from .fleet import open_libvirt

log = logging.getLogger(__name__)

SOCKET = RUN_DIR / "host.sock"
HOOK_IDLE = 10.0
"""Seconds a peer of the hook socket may stay silent (libvirt's hook writes its request at once)."""
MAX_PEERS = 256
"""Connections served at a time (every domain operation of the machine is one while it runs)."""


@dataclass
class Released:
    """A key the broker released for a domain about to start here (``prepare`` -> ``started``)."""

    payload: Payload = field(repr=False)
    attestation: dict[str, Any]
    incoming: bool = False


@dataclass(frozen=True)
class Binding:
    """A domain bound to this host: what ``query --libvirt`` shows beside libvirt's own state."""

    domain: str
    tenant: str
    key: str
    broker: str
    policy: str
    keyid: int
    handle: str
    state: str
    tagged: bool                   # EPT, VMM page table and IOMMU all carry the VM's KeyID
    since: float
    incoming: bool
    pid: int | None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class LibvirtHost:
    """The host model of one machine, following the domains of libvirt at ``uri``."""

    def __init__(self, uri: str, *, host_name: str, tenant_ca: str | os.PathLike[str],
                 host_dir: str | os.PathLike[str] | None = None, keyid_bits: int = 6,
                 socket_path: str | os.PathLike[str] = SOCKET,
                 log_event: Callable[[str], None] | None = None) -> None:
        self.uri = uri
        self.host_name = host_name
        self.tenant_ca = Path(tenant_ca)
        self.host_dir = Path(host_dir) if host_dir else None
        self.session = HostSession([], keyid_bits=keyid_bits, control=False, name=host_name)
        self.socket_path = Path(socket_path)
        self._server = ControlServer({
            "hook": Command(self._hook, {"domain": STR_REQUIRED, "op": STR_REQUIRED, "sub": STR, "xml": STR_REQUIRED}),
            "query": Command(self._query, {"name": STR}), "bindings": Command(self._bindings),
            "dump": self.session.commands["dump"]},
            path=self.socket_path, idle_timeout=HOOK_IDLE, max_connections=MAX_PEERS)
        self._released: dict[str, Released] = {}
        self._incoming_names: set[str] = set()   # told by the 'migrate' operation: QEMU will take a stream
        self._vms: dict[str, tuple[EncryptedMachine, Binding]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._attesting = asyncio.Lock()          # one TPM: one attestation at a time
        self._tasks: set[asyncio.Task[None]] = set()
        self._guards: dict[str, subprocess.Popen[bytes]] = {}   # incoming domains not resumed here yet
        self._conn: Any = None
        self._note = log_event or (lambda m: log.warning("%s", m))
        self.stopped = asyncio.Event()

    async def __aenter__(self) -> LibvirtHost:
        self.socket_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        await self.session.__aenter__()
        try:
            self._conn = await asyncio.to_thread(open_libvirt, self.uri)
            await self._server.__aenter__()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        self._note(f"host {self.host_name}: following {self.uri}; hook socket {self.socket_path}")
        await self._adopt_running()
        return self

    async def _adopt_running(self) -> None:
        """Bind the domains that opt in and already run (this host model was restarted, or was
        not running when they started): their RAM holds what the guest wrote, taken as plaintext
        under the key (the CPU view is the truth; DRAM is derived from it). One that cannot be
        bound is reported, and left to its owner."""
        def running() -> list[str]:
            return [d.XMLDesc(0) for d in self._conn.listAllDomains(1)]      # VIR_CONNECT_LIST_DOMAINS_ACTIVE
        for xml in await asyncio.to_thread(running):
            d = parse(xml)
            if not d.opted_in:
                continue
            try:
                await self.adopt(d)
            except MktmeError as err:
                self._note(f"domain {d.name} runs without the host model and could not be bound: {err}")
    async def __aexit__(self, *exc: object) -> None:
        await self._server.__aexit__(None, None, None)
        for task in list(self._tasks):
            task.cancel()
        for name in list(self._vms):
            await self.release(name, why="the host model stops", guarded=True)
        await asyncio.gather(*(self._end_guard(name, done=False)      # end of file: each guard ends a QEMU
                               for name in list(self._guards)))          # still taking its stream
        self._released.clear()
        await self.session.__aexit__(None, None, None)
        if self._conn is not None:
            with logged(__name__, "closing the libvirt connection"):
                self._conn.close()
            self._conn = None

    async def serve(self) -> None:
        """Serve until cancelled (or :attr:`stopped` is set)."""
        await self.stopped.wait()

    # ------------------------------------------------------------------ what query shows

    def bindings(self) -> dict[str, Binding]:
        out = {}
        for name, (vm, b) in self._vms.items():
            try:
                tagged = not vm.guest.check_consistency()
                keyid = vm.keyid
            except MktmeError:
                tagged, keyid = False, b.keyid
            out[name] = Binding(**{**asdict(b), "state": vm.state.value, "tagged": tagged, "keyid": keyid})
        return out

    async def _bindings(self, request: dict[str, Any], conn: Connection) -> dict[str, Any]:
        return {"host": self.host_name, "uri": self.uri,
                "keyids_in_use": [a.keyid for a in self.session.host.keys.keyids.in_use],
                "keys": len(self.session.host.keys.keys()),
                "domains": {n: b.to_json() for n, b in self.bindings().items()},
                "attestation": self.session.attestation}

    async def _query(self, request: dict[str, Any], conn: Connection) -> dict[str, Any]:
        return self.session.query(request.get("name"))

    # ------------------------------------------------------------------ the hook

    async def _hook(self, request: dict[str, Any], conn: Connection) -> dict[str, Any]:
        name, op = str(request.get("domain")), str(request.get("op"))
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            t0 = time.monotonic()
            try:
                result = await self.on_hook(name, op, str(request.get("xml", "")))
            except MktmeError as err:
                self._note(f"domain {name}: {op}: refused: {err}")
                raise
            log.info("domain %s: %s done in %.2f s", name, op, time.monotonic() - t0)
            return result

    async def on_hook(self, name: str, op: str, xml: str) -> dict[str, Any]:
        """What the hook's operation ``op`` on domain ``name`` (its XML) does here."""
        d = parse(xml)
        if op in ("stopped", "release"):
            await self.release(name, why=f"libvirt: {op}")
            return {}
        found = problems(d)
        if found:
            raise DomainError("\n".join(found))
        if op == "migrate":
            self._released.pop(name, None)
            self._incoming_names.add(name)
            return {}
        if op == "prepare":
            await self._prepare(d)
            return {}
        if op == "started":
            return await self._started(d)
        if op in ("reconnect", "attach") and name not in self._vms:
            await self.adopt(d)        # libvirtd restarted (or attached a QEMU) while we were not following it
        if op == "restore":
            raise DomainError(f"domain {name}: restoring a saved domain is not supported under MKTME (its memory "
                              "image would be written to disk in the clear): start it again")
        return {}

    async def adopt(self, d: Domain) -> None:
        """Attest for and bind a domain whose QEMU already runs."""
        if d.name in self._vms:
            return
        found = problems(d)
        if found:
            raise DomainError("\n".join(found))
        await self._prepare(d)
        await self._started(d, adopt=True)

    async def _prepare(self, d: Domain) -> None:
        """Attest for ``d`` and keep the released key until QEMU exists."""
        assert d.opt is not None and d.boot is not None
        if d.name in self._vms:
            raise DomainError(f"domain {d.name} is already bound on host {self.host_name}")
        launch = TenantLaunch(d.opt.broker, self.tenant_ca, key=d.opt.key, host=self.host_name, host_dir=self.host_dir)
        config = MachineConfig(name=d.name, boot=d.boot, qemu=d.emulator, memory=d.memory or 512 << 20)
        incoming = d.name in self._incoming_names
        self._incoming_names.discard(d.name)
        async with self._attesting:
            broker_key_source(self.session, launch)
            assert self.session.key_source is not None
            try:
                payload = await self.session.key_source(config, d.opt.tenant, d.opt.key)
            except MktmeError as err:
                raise DomainError(f"domain {d.name}: host {self.host_name}: {err}") from err
        self._released[d.name] = Released(payload, dict(self.session.attestation or {}), incoming)
        self._note(f"domain {d.name}: key {d.opt.key!r} of tenant {d.opt.tenant} released to host {self.host_name}"
                   + (" (incoming migration)" if incoming else ""))

    async def _started(self, d: Domain, *, adopt: bool = False) -> dict[str, Any]:
        """Bind ``d``'s QEMU (no vCPU has run) to this host with the released key."""
        assert d.opt is not None and d.qmp is not None
        released = self._released.pop(d.name, None)
        if released is None:
            raise DomainError(f"domain {d.name}: no key was released for it on host {self.host_name} (its prepare "
                              "step did not reach the host model)")
        keys = self.session.host.keys
        tenant = d.opt.tenant
        try:
            serial = keys.add(f"{tenant}:{d.name}", released.payload, tenant=tenant)
        except KeyServiceError as err:
            raise DomainError(f"domain {d.name}: host {self.host_name}: {err}") from None
        try:
            keyid = keys.describe(serial)["keyid"]
            sharing = [n for n, (_, b) in self._vms.items() if b.keyid == keyid]
            if sharing and (d.opt.policy == "dedicated" or any(self._vms[n][1].policy == "dedicated" for n in sharing)):
                raise DomainError(f"domain {d.name}: KeyID policy 'dedicated', but KeyID {keyid} (tenant {tenant}'s key "
                                  f"{d.opt.key!r}) is in use by domain {sharing[0]} here")
            vm = await EncryptedMachine.attach(self.session.host, d.qmp, key_serial=serial, tenant=tenant, name=d.name,
                                               revoke_key_on_close=True)
        except BaseException:
            with contextlib.suppress(KeyServiceError):
                keys.revoke(serial, tenant=tenant)
            raise
        try:
            assert vm.pid is not None and d.emulator is not None
            pid, emulator = vm.pid, d.emulator          # (hashing QEMU off the loop that serves every hook)
            await asyncio.to_thread(lambda: check_running(pid, measure_binary(emulator)))
            status = str((await vm.qmp.execute("query-status")).get("status"))
            if status == "running" and not adopt:
                raise DomainError(
                    f"domain {d.name} opts into MKTME but its vCPUs ran before its KeyID was bound (a plain start: "
                    "libvirt runs its 'started' hook after the vCPUs): start it paused, 'virsh start --paused "
                    f"{d.name}' (or 'qemu-mktme libvirt start {d.name}'); the host model binds it and resumes it")
        except BaseException:
            await vm.close()
            raise
        binding = Binding(d.name, tenant, d.opt.key, d.opt.broker, d.opt.policy, vm.keyid, f"{serial:#x}",
                          vm.state.value, not vm.guest.check_consistency(), time.time(), status == "inmigrate", vm.pid)
        self._vms[d.name] = (vm, binding)
        self.session.machines[d.name] = vm
        self._spawn(self._watch(d.name, vm), f"{d.name}-watch")
        self._spawn(self._guard(d.name, vm), f"{d.name}-guard")
        if status not in ("inmigrate", "running"):
            self._spawn(self._resume(d.name), f"{d.name}-resume")
        if status == "inmigrate":
            self._start_guard(d.name, d.qmp, vm.pid)
            self._spawn(self._resumed(d.name, vm), f"{d.name}-resumed")
        self._note(f"domain {d.name}: bound to KeyID {vm.keyid} (key handle {serial:#x}) on host {self.host_name}"
                   + {"inmigrate": ", awaiting the migration stream",
                      "running": " (it was running: what it wrote is taken as plaintext under the key)"}.get(
                          status, "; resuming it"))
        return {"keyid": vm.keyid, "handle": f"{serial:#x}", "status": status}

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resume(self, name: str) -> None:
        """Resume a start bound here, through libvirt, once libvirt finished starting it (after the hook)."""
        def resume() -> None:
            import libvirt
            try:
                dom = self._conn.lookupByName(name)
            except libvirt.libvirtError:                  # libvirtd was restarted: connect again
                self._conn = open_libvirt(self.uri)
                dom = self._conn.lookupByName(name)
            for _ in range(600):
                state = dom.state()[0]
                if state == 3:                      # VIR_DOMAIN_PAUSED
                    dom.resume()
                    return
                if state == 1:                      # already running (resumed by someone)
                    return
                time.sleep(0.05)
        try:
            await asyncio.to_thread(resume)
        except Exception as err:  # noqa: BLE001  libvirt's errors: reported, the domain stays paused
            self._note(f"domain {name}: bound but not resumed: {err}")

    def _start_guard(self, name: str, qmp: str, pid: int) -> None:
        """Start :mod:`.guard` for ``name``, whose QEMU waits for a migration stream: if this host
        model dies before the guest resumes here bound, the guard ends that QEMU (the migration fails,
        the source keeps the guest) instead of libvirt resuming it unbound."""
        self._guards[name] = subprocess.Popen([sys.executable, "-I", guard.__file__, qmp, name, str(pid)],
                                              stdin=subprocess.PIPE, start_new_session=True)

    async def _end_guard(self, name: str, *, done: bool) -> None:
        """``done``: nothing to guard (the guest resumed here bound, or its QEMU exited); otherwise
        only the end of file, and the guard ends a QEMU still taking its stream."""
        proc = self._guards.pop(name, None)
        if proc is None:
            return
        assert proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            if done:
                proc.stdin.write(b"done\n")
            proc.stdin.close()
        await asyncio.to_thread(proc.wait)

    async def _resumed(self, name: str, vm: EncryptedMachine) -> None:
        """End ``name``'s guard once its guest resumed here, bound (libvirt finished the migration)."""
        resumed = False
        with contextlib.suppress(MktmeError, ConnectionError, EOFError), vm.qmp.listen("RESUME") as events:
            if (await vm.qmp.execute("query-status")).get("status") != "running":
                await anext(events)
            resumed = True
        entry = self._vms.get(name)
        if resumed and entry is not None and entry[0] is vm:
            await self._end_guard(name, done=True)

    async def _watch(self, name: str, vm: EncryptedMachine) -> None:
        """Release ``name`` when its QEMU exits without the hook telling us."""
        with contextlib.suppress(MktmeError):
            await vm.wait()
        entry = self._vms.get(name)
        if entry is not None and entry[0] is vm:
            await self.release(name, why="its QEMU exited")

    async def _guard(self, name: str, vm: EncryptedMachine) -> None:
        """Cancel an outgoing migration without TLS at its setup, before any RAM moves: QEMU's
        stream would carry the guest's RAM in the clear (libvirt turns QEMU's migration events on)."""
        with contextlib.suppress(MktmeError, ConnectionError, EOFError), vm.qmp.listen("MIGRATION") as events:
            async for event in events:
                if (event.get("data") or {}).get("status") != "setup":
                    continue
                params = await vm.qmp.execute("query-migrate-parameters")
                if not params.get("tls-creds"):
                    await vm.qmp.execute("migrate_cancel")
                    self._note(f"domain {name}: refused a migration without TLS (its RAM would cross the network in "
                               "the clear): migrate it with 'virsh migrate --tls'")

    async def release(self, name: str, *, why: str, guarded: bool = False) -> bool:
        """Unbind domain ``name``: its KeyID and key released here. False when nothing was bound.
        ``guarded``: its QEMU may live on (the host model stops): a guard it has stays."""
        self._released.pop(name, None)
        self._incoming_names.discard(name)
        if not guarded:
            await self._end_guard(name, done=True)
        entry = self._vms.pop(name, None)
        if entry is None:
            return False
        vm, binding = entry
        self.session.machines.pop(name, None)
        await vm.close()                 # unbinds, revokes its key: the KeyID is free unless shared
        self._note(f"domain {name}: released KeyID {binding.keyid} and key handle {binding.handle} ({why})")
        return True
