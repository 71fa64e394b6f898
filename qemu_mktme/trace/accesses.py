"""What the tracer hands out: guest accesses, foreign reads, traffic counts, tracer statistics.

Accesses arrive in bulk as numpy arrays of :data:`ACCESS_DTYPE` (``Watch.batches()``) or one at
a time as :class:`Access` objects; the instruction behind an access is disassembled (capstone,
x86-64) only when asked for, from the bytes the shim captured when it translated it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import NamedTuple
from collections.abc import Callable, Iterator

import numpy as np

from .layout import KIND_STORE, RECORD_DTYPE

KINDS = ("load", "store")

ACCESS_DTYPE = RECORD_DTYPE
"""One guest access in bulk form, exactly the shim's record; ``gpa`` is -1 where the backend
offset has no GPA."""

# The same records with the instruction bytes as one opaque field: tolist() then gives bytes.
_FIELDS = dict(ACCESS_DTYPE.fields or {})
_TUPLE_DTYPE = np.dtype({
    "names": list(_FIELDS),
    "formats": ["V16" if name == "insn" else _FIELDS[name][0] for name in _FIELDS],
    "offsets": [_FIELDS[name][1] for name in _FIELDS],
    "itemsize": ACCESS_DTYPE.itemsize,
})


def access_tuples(batch: np.ndarray) -> list[tuple]:  # type: ignore[type-arg]
    """The rows of a batch as plain tuples, for :meth:`Access.from_tuple` (one C-level pass)."""
    return batch.view(_TUPLE_DTYPE).tolist()  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Instruction:
    """A disassembled guest instruction (capstone, x86-64 mode)."""

    address: int
    bytes: bytes
    mnemonic: str
    op_str: str

    def __str__(self) -> str:
        return f"{self.mnemonic} {self.op_str}".strip()


@functools.lru_cache(maxsize=1)
def _capstone():  # type: ignore[no-untyped-def]
    import capstone
    return capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)


@functools.lru_cache(maxsize=65536)
def disassemble(code: bytes, address: int) -> Instruction | None:
    """The first instruction in ``code`` at ``address``, or None if capstone cannot decode it."""
    for insn in _capstone().disasm(code, address, 1):
        return Instruction(address, bytes(insn.bytes), insn.mnemonic, insn.op_str)
    return None


class Access(NamedTuple):
    """One guest load or store on a watched page (a tuple: cheap to make by the million).

    ``seq`` counts the watched accesses of its vCPU (a gap means records were dropped);
    ``gpa`` is None for backend offsets with no guest-physical address (e.g. the shadowed BIOS
    area); ``keyid`` is the page's KeyID when the access happened.
    """

    vcpu: int
    gpa: int | None
    vaddr: int
    size: int
    kind: str
    pc: int
    seq: int
    keyid: int
    offset: int
    insn_bytes: bytes

    @classmethod
    def from_tuple(cls, t: tuple) -> Access:  # type: ignore[type-arg]
        """From one item of :func:`access_tuples` (the field order of :data:`ACCESS_DTYPE`)."""
        seq, offset, gpa, vaddr, pc, vcpu, keyid, size, kind, insn_len, _flags, insn = t
        return tuple.__new__(cls, (vcpu, gpa if gpa >= 0 else None, vaddr, size, KINDS[kind], pc, seq,
                                   keyid, offset, insn[:insn_len]))

    @classmethod
    def from_row(cls, row: np.void) -> Access:
        return cls.from_tuple(access_tuples(np.array([row], dtype=ACCESS_DTYPE))[0])

    @property
    def is_store(self) -> bool:
        return self.kind == KINDS[KIND_STORE]

    @property
    def instruction(self) -> Instruction | None:
        """The instruction that made the access (None when its bytes were not captured)."""
        return disassemble(self.insn_bytes, self.pc) if self.insn_bytes else None

    def __str__(self) -> str:
        where = f"{self.gpa:#x}" if self.gpa is not None else f"offset {self.offset:#x}"
        return (f"vcpu{self.vcpu} {self.kind} {self.size}B at {where} (vaddr {self.vaddr:#x}) "
                f"by {self.pc:#x}: {self.instruction or '?'}")


def accesses(batch: np.ndarray) -> Iterator[Access]:
    """The rows of an :data:`ACCESS_DTYPE` array as :class:`Access` objects."""
    for t in access_tuples(batch):
        yield Access.from_tuple(t)


@dataclass(frozen=True)
class ForeignRead:
    """The guest loaded bytes that a write through another KeyID had left as garbage."""

    access: Access
    foreign_keyid: int
    line_gpa: int | None
    garbage_bytes: int

    @property
    def instruction(self) -> Instruction | None:
        return self.access.instruction

    def __str__(self) -> str:
        line = f"{self.line_gpa:#x}" if self.line_gpa is not None else "?"
        return (f"foreign read of line {line} (written through KeyID {self.foreign_keyid}, "
                f"{self.garbage_bytes} garbage bytes read): {self.access}")


@dataclass(frozen=True)
class Traffic:
    """Loads, stores and their bytes."""

    loads: int = 0
    stores: int = 0
    load_bytes: int = 0
    store_bytes: int = 0

    @classmethod
    def from_counters(cls, c: np.ndarray) -> Traffic:
        """From a row ``[loads, stores, load_bytes, store_bytes]``."""
        return cls(int(c[0]), int(c[1]), int(c[2]), int(c[3]))

    @property
    def accesses(self) -> int:
        return self.loads + self.stores

    @property
    def bytes(self) -> int:
        return self.load_bytes + self.store_bytes

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(self.loads + other.loads, self.stores + other.stores,
                       self.load_bytes + other.load_bytes, self.store_bytes + other.store_bytes)

    def __sub__(self, other: Traffic) -> Traffic:
        return Traffic(self.loads - other.loads, self.stores - other.stores,
                       self.load_bytes - other.load_bytes, self.store_bytes - other.store_bytes)


@dataclass(frozen=True)
class PageTraffic:
    """The traffic of one 4 KiB page of guest RAM (``gpa`` None: backend offset without a GPA)."""

    gpa: int | None
    offset: int
    keyid: int
    traffic: Traffic


@dataclass(frozen=True)
class TracerStats:
    """What the shim and the consumer report about themselves (totals over vCPUs).

    ``ram_accesses`` were attributed to pages; ``io_*`` went to MMIO and ``other`` to RAM
    outside the guest-RAM backend (ROMs). ``tlb_hit_rate`` is over all of them.
    ``verify_mismatches`` and ``decode_mismatches`` must stay 0: they count software-TLB
    answers and inline meminfo decodings that QEMU's own lookups contradicted.
    ``ring_dropped`` records were lost because a ring was full; ``watch_dropped`` were lost
    because a watcher's queue was full.
    """

    ram_accesses: int
    io_loads: int
    io_stores: int
    other: int
    lookup_failures: int
    tlb_misses: int
    tlb_flushes: int
    verify_checks: int
    verify_mismatches: int
    decode_checks: int
    decode_mismatches: int
    decode_api: bool
    records: int
    ring_dropped: int
    watch_dropped: int
    insns_translated: int
    insns_unique: int
    insns_tlb_flush: int
    vcpu_accesses: tuple[int, ...] = ()           # RAM accesses per vCPU

    @property
    def accesses(self) -> int:
        return self.ram_accesses + self.io_loads + self.io_stores + self.other + self.lookup_failures

    @property
    def tlb_hit_rate(self) -> float:
        return 1.0 - self.tlb_misses / self.accesses if self.accesses else 0.0

    @property
    def overflow(self) -> int:
        """Watched accesses that never reached a watcher."""
        return self.ring_dropped + self.watch_dropped


@dataclass(frozen=True)
class TrafficSnapshot:
    """Traffic per page and per KeyID at one moment; ``later - earlier`` is an interval's.

    ``counts`` is ``[npages, 4]`` (loads, stores, load bytes, store bytes) in backend-offset
    order, ``keyids`` the pages' KeyIDs at the (later) moment, ``seconds`` the interval's
    length (0 for a moment).
    """

    time: float
    counts: np.ndarray
    keyids: np.ndarray
    keyid_totals: dict[int, Traffic]
    gpas: Callable[[np.ndarray], np.ndarray] = field(repr=False)
    seconds: float = 0.0

    def __sub__(self, older: TrafficSnapshot) -> TrafficSnapshot:
        totals = {k: self.keyid_totals.get(k, Traffic()) - older.keyid_totals.get(k, Traffic())
                  for k in set(self.keyid_totals) | set(older.keyid_totals)}
        return TrafficSnapshot(self.time, self.counts - older.counts, self.keyids,
                               {k: t for k, t in totals.items() if t != Traffic()}, self.gpas,
                               self.time - older.time)

    @property
    def totals(self) -> Traffic:
        return Traffic.from_counters(self.counts.sum(axis=0))

    def hottest_pages(self, n: int = 10, by: str = "accesses") -> list[PageTraffic]:
        """The ``n`` busiest pages, by ``"accesses"`` or ``"bytes"``."""
        if by not in ("accesses", "bytes"):
            raise ValueError(f"by must be accesses or bytes, got {by!r}")
        cols = (0, 1) if by == "accesses" else (2, 3)
        score = self.counts[:, cols[0]] + self.counts[:, cols[1]]
        n = min(n, len(score))
        if n <= 0:
            return []
        top = np.argpartition(-score, n - 1)[:n]
        top = top[np.argsort(-score[top], kind="stable")]
        gpas = self.gpas(top.astype(np.uint64) << np.uint64(12))
        return [PageTraffic(int(g) if g >= 0 else None, int(p) << 12, int(self.keyids[p]),
                            Traffic.from_counters(self.counts[p])) for p, g in zip(top, gpas)]
