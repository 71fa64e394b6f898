"""The emulated compute node: an MKTME platform booted by its BIOS, the host kernel's key service,
KeyID table and physical memory map, and the VMs bound to it.

    host = Host(keyid_bits=6)
    serial = host.keys.add("tenant-a:vm-key", "type=user key=... tweak=...", tenant="acme")
    guest = host.add_guest("vm1", ram_buffer, ranges, key_serial=serial, tenant="acme")
    guest.dram(0x200000, 64)          # what the memory bus carries
    host.remove_guest("vm1")          # KeyID released when its last user goes

``Host(integrity="mac")`` builds the platform with per-line integrity (:mod:`..engine.integrity`);
``Host(mitigation=MODE, dimm_alias=BIT)`` with any platform mode and an aliased DIMM map
(:mod:`..engine.dimm`; under ``alias-check`` the BIOS refuses an alias: ``DimmAliasError``);
``Host(sanitizer=Sanitizer(print))`` installs the KeyID-aliasing sanitizer (:mod:`.sanitizer`).

``add_guest`` is all or nothing: a failure releases the KeyID reference, the HPA range, the
attachment and every table frame it took.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..arch import cpuid as cpuid_bits
from ..arch import msr as msr_bits
from ..arch.msr import Algorithm
from ..engine.integrity import Poison
from ..engine.platform import AES_XTS_128, AES_XTS_256, Platform
from ..errors import HostError
from ..arch.guestmap import GuestRange
from .guest import EncryptedGuest, GuestNvdimm
from .keyids import KeyIdAllocator
from .keys import KeyService
from .physmap import FrameAllocator, HpaRanges
from .sanitizer import Sanitizer
from .tables import EPT, IOMMU, VMM, TranslationTable

log = logging.getLogger(__name__)

DEFAULT_VMM_HVA = 0x7F00_0000_0000


def detect_tme(platform: Platform, phys_bits: int) -> tuple[list[str], int]:
    """What Linux's ``detect_tme`` (arch/x86/kernel/cpu/intel.c, up to 6.10) prints, and the
    reduced ``x86_phys_bits``. Read through CPUID and RDMSR only, as the kernel does."""
    if not cpuid_bits.has_tme(platform.cpuid(7, 0)):
        return [], phys_bits
    act = msr_bits.TME_ACTIVATE.decode(platform.rdmsr(msr_bits.IA32_TME_ACTIVATE))
    if not act.lock or not act.tme_enable:
        return ["x86/tme: not enabled by BIOS"], phys_bits
    lines = ["x86/tme: enabled by BIOS"]
    if act.tme_policy != Algorithm.AES_XTS_128:
        lines.append(f"x86/tme: Unknown policy is active: {act.tme_policy:#x}")
    if not act.mk_tme_crypto_algs & 1 and act.mk_tme_keyid_bits:
        lines.append(f"x86/mktme: No known encryption algorithm is supported: {act.mk_tme_crypto_algs:#x}")
    nr_keyids = (1 << act.mk_tme_keyid_bits) - 1
    if nr_keyids:
        lines += ["x86/mktme: enabled by BIOS", f"x86/mktme: {nr_keyids} KeyIDs available"]
    else:
        lines.append("x86/mktme: disabled by BIOS")
    return lines, phys_bits - act.mk_tme_keyid_bits


class Host:
    """One emulated MKTME host; see the module docstring."""

    def __init__(self, *, keyid_bits: int = 6, maxphyaddr: int = 46, packages: int = 1,
                 max_keys: int | None = None, algorithms: Sequence[Algorithm] = (AES_XTS_128, AES_XTS_256),
                 bypass: bool = False, platform: Platform | None = None, integrity: str | None = None,
                 sanitizer: Sanitizer | None = None, mitigation: str | None = None,
                 dimm_alias: int | None = None) -> None:
        if platform is None:
            if not 1 <= keyid_bits <= 15:
                raise ValueError(f"keyid_bits must be in 1..15 for MKTME, got {keyid_bits}")
            platform = Platform(maxphyaddr, max_keyid_bits=keyid_bits,
                                max_keys=(1 << keyid_bits) - 1 if max_keys is None else max_keys,
                                algorithms=algorithms, packages=packages, integrity=integrity,
                                mitigation=mitigation, dimm_alias=dimm_alias)
            platform.bios_activate(keyid_bits=keyid_bits, bypass=bypass)
        if not platform.activated or platform.layout.keyid_bits == 0:
            raise HostError("the platform's BIOS did not activate MKTME (KeyID bits = 0)")
        self.platform = platform
        self.boot_log, self.phys_bits = detect_tme(platform, platform.maxphyaddr)
        for line in self.boot_log:
            log.info("%s", line)
        layout = platform.layout
        self.frames = FrameAllocator()
        self.keyids = KeyIdAllocator(min(layout.max_keyid, platform.max_keys))
        self.keys = KeyService(platform, self.keyids, self.frames.alloc())
        self.hpa_ranges = HpaRanges(limit=1 << layout.keyid_shift)
        self.guests: dict[str, EncryptedGuest] = {}
        if platform.memory.integrity is not None:
            platform.memory.integrity.hooks.append(self._poisoned)
        self.sanitizer = sanitizer.install(self) if sanitizer is not None else None

    def __repr__(self) -> str:
        return f"<Host {self.platform.layout} {len(self.guests)} guests>"

    # ------------------------------------------------------------------ guests

    def add_guest(self, name: str, ram: Any, ranges: Sequence[GuestRange], *, key_serial: int, tenant: str,
                  hva: int = DEFAULT_VMM_HVA, hpa: int | None = None, iommu: bool = True,
                  extents: Callable[[int, int], list[tuple[int, int]]] | None = None) -> EncryptedGuest:
        """Bind a VM's RAM backend (``ram``: writable buffer, the CPU view) to the host.

        Takes a reference on the key (``KeyServiceError`` EACCES/EKEYREVOKED/ENOENT), reserves
        an HPA range (``AddressError`` on overlap), builds the EPT, the VMM page table over
        [hva, hva + size) and an IOMMU domain, all tagged with the key's KeyID, and attaches
        the buffer as the CPU view of the range. ``extents(offset, nbytes)`` may list the backend
        ranges that hold data (see :meth:`EncryptedGuest.iter_dram`). On any failure nothing stays
        taken.
        """
        if name in self.guests:
            raise HostError(f"a guest named {name!r} exists already")
        buf = ram if isinstance(ram, np.ndarray) else np.frombuffer(ram, dtype=np.uint8)
        buf = buf.reshape(-1).view(np.uint8)
        for r in ranges:
            if r.offset + r.size > buf.size or r.offset % 4096 or r.gpa % 4096 or r.size % 4096:
                raise ValueError(f"{name}: RAM range {r} is not 4 KiB aligned inside the {buf.size:#x}-byte backend")
        undo: list[Any] = []
        try:
            keyid = self.keys.use(key_serial, f"vm:{name}", tenant=tenant)
            undo.append(lambda: self.keys.unuse(key_serial, f"vm:{name}"))
            rng = self.hpa_ranges.reserve(name, buf.size, hpa)
            undo.append(lambda: self.hpa_ranges.release(rng))
            tables = []
            for fmt in (EPT, VMM, IOMMU):
                table = TranslationTable(fmt, self.platform.memory, self.platform.layout, self.frames)
                undo.append(table.free)
                tables.append(table)
            ept, vmm, io = tables
            for r in ranges:
                ept.map(r.gpa, rng.hpa + r.offset, r.size, keyid)
                if iommu:
                    io.map(r.gpa, rng.hpa + r.offset, r.size, keyid)
            vmm.map(hva, rng.hpa, buf.size, keyid)
            for table in tables:
                table.flush()
            self.platform.memory.attach_cpu_view(rng.hpa, buf, keyid)
            if self.sanitizer is not None:      # QEMU's fresh backend: cleared through the KeyID
                self.sanitizer.cpu_write(rng.hpa, buf.size, keyid)
            undo.append(lambda: self.platform.memory.detach_cpu_view(rng.hpa))
        except BaseException:
            for step in reversed(undo):
                step()
            raise
        guest = EncryptedGuest(name=name, tenant=tenant, key_serial=key_serial, keyid=keyid, platform=self.platform,
                               ram=buf, ranges=list(ranges), hpa=rng, hva=hva, ept=ept, vmm=vmm, iommu=io,
                               describe_key=lambda: self.keys.describe(key_serial), extents=extents)
        self.guests[name] = guest
        log.info("%s: RAM %d MiB at HPA %#x, KeyID %d (tenant %s)", name, buf.size >> 20, rng.hpa, keyid, tenant)
        return guest

    def add_nvdimm(self, name: str, buffer: Any, gpa: int, *, hpa: int | None = None,
                   hva: int | None = None) -> GuestNvdimm:
        """Place NVDIMM backend ``buffer`` (the CPU view, plaintext) of guest ``name`` in the host
        physical map: at ``hpa`` (``AddressError`` when it overlaps RAM, another NVDIMM or the
        host kernel), else at the next free range; map guest-physical ``gpa`` to it in the VM's
        EPT and IOMMU domain, and QEMU's mapping ``hva`` in the VMM page table, all with the VM's
        KeyID, as RAM is. Its DRAM view is then AES-XTS under the VM's key with tweak = HPA.
        The tables are freed with the guest (``remove_guest``); the range and view here first."""
        guest = self.guests[name]
        if self.platform.memory.integrity is not None:
            raise HostError(f"{name}: an NVDIMM under a MAC mode (--integrity, --mitigation mac, mac+owner, "
                            "freshness) is not modelled: its media would need the tags too")
        buf = buffer if isinstance(buffer, np.ndarray) else np.frombuffer(buffer, dtype=np.uint8)
        buf = buf.reshape(-1).view(np.uint8)
        index = len(guest.nvdimms)
        rng = self.hpa_ranges.reserve(f"{name}/nvdimm{index}", buf.size, hpa, kind="NVDIMM")
        try:
            self.platform.memory.attach_cpu_view(rng.hpa, buf, guest.keyid)
        except BaseException:
            self.hpa_ranges.release(rng)
            raise
        if hva is None:
            hva = guest.hva + guest.ram.size + sum(nv.size for nv in guest.nvdimms)
        try:
            guest.ept.map(gpa, rng.hpa, buf.size, guest.keyid)
            guest.iommu.map(gpa, rng.hpa, buf.size, guest.keyid)
            guest.vmm.map(hva, rng.hpa, buf.size, guest.keyid)
        except BaseException:
            self.platform.memory.detach_cpu_view(rng.hpa)
            self.hpa_ranges.release(rng)
            raise
        for table in (guest.ept, guest.iommu, guest.vmm):
            table.flush()
        if self.sanitizer is not None:
            self.sanitizer.cpu_write(rng.hpa, buf.size, guest.keyid)
        nv = GuestNvdimm(index, gpa, rng, buf, hva)
        guest.nvdimms.append(nv)
        log.info("%s: NVDIMM %d, %d MiB at GPA %#x, HPA %#x, KeyID %d", name, index, buf.size >> 20, gpa,
                 rng.hpa, guest.keyid)
        return nv

    def _poisoned(self, poison: Poison) -> None:
        """An integrity poison in some VM's RAM: that VM's ``poison_hooks`` hear of it."""
        for guest in self.guests.values():
            if guest.hpa_base <= poison.hpa < guest.hpa_base + guest.ram.size:
                guest.poisoned(poison)

    def remove_guest(self, name: str) -> None:
        """Unbind: detach RAM, free tables and HPA range, drop the key reference."""
        guest = self.guests.pop(name)
        for nv in guest.nvdimms:
            self.platform.memory.detach_cpu_view(nv.hpa)
            self.hpa_ranges.release(nv.hpa_range)
        guest.nvdimms.clear()
        self.platform.memory.detach_cpu_view(guest.hpa_base)
        for table in (guest.ept, guest.vmm, guest.iommu):
            table.free()
        self.hpa_ranges.release(guest.hpa_range)
        self.keys.unuse(guest.key_serial, f"vm:{name}")

    # ------------------------------------------------------------------ queries

    def query(self) -> dict[str, Any]:
        """The whole node: activation, KeyIDs in use and by whom, and every guest's state."""
        layout = self.platform.layout
        return {
            "platform": {
                "maxphyaddr": self.platform.maxphyaddr, "keyid-bits": layout.keyid_bits,
                "x86-phys-bits": self.phys_bits, "packages": self.platform.packages,
                "keyids-usable": self.keyids.max_keyid, "keyids-free": self.keyids.free_count,
                "boot-log": self.boot_log,
                "inconsistent-keyids": [i.keyid for i in self.platform.inconsistencies()],
                "mitigation": self.platform.mitigation, "dimm-alias-bit": self.platform.dimm.alias_bit,
            },
            "keyids": self.keys.table(),
            "guests": {name: g.query() for name, g in sorted(self.guests.items())},
        }
