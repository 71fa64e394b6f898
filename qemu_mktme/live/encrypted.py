"""A QEMU guest under MKTME: a :class:`Machine` whose RAM is bound to a :class:`Host`.

The guest runs unmodified; its RAM backend is the CPU view of an HPA range tagged with the
VM's KeyID in the EPT, in QEMU's own page table (at the address where QEMU really maps the
backend, read from ``/proc/PID/maps``) and in an IOMMU domain. What DRAM would hold is
``vm.guest.dram(gpa, n)``.

    host = Host(keyid_bits=6)
    serial = host.keys.add("vm1", "type=cpu", tenant="acme")
    async with EncryptedMachine(host, config, key_serial=serial, tenant="acme") as vm:
        await vm.console.wait_for("ready")
        vm.guest.dram(0x200000, 64)
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

from ..errors import MktmeError, NvdimmError, QemuError
from ..files.nvdimmfile import MediaHeader
from ..host.guest import EncryptedGuest
from ..host.host import DEFAULT_VMM_HVA, Host
from ..qemu.binary import QemuBinary
from ..qemu.machine import Machine, MachineConfig
from ..trace.shim import abi_for, build_shim
from ..trace.tracer import Tracer
from ..vhost.blk import Transfer
from .disks import VhostDisks
from .machinecheck import PoisonWatch, forward_foreign_reads
from .nvdimm import MediaBinding, NvdimmMedia, Warn, check_placement

log = logging.getLogger(__name__)


def backend_hva(pid: int, backend_size: int, memfd: str | None = None) -> int | None:
    """Where QEMU process ``pid`` maps its guest-RAM memfd/file, or the memfd named ``memfd``
    (an NVDIMM's backend) (``None`` if not found)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return None
    for m in re.finditer(r"^([0-9a-f]+)-([0-9a-f]+) rw.s \S+ \S+ \d+\s+(.*)$", maps, re.M):
        start, end, path = int(m[1], 16), int(m[2], 16), m[3]
        if end - start != backend_size:
            continue
        if path.startswith(f"/memfd:{memfd} ") if memfd else ("memfd:memory-backend" in path or path.endswith(".ram")):
            return start
    return None


class EncryptedMachine(Machine):
    """A machine bound to ``host`` with key handle ``key_serial`` of ``tenant``.

    Launch fails cleanly (``KeyServiceError``, ``AddressError``...) with QEMU torn down and
    nothing left taken in the host; close unbinds first, so the KeyID is released.
    """

    def __init__(self, host: Host, config: MachineConfig, *, key_serial: int, tenant: str,
                 hpa: int | None = None, revoke_key_on_close: bool = False, iommu_keyid: int | None = None,
                 dma_bypass: bool = False, nvdimms: Sequence[NvdimmMedia] = (), nvdimm_strict: bool = False,
                 warn: Warn | None = None) -> None:
        # under emulation a raw disk's DMA goes through our backend and the IOMMU unless told
        # otherwise; other formats need QEMU's block layer
        disks = tuple(d if d.dma else dataclasses.replace(d, dma="vhost" if d.format == "raw" else "qemu")
                      for d in config.disks)
        config = dataclasses.replace(config, disks=disks)
        super().__init__(config)
        self.iommu_keyid = iommu_keyid
        self.vhost = VhostDisks(config.name, [(n, d) for n, d in enumerate(disks) if d.dma == "vhost"],
                                lambda: self._guest, self._ram_path, bypass=dma_bypass)
        self.host = host
        self.key_serial = key_serial
        self.tenant = tenant
        self.key_name: str | None = None
        """The tenant's name for the VM's key when it came from the tenant's broker (travels with a migration)."""
        self._hpa = hpa
        self._revoke_key = revoke_key_on_close
        self._guest: EncryptedGuest | None = None
        self.poison_watch: PoisonWatch | None = None
        """Under integrity, once traced: the machine checks of this VM (``.events``)."""
        self.media = [MediaBinding(m, config.name, strict=nvdimm_strict, warn=warn) for m in nvdimms]
        """The VM's NVDIMMs and their media images (:mod:`.nvdimm`)."""

    @classmethod
    async def attach(cls, host: Host, qmp_socket: str | os.PathLike[str], *,  # type: ignore[override]
                     key_serial: int, tenant: str, ram_path: str | os.PathLike[str] | None = None,
                     console_socket: str | os.PathLike[str] | None = None, name: str = "attached",
                     hpa: int | None = None, revoke_key_on_close: bool = False) -> EncryptedMachine:
        """Bind a QEMU that someone else started (libvirt, a script) to ``host``: its shared RAM
        backend becomes the CPU view of an HPA range with the VM's KeyID in the EPT, QEMU's page
        table and an IOMMU domain, so the DRAM view, dumps and host-model accesses work as for a
        launched machine. What attach cannot do: load the TCG shim (a plugin is loaded only when
        QEMU starts, so accesses by the guest are not attributed, see :func:`shim_hint`); save a
        snapshot (a restore starts QEMU with our command line, not the one that started this
        VM); and the guest ran before with no key: what it wrote then is taken as plaintext
        under the new key.
        Closing unbinds and disconnects; QEMU keeps running. ``AttachError`` for a socket that is
        not QEMU's QMP, or RAM that is not in a shared memfd/file backend.
        """
        vm = cls(host, MachineConfig(name=name), key_serial=key_serial, tenant=tenant, hpa=hpa,
                 revoke_key_on_close=revoke_key_on_close)
        await vm._attach(qmp_socket, ram_path=ram_path, console_socket=console_socket)
        return vm

    @property
    def guest(self) -> EncryptedGuest:
        """The host model's view of this VM (``QemuError`` when not bound)."""
        if self._guest is None:
            raise QemuError(f"{self.name}: not bound to the MKTME host ({self.state.value})")
        return self._guest

    @property
    def keyid(self) -> int:
        return int(self.guest.keyid)

    async def _launch(self) -> None:
        if self.media:                  # media locked and verified, placement checked: before QEMU starts
            backends = tuple(b.prepare(i) for i, b in enumerate(self.media))
            check_placement(self.media, self.host, self._hpa, int(self.config.memory))
            self.config = dataclasses.replace(self.config, nvdimms=backends)
        if self.vhost.disks:
            args = await self.vhost.start()
            self.config = dataclasses.replace(self.config, extra_args=(*args, *self.config.extra_args))
        await super()._launch()

    async def _bind(self) -> None:
        self._bind_now()

    def _bind_now(self) -> None:
        if self.name in self.host.guests:
            raise QemuError(f"the host already has a guest named {self.name!r}")
        ram = self.ram
        hva = backend_hva(self.pid, ram.size) if self.pid else None
        self._guest = self.host.add_guest(self.name, ram.backend, list(ram.ranges), key_serial=self.key_serial,
                                          tenant=self.tenant, hva=hva or DEFAULT_VMM_HVA, hpa=self._hpa,
                                          extents=ram.data_extents)
        # (a configuration's own plain NVDIMMs, without media, stay QEMU's: unencrypted, untagged)
        for binding, backend in zip(self.media, self.nvdimms, strict=False):
            nv_hva = backend_hva(self.pid, backend.size, binding.memfd_name) if self.pid else None
            binding.bind(self.host, self._guest, backend, nv_hva)
        if self.iommu_keyid is not None and self.iommu_keyid != self._guest.keyid:
            self._guest.set_iommu_keyid(self.iommu_keyid)     # fault injection: the VMM's bug

    def flush_nvdimms(self, reason: str = "flush") -> list[MediaHeader | None]:
        """Write every NVDIMM's media image from its DRAM view now (each atomically; None for a
        module that must not be written, see :meth:`.nvdimm.MediaBinding.store`)."""
        return [binding.store(self.guest, reason) for binding in self.media]

    def refuse_nvdimm(self, what: str) -> None:
        """``NvdimmError`` (one line) for an operation not supported with NVDIMMs attached."""
        if self.media:
            raise NvdimmError(
                f"{self.name}: {what} of a VM with an NVDIMM is refused: QEMU leaves the module's shared backend "
                "out of the stream, and its media is ciphertext for this host's HPA; power the VM off (the media "
                "is written), copy the image, 'qemu-mktme nvdimm rekey' it for the new place, and boot it there")

    def dma_trace(self) -> AsyncIterator[Transfer]:
        """``async for t in vm.dma_trace()``: every disk request as our backend completes it
        (queue, request type, sector, IOVA, HPA, KeyID, length, direction, latency)."""
        return self.vhost.trace()

    def dma_counters(self) -> dict[str, dict[str, int]]:
        """Per vhost disk: DMA and request counters (``run --trace`` prints them)."""
        return self.vhost.counters()

    async def close(self) -> None:
        if self.poison_watch is not None:
            await self.poison_watch.close()
        await super().close()

    def _release_files(self) -> None:
        self.vhost.close()
        for binding in self.media:
            try:
                if self._guest is not None:
                    binding.store(self._guest, "shutdown")
            except MktmeError as err:       # the last complete image stays; say so, go on tearing down
                log.error("%s: %s", self.name, err)
            finally:
                binding.release()
        if self._guest is not None:
            self.host.remove_guest(self.name)
            self._guest = None
        if self._revoke_key:
            self._revoke_key = False
            try:
                self.host.keys.revoke(self.key_serial, tenant=self.tenant)
            except MktmeError as err:
                log.warning("%s: revoking key %#x: %s", self.name, self.key_serial, err)
        super()._release_files()

    async def trace(self, tracer: Tracer) -> None:
        """Start ``tracer`` on this (paused) machine.

        All guest RAM (the whole backend, BIOS shadow RAM included) is attributed to the VM's
        KeyID, and host or DMA writes through another KeyID are reported to the tracer as
        foreign lines, so the guest's next load from one is a foreign-KeyID read. The caller
        resumes the guest (configure the tracer with ``start_paused=True``).
        """
        await tracer.start(self)
        tracer.set_backend_keyid(0, self.ram.size, self.keyid)   # all of the backend is the VM's
        self.guest.foreign_write_hooks.append(tracer.mark_foreign)
        if self.host.sanitizer is not None:
            guest = self.guest

            def hpa_of(gpa: int) -> int | None:
                try:
                    return int(guest.hpa_of(gpa))
                except MktmeError:
                    return None
            forward_foreign_reads(self.name, tracer, self.host.sanitizer, hpa_of)
        if self.host.platform.memory.integrity is not None:
            self.poison_watch = PoisonWatch(self, tracer)
            self.guest.poison_hooks.append(self.poison_watch.poisoned)

    def query(self) -> dict[str, object]:
        """The VM's encryption state (``query-sev``-like), plus QEMU's pid."""
        state = {**self.guest.query(), "pid": self.pid, "state": self.state.value}
        for entry, binding in zip(state.get("nvdimms", []), self.media, strict=True):
            entry["media"] = str(binding.media.path)
            entry["media-hpa"] = f"{binding.header.hpa:#x}" if binding.header else None
        return state


class PendingKeyMachine(EncryptedMachine):
    """A machine whose key is still on its way (the host attests for it while QEMU starts): QEMU
    starts paused and binds once ``key`` (the key handle, once it is in the key service) is
    there, still before a vCPU runs. ``spawned(pid)`` runs as soon as QEMU was exec'd (a measured
    launch checks the binary that really runs); ``prepare(machine)`` runs once the key is there,
    beside the binding (which then runs in a worker thread) and still before a vCPU runs (an
    attested launch hot-plugs the disk whose key came with it). The key goes with the machine."""

    def __init__(self, host: Host, config: MachineConfig, *, key: Awaitable[int], tenant: str,
                 iommu_keyid: int | None = None, spawned: Callable[[int], object] | None = None,
                 prepare: Callable[[PendingKeyMachine], Awaitable[object]] | None = None) -> None:
        super().__init__(host, config, key_serial=-1, tenant=tenant, iommu_keyid=iommu_keyid)
        self._key = key
        self._on_spawn = spawned
        self._prepare = prepare

    def _spawned(self) -> None:
        if self._on_spawn is not None and self.pid is not None:
            self._on_spawn(self.pid)

    async def _bind(self) -> None:
        self.key_serial = await self._key
        self._revoke_key = True                  # the key was added for this VM: it goes with it
        if self._prepare is None:
            await super()._bind()
            return
        # QEMU's side (QMP) and the host model's side (CPU-bound) at once; both end before the
        # launch goes on or fails
        results = await asyncio.gather(asyncio.to_thread(self._bind_now), self._prepare(self), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result


def shim_hint(qemu: QemuBinary) -> str:
    """What to tell the owner of a QEMU that was attached: the shim's ``-plugin`` library for
    this QEMU's plugin ABI, and why it cannot be added now."""
    library = build_shim(qemu, abi=abi_for(qemu.version))
    return (f"no TCG shim: QEMU loads plugins only at start, and the shim's region is made by qemu-mktme "
            f"before QEMU starts. To trace this guest, start it with 'qemu-mktme run --trace ... -- "
            f"YOUR-QEMU-OPTIONS', which adds -plugin {library},region=/proc/self/fd/N,...")
