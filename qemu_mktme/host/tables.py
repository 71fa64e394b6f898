"""KeyID-tagged translation structures, built as real entries in the platform's physical memory.

Three kinds map a VM's memory, each with the VM's KeyID in its leaf entries (mktme.md §1, §5):

- the VM's **EPT** (GPA -> HPA), as KVM's MKTME patches write ``pfn | keyid << (M - k)``;
- the **VMM page table** (QEMU's virtual addresses of guest RAM -> HPA), as
  ``encrypt_mprotect(addr, len, prot, serial)`` tags the VMM's mapping, so that QEMU's own
  device emulation reaches guest memory through the same KeyID;
- an **IOMMU** (VT-d second-level) domain (IOVA = GPA -> HPA) for devices assigned to the VM.

Entries are encoded with :mod:`qemu_mktme.arch` and written through KeyID 0 into host frames;
translations use the architectural walkers over the same memory, so a walk here is what the
hardware would do. 2 MiB leaves are used where both sides are aligned, 4 KiB leaves elsewhere.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from ..arch import ept, paging, vtd
from ..arch.addresses import HPA, PAGE_SIZE, KeyIdLayout
from ..arch.bitfield import BitLayout
from ..arch.entry import entry_address, entry_keyid, make_entry
from ..arch.walk import Translation, WalkFault
from ..engine.memory import PhysicalMemory
from .physmap import FrameAllocator
from .sanitizer import sanitizer_of

SIZE_2M = 1 << 21
_ENTRIES = 512
_PS = 1 << 7


@dataclass(frozen=True)
class Format:
    """How one kind of structure encodes its entries (4 levels: shifts 39, 30, 21, 12)."""

    name: str
    upper: Callable[[KeyIdLayout], list[BitLayout]]        # PML4E, PDPTE, PDE (table pointers)
    leaf_2m: Callable[[KeyIdLayout], BitLayout]
    leaf_4k: Callable[[KeyIdLayout], BitLayout]
    upper_flags: dict[str, int]
    leaf_flags: dict[str, int]
    present: Callable[[int], bool]
    walk: Callable[..., Translation | WalkFault]


EPT = Format(
    "EPT",
    lambda l: [ept.ept_pml4e_layout(l), ept.ept_pdpte_layout(l), ept.ept_pde_layout(l)],
    ept.ept_pde_2m_layout, ept.ept_pte_layout,
    {"r": 1, "w": 1, "x": 1}, {"r": 1, "w": 1, "x": 1, "memory_type": int(ept.MemoryType.WB)},
    lambda raw: bool(raw & 7),
    lambda rq, root, addr, layout: ept.walk_ept(rq, root, addr, layout),
)
VMM = Format(
    "VMM page table",
    lambda l: [paging.pml4e_layout(l), paging.pdpte_layout(l), paging.pde_layout(l)],
    paging.pde_2m_layout, paging.pte_layout,
    {"p": 1, "rw": 1, "us": 1}, {"p": 1, "rw": 1, "us": 1, "xd": 1},   # guest RAM: user RW, not executable
    lambda raw: bool(raw & 1),
    lambda rq, root, addr, layout: paging.walk_ia32e(rq, root, addr, layout),
)
IOMMU = Format(
    "IOMMU second-level",
    lambda l: [vtd.sl_pml4e_layout(l), vtd.sl_pdpe_layout(l), vtd.sl_pde_layout(l)],
    vtd.sl_pde_2m_layout, vtd.sl_pte_layout,
    {"r": 1, "w": 1}, {"r": 1, "w": 1},
    lambda raw: bool(raw & 3),
    lambda rq, root, addr, layout: vtd.walk_vtd_second_level(rq, root, addr, layout, levels=4),
)


@dataclass(frozen=True)
class Leaf:
    """One mapping found by enumerating a structure: ``size`` bytes at ``address`` -> ``hpa``."""

    address: int
    size: int
    hpa: int
    keyid: int


class TranslationTable:
    """A 4-level structure of one :class:`Format` in platform memory, rooted at :attr:`root`."""

    def __init__(self, fmt: Format, memory: PhysicalMemory, layout: KeyIdLayout,
                 frames: FrameAllocator) -> None:
        self.format = fmt
        self.memory = memory
        self.layout = layout
        self._frames_alloc = frames
        self.root: HPA = frames.alloc()
        self._pages: dict[int, list[int]] = {self.root: [0] * _ENTRIES}
        self._dirty: set[int] = {self.root}
        self.generation = 0
        """Bumped by every :meth:`flush` (and :meth:`free`): the entries changed, so any cached
        translation (a device's IOTLB) is stale, as after a VT-d IOTLB invalidation."""
        self.listeners: list[Callable[[], None]] = []
        """Called after each bump (a compiled dataplane's copy of an IOTLB drops it at once)."""

    # ------------------------------------------------------------------ building

    def map(self, address: int, hpa: int, nbytes: int, keyid: int, *, small: bool = False) -> None:
        """Map [address, address + nbytes) to HPA ``hpa`` through ``keyid``; :meth:`flush` after.

        Works per 2 MiB window: a 2 MiB leaf when address, HPA and length allow, else a run of
        4 KiB leaves filled at once (one encoded template; the address field is the HPA itself).
        ``small``: 4 KiB leaves only.
        """
        if address % PAGE_SIZE or hpa % PAGE_SIZE or nbytes % PAGE_SIZE:
            raise ValueError(f"{self.format.name}: mappings are 4 KiB aligned")
        sanitizer = sanitizer_of(self.memory)
        if sanitizer is not None:
            sanitizer.mapped(self, self.format.name, hpa, nbytes, keyid)
        fmt, lay = self.format, self.layout
        template_4k = make_entry(fmt.leaf_4k(lay), 0, keyid, **fmt.leaf_flags)
        template_2m = make_entry(fmt.leaf_2m(lay), 0, keyid, **dict(fmt.leaf_flags, ps=1))
        end = address + nbytes
        while address < end:
            window_end = min(end, (address // SIZE_2M + 1) * SIZE_2M)
            pd = self._table_for(address, depth=2) if window_end - address == SIZE_2M and hpa % SIZE_2M == 0 else 0
            pde = self._pages[pd][(address >> 21) & 0x1FF] if pd else 0
            if pd and not small and (not pde or pde & _PS):    # (a page table there: 4 KiB leaves in it)
                table, index = pd, (address >> 21) & 0x1FF
                make_entry(fmt.leaf_2m(lay), hpa, keyid)   # validates the HPA fits the field
                self._pages[table][index] = template_2m | hpa
            else:
                table = self._table_for(address, depth=3)
                i0, n = (address >> 12) & 0x1FF, (window_end - address) >> 12
                make_entry(fmt.leaf_4k(lay), hpa + (n - 1) * PAGE_SIZE, keyid)   # validates the run
                first = template_4k | hpa
                self._pages[table][i0:i0 + n] = range(first, first + n * PAGE_SIZE, PAGE_SIZE)
            self._dirty.add(table)
            hpa += window_end - address
            address = window_end

    def _table_for(self, address: int, depth: int) -> int:
        """The table at ``depth`` (2: the PD, 3: the PT) for ``address``, created as needed."""
        fmt, lay = self.format, self.layout
        uppers = fmt.upper(lay)
        table = self.root
        for level in range(depth):
            index = (address >> (39 - 9 * level)) & 0x1FF
            entries = self._pages[table]
            if not fmt.present(entries[index]):
                child = self._frames_alloc.alloc()
                self._pages[child] = [0] * _ENTRIES
                self._dirty.add(child)
                entries[index] = make_entry(uppers[level], child, 0, **fmt.upper_flags)
                self._dirty.add(table)
            elif level == 2 and entries[index] & _PS:
                raise ValueError(f"{fmt.name}: {address:#x} is already mapped by a 2 MiB page")
            table = entry_address(uppers[level], entries[index])
        return table

    def unmap(self, address: int, nbytes: int) -> None:
        """Make [address, address + nbytes) not present (4 KiB aligned); :meth:`flush` after.
        A 2 MiB leaf only partly covered is split into 4 KiB leaves first."""
        if address % PAGE_SIZE or nbytes % PAGE_SIZE:
            raise ValueError(f"{self.format.name}: mappings are 4 KiB aligned")
        fmt, lay = self.format, self.layout
        uppers = fmt.upper(lay)
        end = address + nbytes
        while address < end:
            window_end = min(end, (address // SIZE_2M + 1) * SIZE_2M)
            table = self.root
            for level in range(2):                         # down to the PD, if there is one
                entry = self._pages[table][(address >> (39 - 9 * level)) & 0x1FF]
                if not fmt.present(entry):
                    break
                table = entry_address(uppers[level], entry)
            else:
                index = (address >> 21) & 0x1FF
                pde = self._pages[table][index]
                if pde & _PS and window_end - address == SIZE_2M:
                    self._pages[table][index] = 0
                    self._dirty.add(table)
                elif fmt.present(pde):
                    if pde & _PS:                          # split: the same frames as 512 4 KiB leaves
                        leaf = fmt.leaf_2m(lay)
                        base, keyid = entry_address(leaf, pde), entry_keyid(leaf, pde)
                        self._pages[table][index] = 0
                        self.map(address & ~(SIZE_2M - 1), base, SIZE_2M, keyid, small=True)
                        pde = self._pages[table][index]
                    pt = entry_address(uppers[2], pde)
                    i0, n = (address >> 12) & 0x1FF, (window_end - address) >> 12
                    self._pages[pt][i0:i0 + n] = [0] * n
                    self._dirty.add(pt)
            address = window_end

    def flush(self) -> None:
        """Write every changed table page to memory (through KeyID 0, one page per write)."""
        for frame in sorted(self._dirty):
            self.memory.write(frame, struct.pack(f"<{_ENTRIES}Q", *self._pages[frame]))
        self._dirty.clear()
        self._bump()

    def _bump(self) -> None:
        self.generation += 1
        for listener in list(self.listeners):
            listener()

    def retag(self, address: int, keyid: int) -> None:
        """Change the KeyID of the leaf mapping ``address`` (to model a VMM bug, or a re-key)."""
        t = self.walk(address)
        if isinstance(t, WalkFault):
            raise ValueError(f"{self.format.name}: {address:#x} is not mapped ({t})")
        pa = t.leaf.phys_addr
        hpa_of_entry, _ = self.layout.split(pa)
        table, index = hpa_of_entry & ~(PAGE_SIZE - 1), (hpa_of_entry % PAGE_SIZE) // 8
        self._pages[table][index] = t.leaf.entry.layout.replace(self._pages[table][index], keyid=keyid)
        self._dirty.add(table)
        self.flush()
        sanitizer = sanitizer_of(self.memory)
        if sanitizer is not None:
            sanitizer.mapped(self, self.format.name, int(t.hpa) & ~(t.page_size - 1), t.page_size, keyid)

    def free(self) -> None:
        """Give every table frame back (the structure must no longer be in use)."""
        sanitizer = sanitizer_of(self.memory)
        if sanitizer is not None:
            sanitizer.unmapped(self)
        for frame in self._pages:
            self.memory.write(frame, bytes(PAGE_SIZE))
            self._frames_alloc.free(frame)
        self._pages.clear()
        self._bump()

    @property
    def frames(self) -> int:
        return len(self._pages)

    # ------------------------------------------------------------------ reading back

    def walk(self, address: int) -> Translation | WalkFault:
        """The architectural walk of ``address`` over the entries in memory."""
        root: int = self.root
        if self.format is EPT:
            root = ept.make_eptp(self.layout, self.root)
        return self.format.walk(self.memory.read_qword, root, address, self.layout)

    @property
    def pointer(self) -> int:
        """What the hardware is given: the EPTP, CR3, or slptptr value."""
        return ept.make_eptp(self.layout, self.root) if self.format is EPT else int(self.root)

    def spans(self) -> list[Leaf]:
        """The mappings coalesced: runs contiguous in address and HPA with one KeyID, in order.

        Page tables of 4 KiB leaves are decoded a whole table at a time with numpy, so a VMM
        table over GiBs of RAM (262144 leaves per GiB) costs milliseconds, not seconds.
        """
        runs: list[list[int]] = []
        for address, size, hpa, keyid in self._spans(self.root, 0, 0):
            last = runs[-1] if runs else None
            if last and last[0] + last[1] == address and last[2] + last[1] == hpa and last[3] == keyid:
                last[1] += size
            else:
                runs.append([address, size, hpa, keyid])
        return [Leaf(*r) for r in runs]

    def _spans(self, table: int, level: int, base: int) -> Iterator[tuple[int, int, int, int]]:
        fmt, lay = self.format, self.layout
        raw = np.frombuffer(self.memory.read(table, PAGE_SIZE), dtype="<u8")
        if level == 3:
            leaf = fmt.leaf_4k(lay)
            present = np.flatnonzero(_present_mask(fmt, raw))
            if present.size == 0:
                return
            addr_mask = np.uint64(leaf.field("address").mask)
            kf = leaf.field("keyid") if "keyid" in leaf else None
            hpas = raw[present] & addr_mask
            keyids = (raw[present] >> np.uint64(kf.low)) & np.uint64((1 << kf.width) - 1) if kf else np.zeros_like(hpas)
            # break the page into runs where index, HPA and KeyID all continue
            brk = np.flatnonzero((np.diff(present) != 1) | (np.diff(hpas.astype(np.int64)) != PAGE_SIZE)
                                 | (np.diff(keyids) != 0)) + 1
            for a, b in zip(np.r_[0, brk], np.r_[brk, present.size]):
                yield (base | int(present[a]) << 12, int(b - a) * PAGE_SIZE, int(hpas[a]), int(keyids[a]))
            return
        shift = 39 - 9 * level
        for index in np.flatnonzero(_present_mask(fmt, raw)):
            entry = int(raw[index])
            address = base | int(index) << shift
            if level == 2 and entry & _PS:
                leaf = fmt.leaf_2m(lay)
                yield address, SIZE_2M, entry_address(leaf, entry), entry_keyid(leaf, entry)
            else:
                yield from self._spans(entry_address(fmt.upper(lay)[level], entry), level + 1, address)

    def leaves(self) -> Iterator[Leaf]:
        """Every leaf mapping, read back from memory (not from the builder's shadow), in order."""
        yield from self._leaves(self.root, 0, 0)

    def _leaves(self, table: int, level: int, base: int) -> Iterator[Leaf]:
        fmt, lay = self.format, self.layout
        raw_page = struct.unpack(f"<{_ENTRIES}Q", self.memory.read(table, PAGE_SIZE))
        shift = 39 - 9 * level
        for index, raw in enumerate(raw_page):
            if not fmt.present(raw):
                continue
            address = base | index << shift
            if level == 3:
                leaf = fmt.leaf_4k(lay)
                yield Leaf(address, PAGE_SIZE, entry_address(leaf, raw), entry_keyid(leaf, raw))
            elif level == 2 and raw & _PS:
                leaf = fmt.leaf_2m(lay)
                yield Leaf(address, SIZE_2M, entry_address(leaf, raw), entry_keyid(leaf, raw))
            else:
                upper = fmt.upper(lay)[level]
                yield from self._leaves(entry_address(upper, raw), level + 1, address)



def _present_mask(fmt: Format, raw: np.ndarray) -> np.ndarray:
    """The present entries of a table page (EPT: any of R/W/X; IA-32e: P; VT-d: R or W)."""
    bits = {"EPT": 7, "VMM page table": 1, "IOMMU second-level": 3}[fmt.name]
    present: np.ndarray = (raw & np.uint64(bits)) != 0
    return present
