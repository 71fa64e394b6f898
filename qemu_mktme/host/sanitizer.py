"""The KeyID-aliasing sanitizer: what a hypervisor developer runs to catch MKTME misuse.

MKTME hardware never complains: a page reached through the wrong KeyID just reads garbage, and
a stale line of an old KeyID silently survives. The sanitizer watches the host model and reports,
with the host call site (or the guest instruction, through the tracer) that caused it:

(a) ``foreign-read``: a CPU read through a KeyID other than the one the line was last written
    with (host reads here; guest loads come from the tracer's foreign-read detection).
(b) ``uncleared-retag``: a page given to a new KeyID (an EPT / VMM / IOMMU leaf re-tagged, or the
    page mapped for another VM) and then read through the new KeyID before the host cleared it
    through that KeyID. (The kernel's MKTME patches flush and clear on every KeyID change.)
(c) ``dma-keyid``: DMA through a KeyID other than the VM's (the device, IOVA, HPA, direction).
(d) ``pconfig-in-use``: PCONFIG reprogramming a KeyID while pages are still mapped with it or a
    VM's RAM is still attached under it.

How it hooks in (every hook is a no-op when no sanitizer is installed):

* :class:`Sanitizer` is the platform memory's ``observer`` (``Host(sanitize=...)`` or
  :meth:`Sanitizer.install`): it hears of every CPU read and write and of every PCONFIG.
* Translation tables call :func:`sanitizer_of` and :meth:`Sanitizer.mapped` /
  :meth:`Sanitizer.unmapped` when they map, re-tag or free.
* The DMA path (:class:`qemu_mktme.host.dma.AssignedDevice`, used by every device model) calls
  :meth:`Sanitizer.dma` for each piece of a transfer through a KeyID other than the VM's;
  device models built elsewhere report through it by moving their data with that class.
* The live layer forwards the tracer's foreign reads (guest instruction, capstone) to
  :meth:`Sanitizer.guest_read`.

Per-line state is kept sparsely (a page's record exists only while one of its lines was last
written through a KeyID other than the default of its range), so a guest running normally costs
nothing here. Hand-written: no library models KeyID aliasing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..arch.addresses import CACHE_LINE_SIZE, PAGE_SHIFT, PAGE_SIZE

log = logging.getLogger(__name__)

RULES = {
    "a": "read through a KeyID other than the line's last writer",
    "b": "page given to a new KeyID without being cleared through it",
    "c": "DMA through a KeyID other than the VM's",
    "d": "KeyID reprogrammed by PCONFIG while pages still use it",
}
_LINES = PAGE_SIZE // CACHE_LINE_SIZE
_PKG = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_INTERNAL = tuple(os.path.join(_PKG, d) + os.sep for d in ("engine", "host", "arch"))


@dataclass(frozen=True)
class SanitizerReport:
    """One finding: the rule, what happened, and where (host call site or guest instruction)."""

    rule: str
    message: str
    site: str
    hpa: int | None = None
    keyid: int | None = None
    expected_keyid: int | None = None
    vm: str | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"sanitizer ({self.rule}) {RULES[self.rule]}: {self.message} [at {self.site}]"


def call_site() -> str:
    """The first caller outside qemu_mktme's engine/host/arch layers, as ``file:line in func``."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None:
        return "?"
    path = frame.f_code.co_filename
    with contextlib.suppress(ValueError):
        rel = os.path.relpath(path)
        path = rel if not rel.startswith("..") else path
    return f"{path}:{frame.f_lineno} in {frame.f_code.co_name}"


@dataclass
class _Mapping:
    table: int
    what: str
    hpa: int
    nbytes: int
    keyid: int


@dataclass
class _Pending:
    """A page given to ``keyid`` whose lines (bit per line in ``cleared``) are not all cleared."""

    keyid: int
    old_keyid: int
    what: str
    site: str
    cleared: int = 0


