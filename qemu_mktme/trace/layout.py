"""The shared region between the TCG plugin shim and Python, as numpy dtypes (layout version 1).

The same layout is written in C in ``shim/mktme_shim.c`` with ``_Static_assert`` on every struct
size; here each dtype's ``itemsize`` is asserted at import, and at attach time the shim's own
``sizeof`` values (which it writes into the header) are compared with these. Sections, each
4 KiB aligned, in this order::

    header                                    4 KiB
    vcpu        VCPU_DTYPE      [nvcpus]      ring indices, TLB stamp, statistics; each vCPU's
                                              block continues with the shim's software TLB
    attrs       PAGE_ATTR_DTYPE [npages]      written by Python: KeyID and watch flags
    page_ctr    COUNTERS_DTYPE  [nvcpus, npages]
    rings       RECORD_DTYPE    [nvcpus, ring_entries]

Pages are indexed by their **offset in the guest-RAM backend** divided by 4 KiB, not by GPA:
on q35 RAM above 4 GiB starts at backend offset 2 GiB (or 2.75 GiB), so a GPA-indexed table
would have a 2 GiB hole. :class:`~qemu_mktme.qemu.guestram.GuestRAM` converts between the two.

The shim does not count per KeyID: on every access that would be one more counter update on
the hot path, and a page's KeyID is Python's to change anyway. Python folds a page's counters
into its old KeyID's total when it re-keys the page (:class:`~qemu_mktme.trace.ledger.KeyIdLedger`).
Nor does its hit path write ``page_ctr``: it counts in the software-TLB entry it has just read
and moves those counts to the page later; read counters through :meth:`SharedRegion.counts`.

The region lives in a memfd that QEMU inherits (no file to leak, nothing on disk); the shim
opens it as ``/proc/self/fd/N``.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..arch.guestmap import GuestRange
from ..errors import ShimError

MAGIC = int.from_bytes(b"MKTMESHM", "little")
LAYOUT_VERSION = 1
HEADER_BYTES = 4096
NKEYIDS = 1 << 15                      # KeyIDs 0 .. 2^15 - 1 (KEYID_BITS <= 15)
MAX_RANGES = 8
STLB_ENTRIES = 4096                    # the shim's software TLB per vCPU (64-byte entries)
STLB_ENTRY_BYTES = 64

KIND_LOAD, KIND_STORE = 0, 1
WATCH_LOAD, WATCH_STORE = 1 << KIND_LOAD, 1 << KIND_STORE
STATE_CREATED, STATE_ATTACHED, STATE_EXITED = 0, 1, 2
PHYS_RAMADDR, PHYS_GPA = 0, 1
PHYS_MODES = {"ramaddr": PHYS_RAMADDR, "gpa": PHYS_GPA}

u8, u16, u32, u64 = np.uint8, np.uint16, np.uint32, np.uint64

RANGE_DTYPE = np.dtype([("gpa", u64), ("size", u64), ("offset", u64)], align=True)

HEADER_DTYPE = np.dtype([
    # Python, at creation
    ("magic", u64), ("layout_version", u32), ("header_size", u32), ("region_size", u64),
    ("npages", u64), ("nvcpus", u32), ("ring_entries", u32), ("vcpu_block", u32), ("record_size", u32),
    ("vcpu_offset", u64), ("attr_offset", u64), ("page_ctr_offset", u64), ("ring_offset", u64),
    # Python, before the vCPUs first run
    ("ram_base", u64), ("nranges", u32), ("configured", u32), ("ranges", RANGE_DTYPE, (MAX_RANGES,)),
    # the shim, at install
    ("shim_state", u32), ("shim_abi", u32), ("qemu_api_min", u32), ("qemu_api_cur", u32),
    ("max_vcpus", u32), ("phys_mode", u32),
    ("sizeof_header", u32), ("sizeof_vcpu", u32), ("sizeof_record", u32), ("sizeof_page_attr", u32),
    ("sizeof_counters", u32), ("tlb_entries", u32), ("verify_period", u32), ("mode", u32),
    ("shim_pid", u64), ("insns_translated", u64), ("insns_unique", u64), ("insns_untracked", u64),
    ("insns_tlb_flush", u64), ("decode_api", u32), ("_pad0", u32),
], align=True)

VCPU_DTYPE = np.dtype([
    ("head", u64), ("seq", u64), ("dropped", u64), ("_pad0", u64, (5,)),
    ("tail", u64), ("_pad1", u64, (7,)),
    # the hit path's line: Python writes attr_gen (after changing watch flags), the shim the rest
    ("attr_gen", u32), ("gen", u32), ("verify_left", u32), ("_pad2a", u32), ("tlb_key", u64),
    ("_pad2", u32, (10,)),
    ("io", u64, (2,)), ("other", u64), ("lookup_failures", u64), ("tlb_misses", u64),
    ("tlb_flushes", u64), ("verify_checks", u64), ("verify_mismatches", u64),
    ("mismatch_vaddr", u64), ("mismatch_cached", u64), ("mismatch_actual", u64),
    ("callbacks", u64), ("decode_checks", u64), ("decode_mismatches", u64),
    # the software TLB's counts (see SharedRegion.counts)
    ("fold_seq", u64), ("folded_gen", u32), ("_pad3a", u32), ("folds", u64), ("_pad3", u64, (7,)),
], align=True)

PAGE_ATTR_DTYPE = np.dtype([("keyid", u16), ("watch", u8), ("reserved", u8)], align=True)

COUNTERS_DTYPE = np.dtype([("n", u64, (2,)), ("bytes", u64, (2,))], align=True)

STLB_DTYPE = np.dtype([("key", u64), ("attr_gen", u32), ("page", u32), ("counts", u64, (4,)),
                       ("_pad", u64, (2,))], align=True)
"""A software-TLB entry: the shim's own, read by Python only for the hits it holds (``counts``,
laid out as ``COUNTERS_DTYPE``) that are not yet in ``page``'s counters."""

