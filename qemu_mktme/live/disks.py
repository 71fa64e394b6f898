"""Disks of an encrypted machine served by our vhost-user-blk backend through the host model.

For each ``dma=vhost`` disk (the default under emulation) a backend listens on a private unix
socket before QEMU starts, and QEMU gets ``-chardev socket,...,reconnect=1 -device
vhost-user-blk-pci``. When QEMU passes its memory table, the backend checks that the memfd is
the RAM backend the host model has bound (same file, same offsets) and from then on reaches
guest memory only through an ``AssignedDevice`` in the VM's IOMMU domain. QEMU sends a new table
whenever the guest changes its memory map (SeaBIOS turning 0xC0000-0xFFFFF into RAM through
the PAM registers before it drives the disk): the host model's EPT and IOMMU domain follow it
(:meth:`~qemu_mktme.host.guest.EncryptedGuest.follow`), as VFIO's DMA mappings follow QEMU's
memory listener. With ``bypass`` (the
benchmark's baseline only) it maps the memfd directly instead, around the model.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from ..arch.guestmap import GuestRange
from ..errors import AddressError
from ..files import runtime
from ..host.dma import AssignedDevice
from ..qemu.devices import DiskSpec
from ..vhost.blk import Transfer, VhostUserBlk
from ..vhost.memory import DirectMemory, IommuMemory, check_region
from ..vhost.protocol import MemRegion, ProtocolError, Server
import contextlib

log = logging.getLogger(__name__)


class VhostDisks:
    """The vhost-user-blk backends of one machine (``bound()`` gives its host-model guest)."""

    def __init__(self, name: str, disks: list[tuple[int, DiskSpec]], bound: Callable[[], object],
                 ram_file: Callable[[], str], *, bypass: bool = False) -> None:
        self.name = name
        self.disks = disks
        self._bound = bound
        self._ram_file = ram_file
        self.bypass = bypass
        self.dir: Path | None = None
        self.servers: list[Server] = []
        self.devices: list[VhostUserBlk] = []
        self.assigned: dict[str, AssignedDevice] = {}
        self._subscribers: list[asyncio.Queue[Transfer]] = []

    async def start(self) -> list[str]:
        """Listen on every disk's socket; QEMU's arguments for them."""
        self.dir = runtime.make_runtime_dir(f"{self.name}-vhost")
        argv: list[str] = []
        try:
            for n, disk in self.disks:
                dev_name = f"disk{n}"
                poll = {} if disk.poll_max_ns is None else {"poll_max_ns": disk.poll_max_ns}
                device = VhostUserBlk(disk.path, self._memory_for(dev_name), readonly=disk.readonly,
                                      direct=disk.cache == "none", **poll,
                                      name=dev_name, serial=f"qemu-mktme-{dev_name}")
                self.devices.append(device)
                sock = self.dir / f"{dev_name}.sock"
                server = Server(sock, device, name=f"{self.name}/{dev_name}")
                await server.start()
                self.servers.append(server)
                argv += ["-chardev", f"socket,id=vhost{n},path={sock},reconnect=1",
                         "-device", f"vhost-user-blk-pci,chardev=vhost{n},id={dev_name}-dev,"
                                   f"queue-size={device.queue_size}"]
        except BaseException:
            self.close()
            raise
        return argv

    def _memory_for(self, dev_name: str) -> Callable[[list[MemRegion]], object]:
        def memory_for(regions: list[MemRegion]) -> object:
            guest = self._bound()
            if guest is None:
                raise ProtocolError("memory table before the VM is bound to the host model")
            ram = os.stat(self._ram_file())
            for r in regions:
                st = os.fstat(r.fd)
                if (st.st_dev, st.st_ino) != (ram.st_dev, ram.st_ino):
                    raise ProtocolError(f"memory region at GPA {r.guest_phys_addr:#x} is not the VM's RAM backend")
                check_region(r, unsealed_ok=True)       # QEMU's memfd is sealed; a RAM file is ours
                for g in guest.ranges:                    # type: ignore[attr-defined]
                    overlaps = g.gpa < r.guest_phys_addr + r.memory_size and r.guest_phys_addr < g.gpa + g.size
                    if overlaps and g.offset - (g.gpa - r.guest_phys_addr) != r.mmap_offset:
                        raise ProtocolError(f"memory region at GPA {r.guest_phys_addr:#x} disagrees with "
                                            "QEMU's memory map")
            try:       # QEMU's memory listener tells us the map now: firmware's PAM RAM included
                guest.follow([GuestRange(r.guest_phys_addr, r.memory_size, r.mmap_offset)   # type: ignore[attr-defined]
                              for r in regions])
            except AddressError as err:
                raise ProtocolError(f"memory table refused: {err}") from None
            if self.bypass:
                log.warning("%s/%s: DMA BYPASSES the MKTME model (direct memfd mapping, benchmark baseline)",
                            self.name, dev_name)
                return DirectMemory(regions, unsealed_ok=True)
            device = self.assigned.get(dev_name)
            if device is None or device.guest is not guest:
                device = self.assigned[dev_name] = AssignedDevice(guest, dev_name)  # type: ignore[arg-type]
            return IommuMemory(device)
        return memory_for

    # ------------------------------------------------------------------ observation

    def _publish(self, t: Transfer) -> None:
        for q in list(self._subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(t)

    async def trace(self, maxsize: int = 65536) -> AsyncIterator[Transfer]:
        """Transfers as the devices complete them (a slow consumer drops the overflow)."""
        q: asyncio.Queue[Transfer] = asyncio.Queue(maxsize)
        if not self._subscribers:            # no listener, no per-request record (the fast path)
            for device in self.devices:
                device.transfer_hooks.append(self._publish)
        self._subscribers.append(q)
        try:
            while True:
                yield await q.get()
        finally:
            self._subscribers.remove(q)
            if not self._subscribers:
                for device in self.devices:
                    device.transfer_hooks.remove(self._publish)

    def counters(self) -> dict[str, dict[str, int]]:
        """Per device: DMA counters (reads, writes, bytes, faults, foreign, sanitizer reports)
        and request counters."""
        out = {}
        for device in self.devices:
            row = dict(device.counters)
            assigned = self.assigned.get(device.name)
            if assigned is not None:
                row |= assigned.counters.as_dict() | {"sanitizer": assigned.sanitizer.count}
            out[device.name] = row
        return out

    def summary(self, title: str = "dma") -> list[str]:
        """The per-device DMA counter lines ``run --trace`` prints beside the memory counters."""
        lines = []
        for name, c in self.counters().items():
            lines.append(f"  {title} {self.name}/{name}: {c['requests']:,} requests ({c['errors']:,} errors, "
                         f"{c['unsupported']:,} unsupported) | DMA reads {c.get('reads', 0):,} "
                         f"{c.get('read_bytes', 0) / 2**20:.1f} MiB, writes {c.get('writes', 0):,} "
                         f"{c.get('write_bytes', 0) / 2**20:.1f} MiB | faults {c.get('faults', 0):,} "
                         f"| foreign-KeyID {c.get('sanitizer', 0):,} | requests served natively {c.get('native', 0):,}" + (" | BYPASS" if self.bypass else ""))
        return lines

    def close(self) -> None:
        for server in self.servers:
            server.close_now()
        for device in self.devices:
            device.close()            # kept: their counters outlive the machine
        self.servers.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
