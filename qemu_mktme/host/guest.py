"""A VM's memory as the MKTME host sees it: HPA range, KeyID, tagged tables, and the DRAM view.

The QEMU RAM backend of a running guest is the **CPU view** of the VM's HPA range through the
VM's KeyID: plaintext, as the caches hold it. It is attached to the platform's physical memory
(:meth:`~qemu_mktme.engine.memory.PhysicalMemory.attach_cpu_view`), so that

- the **DRAM view** (what a bus probe reads) is the RAM encrypted per 64-byte line under the
  VM's key with tweak = HPA, computed on demand by the engine for any range. Nothing is cached:
  the guest changes its RAM all the time and a stale ciphertext would be a wrong answer;
- a host access through another KeyID sees garbage, and a host write through another KeyID
  leaves ``decrypt_vm(encrypt_other(data))`` in the guest's RAM, exactly as hardware would.

Backend offset ``o`` lives at HPA ``hpa_base + o`` (the VMM maps the backend linearly), and at
the guest-physical addresses QEMU's layout gives it (q35 splits RAM at 2 GiB / 4 GiB).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..arch.addresses import GPA, HPA, PAGE_SIZE, KeyID, KeyIdLayout
from ..arch.guestmap import GuestMap, GuestRange
from ..arch.walk import WalkFault
from ..engine.integrity import Poison
from ..engine.platform import Platform
from ..engine.xts import XtsKey, decrypt_lines
from ..errors import AddressError
from .physmap import HpaRange
from .tables import TranslationTable

log = logging.getLogger(__name__)

ForeignWriteHook = Callable[[int, int, int], None]
"""hook(gpa, nbytes, keyid): a write through ``keyid`` (not the VM's) landed in guest RAM."""

PoisonHook = Callable[[int, Poison], None]
"""hook(gpa, poison): under integrity, a line of guest RAM will fail its MAC at the next access."""


@dataclass(frozen=True)
class GuestNvdimm:
    """A VM's NVDIMM as the host sees it: its backend (the CPU view, plaintext) at guest-physical
    ``gpa``, placed at ``hpa_range`` and tagged with the VM's KeyID like RAM; its DRAM view is the
    media's content (ciphertext, tweak = HPA)."""

    index: int
    gpa: int
    hpa_range: HpaRange
    buffer: np.ndarray
    hva: int

    @property
    def hpa(self) -> int:
        return self.hpa_range.hpa

    @property
    def size(self) -> int:
        return int(self.buffer.size)


@dataclass(frozen=True)
class Mismatch:
    """A range whose KeyID differs between the VM's structures (the bug the talk warns about)."""

    gpa: int
    nbytes: int
    hpa: int
    ept_keyid: int | None
    vmm_keyid: int | None
    iommu_keyid: int | None

    def __str__(self) -> str:
        return (f"GPA {self.gpa:#x}+{self.nbytes:#x} (HPA {self.hpa:#x}): EPT KeyID {self.ept_keyid}, "
                f"VMM KeyID {self.vmm_keyid}, IOMMU KeyID {self.iommu_keyid}")


def _nonzero(ram: np.ndarray) -> bool:
    """Whether a line-aligned RAM range holds a non-zero byte: as 64-bit words, twice as fast."""
    words = ram.view(np.uint64) if ram.ctypes.data % 8 == 0 and ram.size % 8 == 0 else ram
    return bool(words.any())


class EncryptedGuest:
    """One VM bound to the host model. Built by :meth:`qemu_mktme.host.host.Host.add_guest`."""

    def __init__(self, *, name: str, tenant: str, key_serial: int, keyid: int, platform: Platform,
                 ram: np.ndarray, ranges: list[GuestRange], hpa: HpaRange, hva: int,
                 ept: TranslationTable, vmm: TranslationTable, iommu: TranslationTable,
                 describe_key: Callable[[], dict[str, Any]],
                 extents: Callable[[int, int], list[tuple[int, int]]] | None = None) -> None:
        self.name = name
        self.tenant = tenant
        self.key_serial = key_serial
        self.keyid = KeyID(keyid)
        self.platform = platform
        self.ram = ram
        self.map = GuestMap(ranges, name=name)
        self.ranges = self.map.ranges
        self.hpa_range = hpa
        self.hva = hva
        self.ept, self.vmm, self.iommu = ept, vmm, iommu
        self.foreign_write_hooks: list[ForeignWriteHook] = []
        self.poison_hooks: list[PoisonHook] = []
        self.poisoned_lines: dict[int, Poison] = {}
        self._describe_key = describe_key
        self._extents = extents
        self._iommu_keyid: int | None = None    # the whole domain re-tagged (fault injection)
        self.nvdimms: list[GuestNvdimm] = []
        """Persistent memory of this VM (``Host.add_nvdimm``), in the same tables as its RAM."""

    def __repr__(self) -> str:
        return f"<EncryptedGuest {self.name} KeyID {self.keyid} HPA {self.hpa_base:#x}+{self.ram.size:#x}>"

    @property
    def layout(self) -> KeyIdLayout:
        return self.platform.layout

    @property
    def hpa_base(self) -> HPA:
        return HPA(self.hpa_range.hpa)

    # ------------------------------------------------------------------ addresses

    def hpa_of(self, gpa: GPA | int, nbytes: int = 1) -> HPA:
        """The HPA of ``gpa``, by the VM's memory layout: RAM or an NVDIMM (``AddressError``
        outside both)."""
        try:
            return HPA(self.hpa_base + self.map.offset_of(gpa, nbytes))
        except AddressError:
            for nv in self.nvdimms:
                if nv.gpa <= gpa and gpa + nbytes <= nv.gpa + nv.size:
                    return HPA(nv.hpa + (gpa - nv.gpa))
            raise

    def gpa_of(self, hpa: HPA | int) -> GPA:
        """The guest-physical address of an HPA of this VM (``AddressError`` if none)."""
        return self.map.gpa_of(hpa - self.hpa_base)

    def translate(self, gpa: GPA | int) -> tuple[HPA, KeyID]:
        """GPA -> (HPA, KeyID) by walking the EPT in platform memory, as the CPU would."""
        t = self.ept.walk(gpa)
        if isinstance(t, WalkFault):
            raise AddressError(f"{self.name}: EPT walk of GPA {gpa:#x}: {t}", address=int(gpa))
        return t.hpa, t.keyid

    def set_iommu_keyid(self, keyid: int, gpa: int | None = None, nbytes: int | None = None) -> int:
        """Re-tag the IOMMU leaves covering ``[gpa, gpa + nbytes)`` (default: all of RAM) with
        ``keyid``: the VMM bug of a domain programmed with the wrong KeyID (or the repair, with
        the VM's own). Whole leaves are re-tagged (2 MiB where the domain uses 2 MiB pages).
        Returns how many leaves changed."""
        if not 0 <= keyid <= self.layout.max_keyid:
            raise ValueError(f"KeyID {keyid} is outside 0..{self.layout.max_keyid}")
        lo = 0 if gpa is None else int(gpa)
        hi = (1 << 64) if nbytes is None else lo + int(nbytes)
        if gpa is None and nbytes is None:
            self._iommu_keyid = keyid if keyid != self.keyid else None   # what later mappings get too
        leaves = [leaf for leaf in self.iommu.leaves() if leaf.address < hi and leaf.address + leaf.size > lo]
        for leaf in leaves:
            self.iommu.retag(leaf.address, keyid)
        log.warning("%s: IOMMU domain re-tagged with KeyID %d over %d leaves (VM's KeyID %d)",
                    self.name, keyid, len(leaves), self.keyid)
        return len(leaves)

    def follow(self, ranges: list[GuestRange]) -> bool:
        """The VM's memory map changed (QEMU's memory listener: firmware turning 0xC0000-0xFFFFF
        into RAM through the PAM registers, a reset turning it back): map what appeared and
        unmap what went, in the EPT and the IOMMU domain, as a hypervisor follows its memslots
        and VFIO its DMA mappings. ``ranges`` is all of guest RAM now, by backend offset. Ranges
        must lie in the backend, 4 KiB aligned, with no GPA or backend byte mapped twice
        (``AddressError``). Returns whether anything changed."""
        new = sorted(ranges, key=lambda r: r.gpa)
        for i, r in enumerate(new):
            if r.size <= 0 or r.gpa % PAGE_SIZE or r.size % PAGE_SIZE or r.offset % PAGE_SIZE or r.offset < 0 \
                    or r.offset + r.size > self.ram.size:
                raise AddressError(f"{self.name}: RAM range {r} is not 4 KiB pages of the "
                                   f"{self.ram.size:#x}-byte backend", address=r.gpa)
            if i and new[i - 1].end > r.gpa:
                raise AddressError(f"{self.name}: RAM ranges overlap at GPA {r.gpa:#x}", address=r.gpa)
        by_offset = sorted(new, key=lambda r: r.offset)
        for a, b in zip(by_offset, by_offset[1:]):
            if a.offset + a.size > b.offset:
                raise AddressError(f"{self.name}: backend offset {b.offset:#x} would appear at two GPAs "
                                   f"({a.gpa:#x}, {b.gpa:#x})", address=b.gpa)
        gone, came = _minus(list(self.ranges), new), _minus(new, list(self.ranges))
        if not gone and not came:
            return False
        domain = bool(self.iommu.spans())
        iommu_keyid = self._iommu_keyid if self._iommu_keyid is not None else int(self.keyid)
        for r in gone:
            self.ept.unmap(r.gpa, r.size)
            if domain:
                self.iommu.unmap(r.gpa, r.size)
        for r in came:
            self.ept.map(r.gpa, self.hpa_base + r.offset, r.size, int(self.keyid))
            if domain:
                self.iommu.map(r.gpa, self.hpa_base + r.offset, r.size, iommu_keyid)
        self.ept.flush()
        if domain:
            self.iommu.flush()                      # a new generation: devices' IOTLBs are stale
        self.map = GuestMap(new, name=self.name)
        self.ranges = self.map.ranges
        log.info("%s: memory map now %s (mapped %s; unmapped %s)", self.name, self.map.describe(),
                 ", ".join(f"{r.gpa:#x}+{r.size:#x}" for r in came) or "nothing",
                 ", ".join(f"{r.gpa:#x}+{r.size:#x}" for r in gone) or "nothing")
        return True

    # ------------------------------------------------------------------ views

    def dram(self, gpa: GPA | int, nbytes: int) -> bytes:
        """What DRAM holds for guest-physical ``[gpa, gpa + nbytes)``: the bus view (ciphertext)."""
        return self.platform.memory.read_dram(self.hpa_of(gpa, nbytes), nbytes)

    def dram_array(self, offset: int, nbytes: int, *, out: np.ndarray | None = None) -> np.ndarray:
        """The DRAM view by backend offset (whole-RAM dumps walk the backend linearly)."""
        if offset < 0 or offset + nbytes > self.ram.size:
            raise AddressError(f"{self.name}: backend range {offset:#x}+{nbytes:#x} outside RAM", address=offset)
        return self.platform.memory.read_dram_array(self.hpa_base + offset, nbytes, out=out)

    def iter_dram(self, offset: int = 0, nbytes: int | None = None, chunk_nbytes: int = 4 << 20, *,
                  skip_zero: bool = False) -> Iterator[tuple[int, np.ndarray]]:
        """(backend offset, DRAM bytes) chunks of [offset, offset + nbytes), in one reused buffer:
        consume each chunk before asking for the next.

        Never-written ranges of the backend (``extents`` says where data is) are not read: their
        DRAM content is the encryption of zeros, computed without faulting the guest's memory in
        (reading a shared-memory hole through a mapping would allocate it). With ``skip_zero``,
        chunks whose RAM is all holes or all zero bytes are not yielded at all (a snapshot does
        not store them).
        """
        end = self.ram.size if nbytes is None else offset + nbytes
        if chunk_nbytes <= 0 or chunk_nbytes % 64 or offset % 64 or end % 64:
            raise ValueError("offset, nbytes and chunk_nbytes must be multiples of 64")
        size = min(chunk_nbytes, max(end - offset, 0))
        buf, zeros = np.empty(size, np.uint8), np.zeros(size, np.uint8)
        memory = self.platform.memory
        extents = self.data_extents(offset, end - offset)   # one pass: SEEK_DATA is O(data) per call
        for pos in range(offset, end, chunk_nbytes):
            n = min(chunk_nbytes, end - pos)
            data = _clip(extents, pos, pos + n)
            if skip_zero and not any(_nonzero(self.ram[s:e]) for s, e in data):
                continue
            cur = pos
            for s, e in data:
                if s > cur:
                    memory.dram_image(self.keyid, self.hpa_base + cur, zeros[:s - cur], out=buf[cur - pos:s - pos])
                self.dram_array(s, e - s, out=buf[s - pos:e - pos])
                cur = e
            if cur < pos + n:
                memory.dram_image(self.keyid, self.hpa_base + cur, zeros[:pos + n - cur], out=buf[cur - pos:n])
            yield pos, buf[:n]

    def data_extents(self, offset: int, nbytes: int) -> list[tuple[int, int]]:
        """Line-aligned [start, end) backend ranges within [offset, offset + nbytes) that may hold
        data; the rest has never been written (all of it, when the backend cannot tell)."""
        if self._extents is None:
            return [(offset, offset + nbytes)]
        out = []
        for s, e in self._extents(offset, nbytes):
            s, e = max(offset, s - s % 64), min(offset + nbytes, -(-e // 64) * 64)
            if s < e:
                out.append((s, e))
        return out

    def read(self, gpa: GPA | int, nbytes: int, *, keyid: int | None = None) -> bytes:
        """A host read of guest memory through ``keyid`` (default: the VM's, i.e. plaintext)."""
        k = self.keyid if keyid is None else keyid
        return self.platform.memory.read(self.layout.compose(self.hpa_of(gpa, nbytes), KeyID(k)), nbytes)

    def write(self, gpa: GPA | int, data: bytes | bytearray | memoryview, *, keyid: int | None = None) -> None:
        """A host write into guest memory through ``keyid``; another KeyID leaves garbage."""
        n = len(memoryview(data).cast("B"))
        k = self.keyid if keyid is None else keyid
        self.platform.memory.write(self.layout.compose(self.hpa_of(gpa, n), KeyID(k)), data)
        if k != self.keyid:
            self.foreign_write(gpa, n, k)

    def foreign_write(self, gpa: GPA | int, nbytes: int, keyid: int) -> None:
        """Report that ``nbytes`` at ``gpa`` were written through ``keyid``, not the VM's: every
        :data:`ForeignWriteHook` hears of it (host writes and device DMA alike)."""
        log.info("%s: %d bytes written at GPA %#x through foreign KeyID %d", self.name, nbytes, gpa, keyid)
        for hook in list(self.foreign_write_hooks):
            hook(int(gpa), nbytes, int(keyid))

    def poisoned(self, poison: Poison) -> None:
        """Integrity mode: the line at ``poison.hpa`` fails its MAC; every :data:`PoisonHook` hears
        of it (the live layer makes the guest's next access to it a machine check)."""
        try:
            gpa = self.gpa_of(poison.hpa)
        except AddressError:                      # backend RAM at no GPA (e.g. shadowed BIOS)
            log.warning("%s: line at HPA %#x poisoned (%s)", self.name, poison.hpa, poison.cause)
            return
        self.poisoned_lines[int(gpa)] = poison
        log.info("%s: line at GPA %#x poisoned (%s)", self.name, gpa, poison.cause)
        for hook in list(self.poison_hooks):
            hook(int(gpa), poison)

    def nvdimm_dram(self, index: int, chunk_nbytes: int = 8 << 20) -> Iterator[tuple[int, np.ndarray]]:
        """(offset, DRAM bytes) of NVDIMM ``index``, in one reused buffer: what the module holds,
        AES-XTS under the VM's key with tweak = HPA (the media image is written from this)."""
        nv = self.nvdimms[index]
        buf = np.empty(min(chunk_nbytes, nv.size), np.uint8)
        for off in range(0, nv.size, chunk_nbytes):
            n = min(chunk_nbytes, nv.size - off)
            yield off, self.platform.memory.read_dram_array(nv.hpa + off, n, out=buf[:n])

    def load_nvdimm(self, index: int, offset: int, ciphertext: np.ndarray) -> None:
        """Put media bytes (ciphertext) back on NVDIMM ``index`` at ``offset``: they go into DRAM
        as they are and the memory controller decrypts them with the KeyID's key at *this* HPA,
        so an image written at another HPA (or under another key) reads as garbage, as on hardware."""
        nv = self.nvdimms[index]
        if offset % 64 or ciphertext.size % 64 or offset + ciphertext.size > nv.size:
            raise AddressError(f"{self.name}: NVDIMM {index} range {offset:#x}+{ciphertext.size:#x} is not "
                               "whole lines of the module", address=offset, nbytes=ciphertext.size)
        self.platform.memory.write_dram(nv.hpa + offset, ciphertext)

    def load_nvdimm_in_place(self, index: int, chunk_nbytes: int = 8 << 20) -> None:
        """NVDIMM ``index``'s backend holds the media's bytes (ciphertext, as DRAM would): make
        them the CPU view, i.e. :meth:`load_nvdimm` of the backend's own content, in place."""
        nv = self.nvdimms[index]
        for off in range(0, nv.size, chunk_nbytes):
            self.load_nvdimm(index, off, nv.buffer[off:off + min(chunk_nbytes, nv.size - off)])

    def load_dram_image(self, offset: int, image: bytes | bytearray | memoryview | np.ndarray, image_hpa: int,
                        key: XtsKey) -> None:
        """Bring back a DRAM image of this VM's RAM taken at HPA ``image_hpa`` (a snapshot) into
        backend ``[offset, offset + image.size)``.

        At the same HPA the ciphertext goes into DRAM as it is, and the memory controller decrypts
        it with the KeyID's key. Elsewhere the tweak differs: the host decrypts with the tenant's
        key, as a hypervisor relocating the VM must, and writes the plaintext through the VM's KeyID.
        """
        image = np.frombuffer(image, np.uint8) if not isinstance(image, np.ndarray) else image
        if image.size % 64 or offset % 64 or offset + image.size > self.ram.size:
            raise AddressError(f"{self.name}: DRAM image {offset:#x}+{image.size:#x} is not whole lines of RAM",
                               address=offset, nbytes=image.size)
        hpa = self.hpa_base + offset
        # Under integrity a DRAM write would leave every line's tag stale (poison): the restore goes
        # through the KeyID instead, as a TDX import re-encrypts through the TD's KeyID.
        if image_hpa == hpa and self.platform.memory.integrity is None:
            self.platform.memory.write_dram(hpa, image)
        else:
            plain = decrypt_lines(key, image, image_hpa)
            self.platform.memory.write(self.layout.compose(HPA(hpa), self.keyid), plain)

    # ------------------------------------------------------------------ checks and queries

    def find_in_dram(self, needle: bytes) -> int | None:
        """Backend offset of the first ``needle`` in the whole DRAM view (across chunk borders), or None."""
        tail = b""
        for offset, chunk in self.iter_dram(chunk_nbytes=16 << 20):
            data = tail + chunk.tobytes()
            pos = data.find(needle)
            if pos >= 0:
                return offset - len(tail) + pos
            tail = data[-(len(needle) - 1):] if len(needle) > 1 else b""
        return None

    def check_consistency(self) -> list[Mismatch]:
        """Ranges of guest RAM whose EPT, VMM and IOMMU KeyIDs are not all the VM's KeyID.

        Read back from the entries in platform memory, so a VMM page table tagged with another
        KeyID (QEMU's devices would read garbage) or an untagged IOMMU domain are reported.
        """
        def by_hpa(table: TranslationTable) -> tuple[list[int], list[tuple[int, int, int]]]:
            spans = sorted((leaf.hpa, leaf.hpa + leaf.size, leaf.keyid) for leaf in table.spans())
            return [s[0] for s in spans], spans

        maps = {"ept": by_hpa(self.ept), "vmm": by_hpa(self.vmm), "iommu": by_hpa(self.iommu)}

        def keyid_at(kind: str, hpa: int) -> tuple[int | None, int]:
            starts, spans = maps[kind]
            i = bisect.bisect_right(starts, hpa) - 1
            if i >= 0 and hpa < spans[i][1]:
                return spans[i][2], spans[i][1]
            nxt = spans[i + 1][0] if i + 1 < len(spans) else 1 << 64
            return None, nxt

        out: list[Mismatch] = []
        spans = [(r.gpa, self.hpa_base + r.offset, r.size) for r in self.ranges]
        spans += [(nv.gpa, nv.hpa, nv.size) for nv in self.nvdimms]
        for gpa0, hpa0, size in spans:
            pos, end = hpa0, hpa0 + size
            while pos < end:
                found = [keyid_at(kind, pos) for kind in ("ept", "vmm", "iommu")]
                step_end = min([end] + [e for _, e in found])
                keyids = [k for k, _ in found]
                if any(k != self.keyid for k in keyids):
                    gpa = gpa0 + (pos - hpa0)
                    prev = out[-1] if out else None
                    if prev and prev.hpa + prev.nbytes == pos and (prev.ept_keyid, prev.vmm_keyid, prev.iommu_keyid) == tuple(keyids):
                        out[-1] = Mismatch(prev.gpa, prev.nbytes + step_end - pos, prev.hpa, *keyids)
                    else:
                        out.append(Mismatch(gpa, step_end - pos, pos, *keyids))
                pos = step_end
        return out

    def describe_key(self) -> dict[str, Any]:
        """The VM key's type, algorithm and state (never its bytes)."""
        return self._describe_key()

    def query(self) -> dict[str, Any]:
        """The VM's encryption state, shaped like QEMU's ``query-sev``."""
        key = self._describe_key()
        return {
            "name": self.name,
            "enabled": key["type"] not in ("clear", "no-encrypt"),
            "tenant": self.tenant,
            "handle": f"{self.key_serial:#x}",
            "keyid": int(self.keyid),
            "key-type": key["type"],
            "algorithm": key["algorithm"],
            "key-state": key["state"],
            "keyid-bits": self.layout.keyid_bits,
            "hpa": {"base": f"{self.hpa_base:#x}", "size": self.ram.size},
            "ram": [{"gpa": f"{r.gpa:#x}", "size": r.size, "hpa": f"{self.hpa_base + r.offset:#x}"} for r in self.ranges],
            "eptp": f"{self.ept.pointer:#x}",
            "vmm-cr3": f"{self.vmm.pointer:#x}",
            "vmm-hva": f"{self.hva:#x}",
            "iommu-slptptr": f"{self.iommu.pointer:#x}",
            "nvdimms": [{"gpa": f"{nv.gpa:#x}", "size": nv.size, "hpa": f"{nv.hpa:#x}"} for nv in self.nvdimms],
            "consistent": not self.check_consistency(),
        }



def _minus(a: list[GuestRange], b: list[GuestRange]) -> list[GuestRange]:
    """The parts of mappings ``a`` that ``b`` does not map the same way (same GPA, same offset)."""
    out = []
    for r in a:
        pieces = [(r.gpa, r.end)]
        for q in b:
            if q.gpa - q.offset != r.gpa - r.offset:
                continue
            nxt = []
            for s, e in pieces:
                if q.end <= s or e <= q.gpa:
                    nxt.append((s, e))
                    continue
                if s < q.gpa:
                    nxt.append((s, q.gpa))
                if q.end < e:
                    nxt.append((q.end, e))
            pieces = nxt
        out += [GuestRange(s, e - s, r.offset + s - r.gpa) for s, e in pieces]
    return out


def _clip(extents: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """``extents`` (sorted, disjoint) cut to [start, end)."""
    i = max(bisect.bisect_right(extents, (start, 1 << 62)) - 1, 0)
    out = []
    for s, e in extents[i:]:
        if s >= end:
            break
        if e > start:
            out.append((max(s, start), min(e, end)))
    return out