RECORD_DTYPE = np.dtype([
    ("seq", u64), ("offset", u64), ("gpa", np.int64), ("vaddr", u64), ("pc", u64), ("vcpu", u16),
    ("keyid", u16), ("size", u8), ("kind", u8), ("insn_len", u8), ("flags", u8), ("insn", u8, (16,)),
], align=True)
"""One access to a watched page. ``gpa`` is -1 where the backend offset has no GPA; the shim
writes it from the range table, so a copy of a ring is ready to hand out as it is."""

# The C side asserts the same numbers (mktme_shim.c, _Static_assert).
assert HEADER_DTYPE.itemsize == 392 and HEADER_DTYPE.itemsize <= HEADER_BYTES
assert VCPU_DTYPE.itemsize == 384 and VCPU_DTYPE.fields is not None and VCPU_DTYPE.fields["tail"][1] == 64
assert VCPU_DTYPE.fields["attr_gen"][1] == 128 and VCPU_DTYPE.fields["gen"][1] == 132
assert PAGE_ATTR_DTYPE.itemsize == 4
assert COUNTERS_DTYPE.itemsize == 32
assert STLB_DTYPE.itemsize == STLB_ENTRY_BYTES
assert RECORD_DTYPE.itemsize == 64

_SHIM_SIZES = {"sizeof_header": HEADER_DTYPE, "sizeof_vcpu": VCPU_DTYPE, "sizeof_record": RECORD_DTYPE,
               "sizeof_page_attr": PAGE_ATTR_DTYPE, "sizeof_counters": COUNTERS_DTYPE}


def field_offset(dtype: np.dtype, name: str) -> int:
    """Byte offset of field ``name`` in a structured dtype."""
    assert dtype.fields is not None
    return int(dtype.fields[name][1])


def _page_align(n: int) -> int:
    return (n + 4095) & ~4095


