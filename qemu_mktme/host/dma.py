"""A device assigned to a VM doing DMA through the VM's IOMMU domain.

Every access is translated by the VT-d second-level table in platform memory; the HPA and the
KeyID come from the leaf entry, so a domain tagged with the wrong KeyID (or not tagged) makes the
device read ciphertext-as-garbage and write garbage into the guest, as on hardware. A
non-present IOVA is a DMA remapping fault (:class:`DmaFault`).

Translations are cached per leaf in the device's IOTLB, as VT-d hardware does; the cache is
dropped whenever the domain's entries are rewritten (``TranslationTable.generation``, our
stand-in for the VMM's IOTLB invalidation), so a re-tagged domain takes effect on the next DMA.

This module is the one place device memory traffic passes (every device model, such as the
vhost-user-blk backend in ``vhost/``, moves data through :class:`AssignedDevice`): the
foreign-write marking (a write through another KeyID makes the guest's next CPU load of those
lines a foreign read), the device's own observers (its record of mis-tagged DMA, counters,
traces) and the platform's KeyID-aliasing sanitizer, whose rule (c) hears of every transfer
through a KeyID other than the VM's (:meth:`~.sanitizer.Sanitizer.dma`). While that sanitizer
watches, every transfer takes the full path, so rule (a) also sees the lines DMA rewrites.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..arch.addresses import HPA, KeyID
from ..arch.walk import WalkFault
from ..errors import AddressError
from .guest import EncryptedGuest
from .sanitizer import sanitizer_of

log = logging.getLogger(__name__)


class DmaFault(AddressError):
    """The IOMMU refused a DMA address (not mapped, or a reserved-bit fault)."""


@dataclass(frozen=True)
class Dma:
    """One contiguous piece of a transfer as the memory controller sees it."""

    device: str
    direction: str            # "read" (device reads guest memory) or "write"
    iova: int
    hpa: int
    keyid: int
    expected_keyid: int
    nbytes: int

    def __str__(self) -> str:
        return (f"{self.device}: DMA {self.direction} of {self.nbytes} bytes at IOVA {self.iova:#x} "
                f"(HPA {self.hpa:#x}) through KeyID {self.keyid}, VM's KeyID {self.expected_keyid}")


DmaObserver = Callable[[Dma], None]


def dma_quiet(guest: EncryptedGuest) -> AbstractContextManager[None]:
    """Context for the memory accesses of a DMA: the sanitizer's rule (a) stays quiet there, as
    rule (c) has reported the transfer."""
    sanitizer = sanitizer_of(guest.platform.memory)
    return sanitizer.quiet() if sanitizer is not None else nullcontext()


class DmaSanitizer:
    """Reports every DMA whose KeyID differs from the owning VM's (the IOMMU tagged wrongly).

    Each such DMA is kept (the last ``keep``) and counted; the log gets the first of each
    (device, direction, KeyID) kind, so a broken domain does not flood it.
    """

    def __init__(self, keep: int = 4096) -> None:
        self.reports: collections.deque[Dma] = collections.deque(maxlen=keep)
        self.count = 0
        self._logged: set[tuple[str, str, int]] = set()

    def __call__(self, dma: Dma) -> None:
        if dma.keyid == dma.expected_keyid:
            return
        self.count += 1
        self.reports.append(dma)
        kind = (dma.device, dma.direction, dma.keyid)
        if kind not in self._logged:
            self._logged.add(kind)
            log.warning("DMA sanitizer: %s (further ones of this kind are counted, not logged)", dma)


@dataclass
class DmaCounters:
    """Per-device totals, as ``run --trace`` prints them."""

    reads: int = 0
    writes: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    faults: int = 0
    foreign: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class WatchedList(list):  # type: ignore[type-arg]
    """A list that calls ``changed()`` after every change (observers, transfer hooks: whoever
    keeps a faster path while the list holds nothing else must hear of an addition at once)."""

    def __init__(self, changed: Callable[[], None], items: Any = ()) -> None:
        super().__init__(items)
        self._changed = changed


def _watched(name: str) -> Callable[..., Any]:
    def method(self: WatchedList, *args: Any) -> Any:
        out = getattr(list, name)(self, *args)
        self._changed()
        return out
    method.__name__ = name
    return method


for _name in ("append", "extend", "insert", "remove", "pop", "clear", "__setitem__", "__delitem__", "__iadd__"):
    setattr(WatchedList, _name, _watched(_name))


class IotlbMirror(Protocol):
    """A copy of the device's IOTLB for a compiled dataplane (``vhost/native``: ``Mirror``): only
    leaves of the VM's own KeyID, as offsets into the VM's RAM seen through that KeyID."""

    def window(self, index: int, array: np.ndarray) -> None: ...
    def fill(self, iova: int, size: int, offset: int, window: int = 0) -> None: ...
    def clear(self, *, windows: bool = False) -> None: ...
    def take_dma(self) -> tuple[int, int, int, int]: ...


class AssignedDevice:
    """A DMA-capable device in ``guest``'s IOMMU domain."""

    def __init__(self, guest: EncryptedGuest, name: str = "dev0") -> None:
        self.guest = guest
        self.name = name
        self.sanitizer = DmaSanitizer()
        self.observers: list[DmaObserver] = WatchedList(self._mirror_refresh, [self.sanitizer])
        self._counters = DmaCounters()
        self._tlb: dict[tuple[int, int], tuple[int, int]] = {}   # (shift, iova >> shift) -> (hpa base, keyid)
        self._tlb_generation = -1
        self._own: np.ndarray | None = None
        self._mirror: IotlbMirror | None = None

    # ------------------------------------------------------------------ the compiled dataplane's mirror

    @property
    def counters(self) -> DmaCounters:
        """Totals, the DMA a mirror's user did included."""
        if self._mirror is not None:
            reads, read_bytes, writes, write_bytes = self._mirror.take_dma()
            c = self._counters
            c.reads, c.read_bytes, c.writes, c.write_bytes = (c.reads + reads, c.read_bytes + read_bytes,
                                                              c.writes + writes, c.write_bytes + write_bytes)
        return self._counters

    def attach_mirror(self, mirror: IotlbMirror) -> None:
        """Keep ``mirror`` equal to what the fast path may use (:meth:`_fast`) from now on: the
        IOTLB's leaves of the VM's KeyID; emptied (synchronously) when the domain changes
        (``TranslationTable.listeners``), an observer joins or the platform sanitizer starts."""
        self.detach_mirror()
        self._mirror = mirror
        self.guest.iommu.listeners.append(self._mirror_refresh)
        memory = self.guest.platform.memory
        memory.observer_listeners.append(self._mirror_refresh)
        self._mirror_refresh()

    def detach_mirror(self) -> None:
        """Stop feeding the mirror (its user's threads are gone); its counts are taken first."""
        mirror = self._mirror
        if mirror is None:
            return
        self.counters                                     # noqa: B018 (folds the mirror's counts)
        self._mirror = None
        with contextlib.suppress(ValueError):
            self.guest.iommu.listeners.remove(self._mirror_refresh)
        with contextlib.suppress(ValueError):
            self.guest.platform.memory.observer_listeners.remove(self._mirror_refresh)
        mirror.clear(windows=True)

    def _mirror_refresh(self) -> None:
        """The domain, the observers or the platform's sanitizer changed: empty the mirror
        (waiting for the request in flight), then refill it from the IOTLB if the fast path holds."""
        mirror = self._mirror
        if mirror is None:
            return
        mirror.clear()
        fast = self._fast()
        if fast is None:
            return
        tlb, keyid, base, own = fast
        mirror.window(0, own)
        for (shift, frame), (hpa, k) in list(tlb.items()):
            self._mirror_leaf(mirror, shift, frame, hpa, k, keyid, base, own.size)

    @staticmethod
    def _mirror_leaf(mirror: IotlbMirror, shift: int, frame: int, hpa: int, k: int, keyid: int,
                     base: int, size: int) -> None:
        off = hpa - base
        if k == keyid and off >= 0 and off + (1 << shift) <= size:
            mirror.fill(frame << shift, 1 << shift, off)

    def _translate(self, iova: int) -> tuple[int, int, int]:
        """(HPA, KeyID, bytes left in the leaf) for ``iova``, through the IOTLB."""
        table = self.guest.iommu
        if self._tlb_generation != table.generation:
            self._tlb.clear()
            self._tlb_generation = table.generation
        tlb = self._tlb
        for shift in (21, 12):
            hit = tlb.get((shift, iova >> shift))
            if hit is not None:
                off = iova & ((1 << shift) - 1)
                return hit[0] + off, hit[1], (1 << shift) - off
        t = table.walk(iova)
        if isinstance(t, WalkFault):
            self._counters.faults += 1
            raise DmaFault(f"{self.name}: DMA remapping fault at IOVA {iova:#x}: {t}", address=iova)
        size = t.page_size
        shift = size.bit_length() - 1
        off = iova & (size - 1)
        tlb[(shift, iova >> shift)] = (int(t.hpa) - off, int(t.keyid))
        if self._mirror is not None:                       # the compiled dataplane learns it too
            fast = self._fast()
            if fast is not None:
                self._mirror_leaf(self._mirror, shift, iova >> shift, int(t.hpa) - off, int(t.keyid),
                                  fast[1], fast[2], fast[3].size)
        return int(t.hpa), int(t.keyid), size - off

    def translate(self, iova: int) -> tuple[int, int]:
        """(HPA, KeyID) the IOMMU gives ``iova`` (``DmaFault`` if it is not mapped)."""
        hpa, keyid, _ = self._translate(iova)
        return hpa, keyid

    def _runs(self, iova: int, nbytes: int) -> list[tuple[int, int, int, int, int]]:
        """(HPA, KeyID, IOVA, offset into the transfer, length) pieces, contiguous ones merged."""
        if iova < 0 or nbytes < 0:
            raise DmaFault(f"{self.name}: bad DMA range {iova:#x}+{nbytes:#x}", address=iova, nbytes=nbytes)
        hpa, keyid, left = self._translate(iova)
        if nbytes <= left:                                  # the common case: inside one leaf
            return [(hpa, keyid, iova, 0, nbytes)]
        out: list[tuple[int, int, int, int, int]] = []
        done = 0
        while done < nbytes:
            hpa, keyid, left = self._translate(iova + done)
            n = min(nbytes - done, left)
            if out and out[-1][1] == keyid and out[-1][0] + out[-1][4] == hpa:
                h, k, i, o, m = out[-1]
                out[-1] = (h, k, i, o, m + n)
            else:
                out.append((hpa, keyid, iova + done, done, n))
            done += n
        return out

    def _observe(self, direction: str, runs: list[tuple[int, int, int, int, int]]) -> None:
        expected = int(self.guest.keyid)
        everything = len(self.observers) > 1        # only the sanitizer: it needs the mismatches
        platform = sanitizer_of(self.guest.platform.memory)
        for hpa, keyid, iova, _, n in runs:
            if keyid != expected or everything:
                dma = Dma(self.name, direction, iova, hpa, keyid, expected, n)
                for observer in self.observers:
                    observer(dma)
            if platform is not None and keyid != expected:
                platform.dma(device=self.name, vm=self.guest.name, iova=iova, hpa=hpa, keyid=keyid,
                             expected_keyid=expected, direction=direction, nbytes=n)

    def dma_read_arrays(self, iova: int, nbytes: int) -> list[np.ndarray]:
        """What the device reads at ``iova``, as read-only arrays (zero-copy views of the guest's
        RAM where the KeyID is the VM's, decrypted-with-the-wrong-key copies elsewhere)."""
        runs = self._runs(iova, nbytes)
        mem = self.guest.platform.memory
        out = []
        with dma_quiet(self.guest):
            for hpa, k, _, _, n in runs:
                window = mem.cpu_window(hpa, k, n)
                out.append(window if window is not None else mem.read_array(self.guest.layout.compose(HPA(hpa), KeyID(k)), n))
        self._counters.reads += 1
        self._counters.read_bytes += nbytes
        self._observe("read", runs)
        return out

    def dma_read(self, iova: int, nbytes: int) -> bytes:
        """Bytes the device reads at ``iova``."""
        fast = self._fast()
        off = self._hit(fast[0], fast[1], fast[2], fast[3].size, iova, nbytes) if fast else -1
        if off >= 0:
            self._counters.reads += 1
            self._counters.read_bytes += nbytes
            return fast[3][off:off + nbytes].tobytes()          # type: ignore[index]
        return b"".join(a.tobytes() for a in self.dma_read_arrays(iova, nbytes))

    def dma_write(self, iova: int, data: bytes | bytearray | memoryview | np.ndarray) -> None:
        """The device writes ``data`` at ``iova``."""
        view = data.reshape(-1).view(np.uint8) if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
        fast = self._fast()
        off = self._hit(fast[0], fast[1], fast[2], fast[3].size, iova, view.size) if fast else -1
        if off >= 0:
            fast[3][off:off + view.size] = view                  # type: ignore[index]
            self._counters.writes += 1
            self._counters.write_bytes += view.size
            return
        runs = self._runs(iova, view.size)
        guest = self.guest
        mem = guest.platform.memory
        for hpa, keyid, _, off, n in runs:
            window = mem.cpu_window(hpa, keyid, n)
            if window is not None:
                window[:] = view[off:off + n]
                continue
            with dma_quiet(guest):
                mem.write(guest.layout.compose(HPA(hpa), KeyID(keyid)), view[off:off + n])
            if keyid != guest.keyid:
                self._counters.foreign += 1
                guest.foreign_write(guest.gpa_of(hpa), n, keyid)
        self._counters.writes += 1
        self._counters.write_bytes += view.size
        self._observe("write", runs)

    # ------------------------------------------------------------------ scatter-gather

    def _fast(self) -> tuple[dict[tuple[int, int], tuple[int, int]], int, int, np.ndarray] | None:
        """What the scatter-gather fast path needs: the IOTLB, the VM's KeyID, its HPA base and
        the whole of its RAM as the memory controller shows it through that KeyID
        (:meth:`PhysicalMemory.cpu_window`: encryption and decryption cancel out). ``None`` when
        an observer besides the sanitizer wants every transfer, or the platform's sanitizer
        watches (it tracks the KeyID each line was last written with): then all go the full way."""
        if len(self.observers) > 1 or sanitizer_of(self.guest.platform.memory) is not None:
            return None
        g = self.guest
        if self._tlb_generation != g.iommu.generation:
            self._tlb.clear()
            self._tlb_generation = g.iommu.generation
            self._own = None
        if self._own is None:
            self._own = g.platform.memory.cpu_window(g.hpa_base, int(g.keyid), g.ram.size)
            if self._own is None:
                return None
            if self._mirror is not None:
                self._mirror.window(0, self._own)
        return self._tlb, int(g.keyid), int(g.hpa_base), self._own

    def _hit(self, tlb: dict[tuple[int, int], tuple[int, int]], keyid: int, base: int, size: int,
             iova: int, n: int) -> int:
        """Backend offset of segment ``[iova, iova + n)`` on an IOTLB hit inside one leaf of the
        VM's KeyID, else -1 (take the full path, which walks, reports and marks)."""
        for shift in (21, 12):
            hit = tlb.get((shift, iova >> shift))
            if hit is not None:
                off = iova & ((1 << shift) - 1)
                if hit[1] != keyid or off + n > 1 << shift:
                    return -1
                pos = hit[0] + off - base
                return pos if pos >= 0 and pos + n <= size else -1
        return -1

    def dma_write_sg(self, segments: list[tuple[int, int]], data: np.ndarray) -> None:
        """The device writes ``data`` across ``segments`` ((IOVA, length) in order): the same
        translation and KeyID rules as :meth:`dma_write`, one call for a whole request."""
        fast = self._fast()
        pos = done = 0
        for iova, n in segments:
            off = self._hit(fast[0], fast[1], fast[2], fast[3].size, iova, n) if fast else -1
            if off < 0:
                self.dma_write(iova, data[pos:pos + n])
            else:
                fast[3][off:off + n] = data[pos:pos + n]        # type: ignore[index]
                done += n
            pos += n
        if done:
            self._counters.writes += 1
            self._counters.write_bytes += done

    def _views(self, segments: list[tuple[int, int]]) -> list[np.ndarray] | None:
        """Views of the VM's RAM (through its own KeyID) for ``segments`` when every one is
        translated by the IOTLB into a leaf of the VM's KeyID and stays inside it; ``None`` when
        any needs the full path. Misses are walked (filling the IOTLB; a fault raises)."""
        fast = self._fast()
        if fast is None:
            return None
        tlb, keyid, base, own = fast
        size = own.size
        leaves: dict[int, int] = {}                     # 2 MiB frame -> backend offset of the leaf
        out = []
        for iova, n in segments:
            frame = iova >> 21
            at = leaves.get(frame)
            if at is None:
                hit = tlb.get((21, frame))
                if hit is None and tlb.get((12, iova >> 12)) is None:
                    self._translate(iova)               # a miss: walk (or fault), then look again
                    hit = tlb.get((21, frame))
                if hit is None or hit[1] != keyid:      # 4 KiB leaves, or not the VM's KeyID
                    off = self._hit(tlb, keyid, base, size, iova, n)
                    if off < 0:
                        return None
                    out.append(own[off:off + n])
                    continue
                at = leaves[frame] = hit[0] - base
            off = at + (iova & 0x1FFFFF)
            if (iova & 0x1FFFFF) + n > 0x200000 or off < 0 or off + n > size:
                return None
            out.append(own[off:off + n])
        return out

    def dma_write_views(self, segments: list[tuple[int, int]]) -> list[np.ndarray] | None:
        """Writable views of guest RAM for ``segments`` ((IOVA, length) in order), for a device
        that writes them in place (a ``preadv`` straight into guest memory): each segment is
        translated by the IOMMU (a fault is a ``DmaFault``) and must land in one leaf tagged with
        the VM's KeyID, where the memory controller's view through that KeyID is the RAM itself.
        ``None`` when any segment needs the full path (a foreign KeyID, a leaf crossed, an
        observer or the sanitizer watching): then use :meth:`dma_write_sg`. Counted as one write."""
        out = self._views(segments)
        if out is not None:
            self._counters.writes += 1
            self._counters.write_bytes += sum(n for _, n in segments)
        return out

    def dma_read_sg(self, segments: list[tuple[int, int]]) -> list[np.ndarray]:
        """What the device reads across ``segments``, as arrays (see :meth:`dma_read_arrays`)."""
        views = self._views(segments)
        if views is not None:
            self._counters.reads += 1
            self._counters.read_bytes += sum(n for _, n in segments)
            return views
        fast = self._fast()
        out: list[np.ndarray] = []
        done = 0
        for iova, n in segments:
            off = self._hit(fast[0], fast[1], fast[2], fast[3].size, iova, n) if fast else -1
            if off < 0:
                out += self.dma_read_arrays(iova, n)
            else:
                out.append(fast[3][off:off + n])                 # type: ignore[index]
                done += n
        if done:
            self._counters.reads += 1
            self._counters.read_bytes += done
        return out