class Sanitizer:
    """KeyID-aliasing rules (a)-(d) over one host; ``out`` hears of each report as it is made."""

    def __init__(self, out: Callable[[SanitizerReport], None] | None = None) -> None:
        self.out = out
        self.reports: list[SanitizerReport] = []
        self.host: Any = None
        self._memory: Any = None
        self._writers: dict[int, np.ndarray] = {}       # page -> last writer KeyID per line (-1: default)
        self._maps: dict[int, list[_Mapping]] = {}      # id(table) -> its mappings
        self._pending: dict[int, _Pending] = {}         # page -> rule (b) state
        self._seen: set[tuple[Any, ...]] = set()
        self._quiet = 0

    def __repr__(self) -> str:
        return f"<Sanitizer {len(self.reports)} reports>"

    # ------------------------------------------------------------------ installation

    def install(self, host: Any) -> Sanitizer:
        """Watch ``host`` (a :class:`~qemu_mktme.host.host.Host`) from now on."""
        memory = host.platform.memory
        if memory.observer is not None and memory.observer is not self:
            raise ValueError("the platform memory already has an observer")
        memory.observer = self
        self.host, self._memory = host, memory
        for listener in list(memory.observer_listeners):
            listener()                  # DMA fast paths (a dataplane's IOTLB mirror) stop now
        return self

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """Suppress rule (a) inside the block (the DMA path reports rule (c) instead)."""
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    # ------------------------------------------------------------------ reports

    def report(self, rule: str, message: str, *, site: str | None = None, key: tuple[Any, ...] | None = None,
               **fields: Any) -> SanitizerReport | None:
        """Record a report (once per ``key``) and hand it to ``out``."""
        if key is not None:
            if (rule, *key) in self._seen:
                return None
            self._seen.add((rule, *key))
        r = SanitizerReport(rule, message, site if site is not None else call_site(), **fields)
        self.reports.append(r)
        log.info("%s", r)
        if self.out is not None:
            self.out(r)
        return r

    def counts(self) -> dict[str, int]:
        """Reports per rule (every rule listed)."""
        return {rule: sum(r.rule == rule for r in self.reports) for rule in RULES}

    def summary(self) -> list[str]:
        """The lines ``run --sanitize`` prints at exit."""
        counts = self.counts()
        total = sum(counts.values())
        lines = [f"sanitizer summary: {total} report{'s' * (total != 1)}"]
        for rule, text in RULES.items():
            lines.append(f"  ({rule}) {text}: {counts[rule]}")
        return lines

    # ------------------------------------------------------------------ helpers

    def _vm_of(self, hpa: int) -> tuple[str | None, Any]:
        for guest in (self.host.guests.values() if self.host is not None else ()):
            if guest.hpa_base <= hpa < guest.hpa_base + guest.ram.size:
                return guest.name, guest
        return None, None

    def _where(self, hpa: int) -> str:
        name, guest = self._vm_of(hpa)
        if guest is None:
            return f"HPA {hpa:#x}"
        try:
            return f"HPA {hpa:#x} (VM {name}, GPA {int(guest.gpa_of(hpa)):#x})"
        except ValueError:
            return f"HPA {hpa:#x} (VM {name})"

    def _default_keyid(self, hpa: int) -> int:
        """The KeyID DRAM at ``hpa`` is known to be under without a record (attachment), or -1."""
        if self._memory is not None:
            for att in self._memory.attachments:
                if att.hpa <= hpa < att.end:
                    return int(att.keyid)
        return -1

    @staticmethod
    def _lines(hpa: int, nbytes: int) -> Iterator[tuple[int, int, int]]:
        """(page, first line, end line) per page of [hpa, hpa + nbytes)."""
        end = hpa + max(nbytes, 1)
        pos = hpa
        while pos < end:
            page = pos >> PAGE_SHIFT
            stop = min(end, (page + 1) << PAGE_SHIFT)
            yield page, (pos & (PAGE_SIZE - 1)) // CACHE_LINE_SIZE, ((stop - 1) & (PAGE_SIZE - 1)) // CACHE_LINE_SIZE + 1
            pos = stop

    def _pages_in(self, table: dict[int, Any], hpa: int, nbytes: int) -> list[int]:
        first, last = hpa >> PAGE_SHIFT, (hpa + max(nbytes, 1) - 1) >> PAGE_SHIFT
        if last - first + 1 <= len(table):
            return [p for p in range(first, last + 1) if p in table]
        return sorted(p for p in table if first <= p <= last)

    # ------------------------------------------------------------------ memory observer (a), (b)

    def cpu_write(self, hpa: int, nbytes: int, keyid: int) -> None:
        """A CPU write through ``keyid``: it becomes the lines' last writer, and clears rule (b)."""
        for page in self._pages_in(self._pending, hpa, nbytes):
            p = self._pending[page]
            if p.keyid == keyid:
                lo = max(hpa, page << PAGE_SHIFT)
                hi = min(hpa + nbytes, (page + 1) << PAGE_SHIFT)
                a, b = (lo & (PAGE_SIZE - 1)) // CACHE_LINE_SIZE, ((hi - 1) & (PAGE_SIZE - 1)) // CACHE_LINE_SIZE + 1
                p.cleared |= ((1 << (b - a)) - 1) << a
                if p.cleared == (1 << _LINES) - 1:
                    del self._pending[page]
        default = self._default_keyid(hpa)
        if keyid == default and not self._writers:
            return
        for page, a, b in self._lines(hpa, nbytes):
            rec = self._writers.get(page)
            if keyid == default:
                if rec is not None:
                    rec[a:b] = -1
                    if (rec < 0).all():
                        del self._writers[page]
                continue
            if rec is None:
                rec = self._writers[page] = np.full(_LINES, -1, np.int32)
            rec[a:b] = keyid

    def cpu_read(self, hpa: int, nbytes: int, keyid: int) -> None:
        """A CPU read through ``keyid``: rule (b) for uncleared re-tagged pages, else rule (a)."""
        if self._quiet:
            return
        for page in self._pages_in(self._pending, hpa, nbytes):
            p = self._pending[page]
            if p.keyid != keyid:
                continue
            lo, hi = max(hpa, page << PAGE_SHIFT), min(hpa + nbytes, (page + 1) << PAGE_SHIFT)
            a, b = (lo & (PAGE_SIZE - 1)) // CACHE_LINE_SIZE, ((hi - 1) & (PAGE_SIZE - 1)) // CACHE_LINE_SIZE + 1
            if ~p.cleared & (((1 << (b - a)) - 1) << a):
                at = page << PAGE_SHIFT
                self.report("b", f"page {self._where(at)} was given to KeyID {keyid} ({p.what}, at {p.site}) "
                                 f"while it held lines of KeyID {p.old_keyid}, and is read through KeyID {keyid} "
                                 f"before being cleared through it", key=(page, keyid),
                            hpa=at, keyid=keyid, expected_keyid=p.old_keyid, vm=self._vm_of(at)[0])
                return
        default = self._default_keyid(hpa)
        for page, a, b in self._lines(hpa, nbytes):
            rec = self._writers.get(page)
            writers = rec[a:b] if rec is not None else np.full(b - a, -1, np.int32)
            writers = np.where(writers < 0, default, writers)
            bad = np.flatnonzero((writers >= 0) & (writers != keyid))
            if bad.size:
                line = (page << PAGE_SHIFT) + (a + int(bad[0])) * CACHE_LINE_SIZE
                writer = int(writers[bad[0]])
                self.report("a", f"{self._where(line)} read through KeyID {keyid}, last written through KeyID {writer}",
                            key=(line >> PAGE_SHIFT, keyid, writer), hpa=line, keyid=keyid,
                            expected_keyid=writer, vm=self._vm_of(line)[0])
                return

    # ------------------------------------------------------------------ tables (b), (d)

    def mapped(self, table: Any, what: str, hpa: int, nbytes: int, keyid: int) -> None:
        """``table`` (EPT, VMM page table, IOMMU) now maps [hpa, hpa + nbytes) through ``keyid``.

        A page whose lines were last written through another KeyID, or that another live mapping
        reaches through another KeyID, must be cleared through ``keyid`` before it is read.
        """
        site = call_site()
        maps = self._maps.setdefault(id(table), [])
        old = [m for m in maps if m.hpa < hpa + nbytes and hpa < m.hpa + m.nbytes]
        for m in old:                                    # a re-tag replaces the old leaf
            maps.remove(m)
            for s, e in ((m.hpa, hpa), (hpa + nbytes, m.hpa + m.nbytes)):
                if s < e and m.hpa <= s and e <= m.hpa + m.nbytes:
                    maps.append(_Mapping(m.table, m.what, s, e - s, m.keyid))
        previous = {m.keyid for m in old if m.keyid != keyid}
        others = [m for t, ms in self._maps.items() if t != id(table) for m in ms
                  if m.keyid != keyid and m.hpa < hpa + nbytes and hpa < m.hpa + m.nbytes]
        maps.append(_Mapping(id(table), what, hpa, nbytes, keyid))
        for page in self._pages_in(self._writers, hpa, nbytes):
            stale = {int(k) for k in self._writers[page] if k >= 0 and k != keyid}
            if stale:
                self._pending.setdefault(page, _Pending(keyid, min(stale), what, site))
        for k in previous:
            for page in range(hpa >> PAGE_SHIFT, (hpa + nbytes) >> PAGE_SHIFT):
                self._pending.setdefault(page, _Pending(keyid, k, f"{what} re-tagged", site))
        for m in others:
            lo, hi = max(hpa, m.hpa), min(hpa + nbytes, m.hpa + m.nbytes)
            for page in range(lo >> PAGE_SHIFT, hi >> PAGE_SHIFT):
                self._pending.setdefault(page, _Pending(keyid, m.keyid, f"{what} over a page of another {m.what}", site))

    def unmapped(self, table: Any) -> None:
        """``table`` was freed: none of its mappings use a KeyID any more."""
        self._maps.pop(id(table), None)

    def key_programmed(self, keyid: int, package: int, command: str) -> None:
        """Engine hook after a successful PCONFIG: rule (d) if ``keyid`` is still in use."""
        users = [m for ms in self._maps.values() for m in ms if m.keyid == keyid]
        attached = [a for a in (self._memory.attachments if self._memory is not None else ()) if a.keyid == keyid]
        if not users and not attached:
            return
        pages = sum(m.nbytes for m in users) >> PAGE_SHIFT
        whom = sorted({m.what for m in users} | {f"RAM of VM {self._vm_of(a.hpa)[0] or hex(a.hpa)}" for a in attached})
        self.report("d", f"PCONFIG {command} on package {package} reprogrammed KeyID {keyid} while "
                         f"{pages} mapped pages use it ({', '.join(whom)})",
                    keyid=keyid, details={"package": package, "command": command, "pages": pages})

    # ------------------------------------------------------------------ DMA (c)

    def dma(self, *, device: str, vm: str, iova: int, hpa: int, keyid: int, expected_keyid: int,
            direction: str, nbytes: int) -> None:
        """One page of a DMA transfer was translated to (``hpa``, ``keyid``); the VM's KeyID is
        ``expected_keyid``. Rule (c) when they differ. Called by the host model's DMA path."""
        if keyid == expected_keyid:
            return
        self.report("c", f"device {device} of VM {vm} {direction} {nbytes} bytes at IOVA {iova:#x} -> HPA {hpa:#x} "
                         f"through KeyID {keyid}, the VM's is {expected_keyid}",
                    key=(device, iova >> PAGE_SHIFT, keyid, direction), hpa=hpa, keyid=keyid,
                    expected_keyid=expected_keyid, vm=vm,
                    details={"device": device, "iova": iova, "direction": direction, "nbytes": nbytes})

    # ------------------------------------------------------------------ guest side (a)

    def guest_read(self, vm: str, gpa: int | None, hpa: int | None, keyid: int, written_keyid: int,
                   access: Any) -> None:
        """The tracer saw the guest load bytes last written through ``written_keyid``."""
        insn = access.instruction if access is not None else None
        site = f"guest {access.pc:#x}: {insn or '?'} (vCPU {access.vcpu})" if access is not None else "guest"
        where = f"GPA {gpa:#x}" if gpa is not None else "guest RAM"
        self.report("a", f"VM {vm} loaded {where} through KeyID {keyid}, last written through KeyID {written_keyid}",
                    site=site, hpa=hpa, keyid=keyid, expected_keyid=written_keyid, vm=vm)


def sanitizer_of(memory: Any) -> Sanitizer | None:
    """The sanitizer watching ``memory`` (a ``PhysicalMemory``), or None."""
    observer = getattr(memory, "observer", None)
    return observer if isinstance(observer, Sanitizer) else None