@dataclass(frozen=True)
class Geometry:
    """Section offsets and the region size for a guest. The header carries them; the shim reads
    them from there and only checks them (it computes no layout of its own)."""

    npages: int
    nvcpus: int
    ring_entries: int

    def __post_init__(self) -> None:
        if not 0 < self.npages < 1 << 32:
            raise ValueError(f"npages must be in 1 .. 2^32 - 1, got {self.npages}")
        if not 0 < self.nvcpus <= 4096:
            raise ValueError(f"nvcpus must be in 1 .. 4096, got {self.nvcpus}")
        if self.ring_entries < 2 or self.ring_entries & (self.ring_entries - 1) or self.ring_entries > 1 << 24:
            raise ValueError(f"ring_entries must be a power of two in 2 .. 2^24, got {self.ring_entries}")

    @property
    def vcpu_block(self) -> int:
        """Bytes per vCPU: its ``VCPU_DTYPE`` header, then the shim's software TLB."""
        return _page_align(VCPU_DTYPE.itemsize + STLB_ENTRIES * STLB_ENTRY_BYTES)

    @property
    def vcpu_offset(self) -> int:
        return HEADER_BYTES

    @property
    def attr_offset(self) -> int:
        return self.vcpu_offset + self.nvcpus * self.vcpu_block

    @property
    def page_ctr_offset(self) -> int:
        return _page_align(self.attr_offset + self.npages * PAGE_ATTR_DTYPE.itemsize)

    @property
    def ring_offset(self) -> int:
        return _page_align(self.page_ctr_offset + self.nvcpus * self.npages * COUNTERS_DTYPE.itemsize)

    @property
    def region_size(self) -> int:
        return _page_align(self.ring_offset + self.nvcpus * self.ring_entries * RECORD_DTYPE.itemsize)


class SharedRegion:
    """The shared region in a memfd: created and initialised here, opened by the shim.

    Attributes are numpy views straight over the mapping (no copies): ``header`` (a 0-d
    record), ``vcpu`` ``[nvcpus]`` (strided: one per vCPU block), ``attrs`` ``[npages]``,
    ``page_ctr`` ``[nvcpus, npages]``, ``rings`` ``[nvcpus, ring_entries]``.
    """

    def __init__(self, geometry: Geometry) -> None:
        self.geometry = g = geometry
        self._closed = False
        try:
            self.fd = os.memfd_create("qemu-mktme-shim", os.MFD_CLOEXEC)
        except OSError as err:
            raise ShimError(f"cannot create the shim's shared region: {err.strerror}") from err
        try:
            os.fchmod(self.fd, 0o600)
            os.ftruncate(self.fd, g.region_size)
            self._mmap = mmap.mmap(self.fd, g.region_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as err:
            os.close(self.fd)
            raise ShimError(f"cannot size the shim's shared region ({g.region_size} bytes): "
                            f"{err.strerror}") from err
        buf = self._mmap
        self.header = np.ndarray((), HEADER_DTYPE, buf, 0)
        self.vcpu = np.ndarray((g.nvcpus,), VCPU_DTYPE, buf, g.vcpu_offset, strides=(g.vcpu_block,))
        self.attrs = np.ndarray((g.npages,), PAGE_ATTR_DTYPE, buf, g.attr_offset)
        self.page_ctr = np.ndarray((g.nvcpus, g.npages), COUNTERS_DTYPE, buf, g.page_ctr_offset)
        self.rings = np.ndarray((g.nvcpus, g.ring_entries), RECORD_DTYPE, buf, g.ring_offset)
        # plain views for the consumer: one aligned 8-byte load or store per index
        self.page_counts = np.ndarray((g.nvcpus, g.npages, 4), u64, buf, g.page_ctr_offset)
        self.heads = np.ndarray((g.nvcpus,), u64, buf, g.vcpu_offset + field_offset(VCPU_DTYPE, "head"),
                                strides=(g.vcpu_block,))
        self.tails = np.ndarray((g.nvcpus,), u64, buf, g.vcpu_offset + field_offset(VCPU_DTYPE, "tail"),
                                strides=(g.vcpu_block,))
        self.tlb = np.ndarray((g.nvcpus, STLB_ENTRIES), STLB_DTYPE, buf, g.vcpu_offset + VCPU_DTYPE.itemsize,
                              strides=(g.vcpu_block, STLB_DTYPE.itemsize))
        self._attr_gen = 0
        h = self.header
        h["magic"], h["layout_version"], h["header_size"] = MAGIC, LAYOUT_VERSION, HEADER_DTYPE.itemsize
        h["region_size"], h["npages"], h["nvcpus"] = g.region_size, g.npages, g.nvcpus
        h["ring_entries"], h["vcpu_block"], h["record_size"] = g.ring_entries, g.vcpu_block, RECORD_DTYPE.itemsize
        for name in ("vcpu_offset", "attr_offset", "page_ctr_offset", "ring_offset"):
            h[name] = getattr(g, name)

    @property
    def size(self) -> int:
        return self.geometry.region_size

    @property
    def child_path(self) -> str:
        """The path under which a child that inherited ``fd`` opens the region."""
        return f"/proc/self/fd/{self.fd}"

    def check_attached(self, *, expected_abi: int) -> None:
        """Raise ``ShimError`` unless the shim attached and agrees on every struct size."""
        h = self.header
        state = int(h["shim_state"])
        if state == STATE_CREATED:
            raise ShimError("the shim did not attach to its shared region (was QEMU started with the "
                            "configuration Tracer.configure() returned?)")
        mismatched = [f"{name[7:]}: shim {int(h[name])} bytes, Python {dt.itemsize}"
                      for name, dt in _SHIM_SIZES.items() if int(h[name]) != dt.itemsize]
        if mismatched:
            raise ShimError("the shim and Python disagree on the shared layout: " + "; ".join(mismatched))
        if int(h["shim_abi"]) != expected_abi:
            raise ShimError(f"the loaded shim speaks plugin API {int(h['shim_abi'])}, expected {expected_abi}")

    def set_ram_layout(self, ram_base: int, ranges: Sequence[GuestRange]) -> None:
        """Tell the shim where guest RAM is: its RAMBlock address and the guest's memory map
        (the shim's own GPA <-> offset lookups read this table; it computes none)."""
        if len(ranges) > MAX_RANGES:
            raise ShimError(f"guest RAM has {len(ranges)} ranges; the shim takes at most {MAX_RANGES}")
        h = self.header
        for i, r in enumerate(ranges):
            h["ranges"][i] = (r.gpa, r.size, r.offset)
        h["ram_base"] = ram_base
        h["nranges"] = len(ranges)
        h["configured"] = 1

    def bump_attr_gen(self) -> int:
        """Tell every vCPU that watch flags changed, and ask it to fold its TLB's counts; the new
        generation (the shim sets ``folded_gen`` to it when it has folded)."""
        self._attr_gen = (self._attr_gen + 1) & 0xFFFF_FFFF    # after the flags: x86 keeps the order
        self.vcpu["attr_gen"] = self._attr_gen
        return self._attr_gen

    def counts(self, wait: float = 0.005) -> np.ndarray:
        """Per vCPU and page: loads, stores, load bytes, store bytes, every access so far counted.

        The shim's hit path counts in its software-TLB entries and moves the counts to the
        pages' counters later (mktme_shim.c, "fold"). So: ask every vCPU to fold and wait up
        to ``wait`` seconds; a running vCPU does so at its next access, after which its page
        counters hold everything until the request. A vCPU that does not answer is not running
        (paused, halted, QEMU gone): its page counters plus its entries' counts, read between
        two equal even ``fold_seq``, are exact. A view of the counters when every vCPU folded,
        else a copy.
        """
        gen = self.bump_attr_gen()
        folded = self.vcpu["folded_gen"]
        deadline = time.monotonic() + (wait if int(self.header["shim_state"]) == STATE_ATTACHED else 0)
        while not (folded == gen).all() and time.monotonic() < deadline:
            time.sleep(0)
        if (folded == gen).all():
            return self.page_counts
        out = self.page_counts.copy()
        for cpu in np.flatnonzero(folded != gen):
            while True:
                seq = int(self.vcpu["fold_seq"][cpu])
                if int(folded[cpu]) == gen:               # it ran after all, and folded
                    out[cpu] = self.page_counts[cpu]
                    break
                if seq & 1:
                    time.sleep(0)
                    continue
                counts = self.page_counts[cpu].copy()
                pages = self.tlb["page"][cpu].astype(np.intp)
                held = self.tlb["counts"][cpu].copy()
                if int(self.vcpu["fold_seq"][cpu]) == seq:
                    np.add.at(counts, pages, held)
                    out[cpu] = counts
                    break
        return out

    def close(self) -> None:
        """Unmap and close; numpy views taken from this region must be gone first."""
        if self._closed:
            return
        self._closed = True
        for name in ("header", "vcpu", "attrs", "page_ctr", "rings", "page_counts", "heads", "tails", "tlb"):
            self.__dict__.pop(name, None)
        with contextlib.suppress(BufferError):  # a caller still holds a view: the mapping goes with the last one
            self._mmap.close()
        os.close(self.fd)
