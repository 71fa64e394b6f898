"""Guest memory traffic from the TCG plugin shim: counts per page and KeyID, watches, foreign reads.

The shim (``shim/mktme_shim.c``) runs inside QEMU and attributes every guest load and store to
a page of guest RAM; Python reads its shared region (``shim_layout.py``) directly. Nothing here
runs per access: counters are read as numpy arrays, and the accesses to watched pages come
through per-vCPU rings that a background task drains in bulk.

    tracer = Tracer()
    async with tracer, Machine(tracer.configure(config)) as vm:
        await tracer.start(vm)                         # checks the shim, then runs the guest
        tracer.set_keyid(0x200000, 4096, 3)
        async with tracer.watch(0x200000, 4096, on="store") as stores:
            await vm.console.write("write 0x200000 TOP SECRET\\n")
            first = await anext(stores)                # an Access: gpa, size, instruction ...
        print(tracer.keyid_totals()[3])

Guarantees: a slow or stopped consumer never stalls the guest (a full ring drops records and
counts them, ``stats().ring_dropped``); a watcher that does not keep up loses records from its
own queue, also counted (``watch_dropped``). Registration is synchronous: ``watch()`` and
``wait_for_access()`` see every access that happens after they return.

The consumer relies on x86-64 store ordering (TSO) between the shim's release of a ring head
and Python's plain loads; it refuses to run on other hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import platform
import re
import weakref
from collections import deque
from typing import Any
from collections.abc import AsyncIterator, Callable, Generator

import numpy as np

from ..errors import AccessTimeout, AddressError, ShimError, logged
from .accesses import (ACCESS_DTYPE, Access, ForeignRead, PageTraffic, Traffic, TracerStats,
                       TrafficSnapshot, access_tuples)
from ..qemu.binary import find_qemu
from .foreign import ForeignLines
from .ledger import KeyIdLedger
from ..qemu.guestram import GuestRAM
from ..qemu.machine import Machine, MachineConfig, VmState
from .shim import abi_for, build_shim, phys_mode_for
from ..arch.addresses import PAGE_SHIFT, PAGE_SIZE
from .layout import (KIND_LOAD, KIND_STORE, LAYOUT_VERSION, NKEYIDS, WATCH_LOAD, WATCH_STORE, Geometry,
                     SharedRegion)

log = logging.getLogger(__name__)

ON_KINDS = {"load": (KIND_LOAD,), "store": (KIND_STORE,), "both": (KIND_LOAD, KIND_STORE)}
DEFAULT_QUEUE_LIMIT = 1 << 20


class TracerState(enum.Enum):
    """Where a tracer is in its life."""

    IDLE = "idle"                   # created
    CONFIGURED = "configured"       # region created, machine configuration returned
    RUNNING = "running"             # attached to a machine, consuming
    CLOSED = "closed"


def _check_on(on: str) -> tuple[int, ...]:
    try:
        return ON_KINDS[on]
    except KeyError:
        raise ValueError(f"on must be one of {', '.join(ON_KINDS)}, got {on!r}") from None


class _Subscription:
    """Items delivered by the tracer's consumer to one reader, in a bounded queue."""

    def __init__(self, tracer: Tracer, limit: int) -> None:
        self._tracer: Tracer | None = tracer
        self._items: deque[object] = deque()
        self._pending = 0
        self._limit = limit
        self._wakeup = asyncio.Event()
        self._ended = False
        self._error: BaseException | None = None
        self.dropped = 0

    @property
    def pending(self) -> int:
        """Items queued and not read yet."""
        return self._pending

    def _push(self, item: object, count: int) -> None:
        """Queue ``item`` (``count`` accesses); what does not fit is dropped and counted."""
        room = self._limit - self._pending
        if count > room:
            self.dropped += count - room
            if room <= 0:
                return
            item, count = item[:room], room                  # type: ignore[index]
        self._items.append(item)
        self._pending += count
        self._wakeup.set()

    def _end(self, error: BaseException | None = None) -> None:
        self._ended = True
        self._error = self._error or error
        self._wakeup.set()

    async def _next_item(self) -> object:
        while not self._items:
            if self._error is not None:
                raise ShimError(f"the tracer's consumer failed: {self._error}") from self._error
            if self._ended:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()
        return self._items.popleft()

    def _unregister(self, tracer: Tracer) -> None:
        """Tell ``tracer`` to stop delivering to this subscription (subclasses)."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop delivering (idempotent); items already queued can still be read."""
        tracer, self._tracer = self._tracer, None
        if tracer is not None:
            self._unregister(tracer)
        self._end()

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> Any:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with logged(__name__, "closing the tracer's region"):
            self.close()


class Watch(_Subscription):
    """Accesses to a GPA range, as an async iterator of :class:`Access` (or numpy batches).

    Registered when :meth:`Tracer.watch` returns; unregistered by :meth:`close`, at the end of
    an ``async with`` block, when the tracer closes, or when the object is dropped (leaving an
    ``async for`` loop releases it).
    """

    def __init__(self, tracer: Tracer, gpa: int, nbytes: int, offset: int, kinds: tuple[int, ...],
                 limit: int) -> None:
        super().__init__(tracer, limit)
        self.gpa, self.nbytes, self.kinds = gpa, nbytes, kinds
        self._lo, self._hi = offset, offset + nbytes
        self._pages = np.arange(offset >> PAGE_SHIFT, ((offset + nbytes - 1) >> PAGE_SHIFT) + 1)
        self._batch = np.empty(0, dtype=ACCESS_DTYPE)  # the batch being read one by one ...
        self._rows: list[tuple] = []                 # type: ignore[type-arg]   # ... as tuples
        self._row = 0

    def __repr__(self) -> str:
        kinds = "/".join(("load", "store")[k] for k in self.kinds)
        return f"<Watch {kinds} {self.gpa:#x}+{self.nbytes} pending={self._pending} dropped={self.dropped}>"

    def _offer(self, batch: np.ndarray) -> None:
        off = batch["offset"]
        mask = (off >= self._lo) & (off < self._hi)
        if len(self.kinds) == 1:
            mask &= batch["kind"] == self.kinds[0]
        if mask.all():
            self._push(batch, len(batch))                    # shared, read-only: no copy
        elif mask.any():
            sub = batch[mask]
            self._push(sub, len(sub))

    def __aiter__(self) -> Watch:
        return self

    @property
    def waiting(self) -> int:
        """Accesses delivered to this watch and not read yet (after :meth:`Tracer.flush`: every
        matching access the guest made before the flush)."""
        return len(self._rows) - self._row + self._pending

    async def __anext__(self) -> Access:
        while self._row >= len(self._rows):
            self._batch = await self._next_batch()
            self._rows = access_tuples(self._batch)                  # one conversion per batch
            self._row = 0
        row = self._rows[self._row]
        self._row += 1
        return Access.from_tuple(row)

    async def _next_batch(self) -> np.ndarray:
        batch = await self._next_item()
        assert isinstance(batch, np.ndarray)
        self._pending -= len(batch)
        return batch

    async def batches(self) -> AsyncIterator[np.ndarray]:
        """The accesses in bulk: read-only numpy arrays of :data:`~qemu_mktme.trace.accesses.ACCESS_DTYPE`."""
        if self._row < len(self._rows):
            rest = self._batch[self._row:]               # what per-event iteration left of this batch
            self._rows, self._row = [], 0
            yield rest
        while True:
            try:
                yield await self._next_batch()
            except StopAsyncIteration:
                return

    def _unregister(self, tracer: Tracer) -> None:
        tracer._release(self)

    async def __aenter__(self) -> Watch:
        return self


class ForeignReads(_Subscription):
    """Foreign-KeyID reads as an async iterator of :class:`ForeignRead`; scoped like :class:`Watch`."""

    def __init__(self, tracer: Tracer, limit: int) -> None:
        super().__init__(tracer, limit)

    def __aiter__(self) -> ForeignReads:
        return self

    async def __anext__(self) -> ForeignRead:
        item = await self._next_item()
        self._pending -= 1
        assert isinstance(item, ForeignRead)
        return item

    def _unregister(self, tracer: Tracer) -> None:
        tracer._foreign_subs.discard(self)

    async def __aenter__(self) -> ForeignReads:
        return self


class AccessWaiter:
    """``await``-able: the first access to a range (registered when created, not when awaited)."""

    def __init__(self, watch: Watch, timeout: float) -> None:
        self._watch = watch
        self._timeout = timeout

    def __await__(self) -> Generator[object, None, Access]:
        return self._wait().__await__()

    async def _wait(self) -> Access:
        w = self._watch
        try:
            return await asyncio.wait_for(anext(w), self._timeout)
        except TimeoutError:
            raise AccessTimeout(w.gpa, w.nbytes, "both" if len(w.kinds) == 2 else ("load", "store")[w.kinds[0]],
                                self._timeout) from None
        except StopAsyncIteration:
            raise ShimError("the tracer closed while waiting for an access") from None
        finally:
            w.close()

    def cancel(self) -> None:
        """Give up without awaiting (unregisters)."""
        self._watch.close()


class Tracer:
    """The shim in one QEMU: configure a machine for it, start, then read traffic and watch pages.

    ``ring_entries`` per vCPU (a power of two) bound the records in flight; ``verify`` is the
    software TLB's check period (0: never); ``tlb=False`` looks every access up in QEMU (slow,
    for comparison); ``decode="api"`` makes the shim ask QEMU for every access's size and
    direction; ``mode`` is ``"attribute"``, or ``"count"``/``"none"`` to measure overhead floors.
    Raises ``ShimError`` on a host that is not x86-64.
    """

    def __init__(self, *, ring_entries: int = 1 << 18, verify: int = 1024, tlb: bool = True,
                 decode: str = "inline", mode: str = "attribute", poll_interval: float = 0.002,
                 queue_limit: int = DEFAULT_QUEUE_LIMIT) -> None:
        if platform.machine().lower() not in ("x86_64", "amd64"):
            raise ShimError(f"the tracer reads the shim's rings relying on x86-64 store ordering; "
                            f"this host is {platform.machine()}")
        if decode not in ("inline", "api"):
            raise ValueError(f"decode must be inline or api, got {decode!r}")
        if mode not in ("attribute", "count", "none"):
            raise ValueError(f"mode must be attribute, count or none, got {mode!r}")
        if not 0 <= verify < 1 << 32:
            raise ValueError(f"verify must be in 0 .. 2^32 - 1, got {verify}")
        if poll_interval <= 0:
            raise ValueError(f"poll_interval must be positive, got {poll_interval}")
        if queue_limit < 1:
            raise ValueError(f"queue_limit must be >= 1, got {queue_limit}")
        Geometry(1, 1, ring_entries)                   # validates ring_entries
        self.ring_entries, self.verify, self.tlb, self.decode, self.mode = ring_entries, verify, tlb, decode, mode
        self.poll_interval = poll_interval
        self.queue_limit = queue_limit
        self.state = TracerState.IDLE
        self.plugin_arg: str | None = None
        self.foreign_read_count = 0
        self.foreign_read_hooks: list[Callable[[ForeignRead], None]] = []
        """Called synchronously with each foreign read as it is found (the sanitizer's rule (a))."""
        self._region: SharedRegion | None = None
        self._vm: Machine | None = None
        self._abi = 0
        self._resume = True
        self._consumer: asyncio.Task[None] | None = None
        self._consumer_error: BaseException | None = None
        self._consuming = asyncio.Event()
        self._watches: weakref.WeakSet[Watch] = weakref.WeakSet()
        self._foreign_subs: weakref.WeakSet[ForeignReads] = weakref.WeakSet()
        self._foreign = ForeignLines()
        self._records = 0
        self._dropped_watches = 0
        self._final_stats: TracerStats | None = None

    def __repr__(self) -> str:
        return f"<Tracer {self.state.value} watches={len(self._watches)}>"

    # ------------------------------------------------------------------ lifecycle

    def configure(self, config: MachineConfig) -> MachineConfig:
        """The machine configuration with the shim loaded; creates the shared region.

        Builds the shim for the QEMU the configuration names (``ShimError`` if it cannot),
        forces TCG, and starts the machine paused so that :meth:`start` can check the shim
        before the guest runs (it resumes unless ``config`` asked for a paused start).
        """
        self._require(TracerState.IDLE, "configure")
        if config.accel == "kvm":
            raise ValueError("the shim instruments TCG: accel='kvm' cannot be traced (use 'tcg')")
        memory = int(config.memory)
        qemu = find_qemu(config.qemu)
        self._abi = abi_for(qemu.version)
        library = build_shim(qemu, abi=self._abi)
        region = SharedRegion(Geometry(memory >> PAGE_SHIFT, config.cpus, self.ring_entries))
        options = {"region": region.child_path, "size": region.size, "layout": LAYOUT_VERSION,
                   "phys": phys_mode_for(qemu.version), "tlb": "on" if self.tlb else "off",
                   "verify": self.verify, "decode": self.decode, "mode": self.mode}
        self.plugin_arg = ",".join([str(library).replace(",", ",,"), *(f"{k}={v}" for k, v in options.items())])
        self._region = region
        self._resume = not (config.start_paused or config.incoming)
        self.state = TracerState.CONFIGURED
        return dataclasses.replace(config, accel="tcg", plugins=(*config.plugins, self.plugin_arg),
                                   pass_fds=(*config.pass_fds, region.fd), start_paused=True)

    async def start(self, vm: Machine) -> None:
        """Attach to ``vm`` (launched from :meth:`configure`'s configuration) and start consuming.

        Checks that the shim attached and agrees on the layout, tells it where guest RAM is,
        then resumes the guest (unless the configuration asked for a paused start).
        Raises ``ShimError`` when the shim is not there or disagrees.
        """
        self._require(TracerState.CONFIGURED, "start")
        region = self._region
        assert region is not None
        if vm.state is not VmState.PAUSED:
            raise ShimError(f"start() needs the machine paused as configure() left it, it is {vm.state.value}")
        region.check_attached(expected_abi=self._abi)
        ram = vm.ram
        if ram.size != region.geometry.npages << PAGE_SHIFT:
            raise ShimError(f"guest RAM is {ram.size} bytes, the region was made for "
                            f"{region.geometry.npages << PAGE_SHIFT}")
        ram_base = await self._ram_block_address(vm)
        region.set_ram_layout(ram_base, ram.ranges)
        self._vm = vm
        self._map = ram.map
        self._refs = np.zeros((region.geometry.npages, 2), dtype=np.int32)
        self._ledger = KeyIdLedger(region, self._gpas)
        self._consuming.set()
        self._consumer = asyncio.create_task(self._consume(), name=f"{vm.name}-shim-consumer")
        self.state = TracerState.RUNNING
        if self._resume:
            await vm.resume()

    async def close(self) -> None:
        """Stop consuming, end every watch and subscription, release the region.

        Safe to call twice. Re-raises (as ``ShimError``) a failure of the consumer task.
        """
        if self.state is TracerState.CLOSED:
            return
        running = self.state is TracerState.RUNNING
        if self._consumer is not None:
            self._consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._consumer
        if running:
            self._final_stats = self.stats()
        self.state = TracerState.CLOSED
        for sub in [*self._watches, *self._foreign_subs]:
            sub._end(self._consumer_error)
            sub._tracer = None
        self._watches.clear()
        self._foreign_subs.clear()
        if self._region is not None:
            self._region.close()
            self._region = None
        if self._consumer_error is not None:
            raise ShimError(f"the tracer's consumer failed: {self._consumer_error}") from self._consumer_error

    async def __aenter__(self) -> Tracer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def flush(self) -> None:
        """Drain the rings now, so that every access the guest made before this call has been
        dispatched (watches, foreign reads). The shim publishes a record before the vCPU goes
        on, so after the guest answered on its console, ``flush()`` leaves nothing behind."""
        self._running()
        if self._consuming.is_set():
            self._drain()
        await asyncio.sleep(0)

    @contextlib.asynccontextmanager
    async def consumer_paused(self) -> AsyncIterator[None]:
        """Stop draining the rings for a while: they fill and drop, the guest runs on."""
        self._consuming.clear()
        try:
            yield
        finally:
            self._consuming.set()

    # ------------------------------------------------------------------ KeyIDs and counters

    def set_keyid(self, gpa: int, nbytes: int, keyid: int) -> None:
        """Attribute the pages of ``[gpa, gpa + nbytes)`` (4 KiB aligned) to ``keyid`` from now on.

        Traffic counted so far stays with the KeyID the pages had. Raises ``ValueError`` for an
        unaligned range or a KeyID outside 0 .. 2^15 - 1, ``AddressError`` outside guest RAM.
        """
        if gpa % PAGE_SIZE or nbytes % PAGE_SIZE or nbytes <= 0:
            raise ValueError(f"set_keyid needs a whole number of 4 KiB pages, got {gpa:#x}+{nbytes:#x}")
        self._running()
        self.set_backend_keyid(self._ram().offset_of(gpa, nbytes), nbytes, keyid)

    def set_backend_keyid(self, offset: int, nbytes: int, keyid: int) -> None:
        """Like :meth:`set_keyid`, by offset in the RAM backend: also covers RAM that QEMU maps
        at no GPA yet (e.g. BIOS shadow RAM at 0xc0000, which firmware enables later)."""
        if offset % PAGE_SIZE or nbytes % PAGE_SIZE or nbytes <= 0:
            raise ValueError(f"set_backend_keyid needs whole 4 KiB pages, got {offset:#x}+{nbytes:#x}")
        if not 0 <= keyid < NKEYIDS:
            raise ValueError(f"keyid must be in 0 .. {NKEYIDS - 1}, got {keyid}")
        self._running()
        if offset + nbytes > self._ram().size:
            raise AddressError(f"backend range {offset:#x}+{nbytes:#x} is beyond guest RAM", address=offset)
        self._ledger.assign(slice(offset >> PAGE_SHIFT, (offset + nbytes) >> PAGE_SHIFT), keyid)

    def keyid_of(self, gpa: int) -> int:
        """The KeyID the page of ``gpa`` is attributed to."""
        self._running()
        return self._ledger.keyid(self._ram().offset_of(gpa) >> PAGE_SHIFT)

    def snapshot(self) -> TrafficSnapshot:
        """Traffic so far, per page and per KeyID; subtract two snapshots for an interval."""
        self._running()
        return self._ledger.snapshot()

    def keyid_totals(self) -> dict[int, Traffic]:
        """Traffic per KeyID since the start (KeyIDs with none are left out)."""
        return self.snapshot().keyid_totals

    def totals(self) -> Traffic:
        """All traffic to guest RAM since the start."""
        return Traffic.from_counters(self._counts().sum(axis=(0, 1), dtype=np.uint64))

    def page_counters(self, gpa: int, nbytes: int = PAGE_SIZE) -> list[PageTraffic]:
        """Traffic of each page that ``[gpa, gpa + nbytes)`` touches."""
        region = self._running()
        offset = self._ram().offset_of(gpa, nbytes)
        first, last = offset >> PAGE_SHIFT, (offset + max(nbytes, 1) - 1) >> PAGE_SHIFT
        counts = self._counts()[:, first:last + 1].sum(axis=0, dtype=np.uint64)
        base_gpa = gpa & ~(PAGE_SIZE - 1)
        return [PageTraffic(base_gpa + (i << PAGE_SHIFT), (first + i) << PAGE_SHIFT,
                            int(region.attrs["keyid"][first + i]), Traffic.from_counters(counts[i]))
                for i in range(last - first + 1)]

    def hottest_pages(self, n: int = 10, by: str = "accesses") -> list[PageTraffic]:
        """The ``n`` pages with the most traffic since the start (``by``: accesses or bytes)."""
        return self.snapshot().hottest_pages(n, by)

    def stats(self) -> TracerStats:
        """The shim's own statistics and the consumer's (see :class:`TracerStats`); after
        :meth:`close`, the last ones."""
        if self._final_stats is not None:
            return self._final_stats
        region = self._region
        if region is None or self.state is TracerState.IDLE:
            raise ShimError(f"the tracer has no region ({self.state.value})")
        v, h = region.vcpu, region.header

        def total(name: str) -> int:
            return int(v[name].sum(dtype=np.uint64))

        io = v["io"].sum(axis=0, dtype=np.uint64)
        per_vcpu = self._counts()[..., :2].sum(axis=(1, 2), dtype=np.uint64)
        return TracerStats(
            ram_accesses=int(per_vcpu.sum(dtype=np.uint64)),
            io_loads=int(io[0]), io_stores=int(io[1]), other=total("other"),
            lookup_failures=total("lookup_failures"), tlb_misses=total("tlb_misses"),
            tlb_flushes=total("tlb_flushes"), verify_checks=total("verify_checks"),
            verify_mismatches=total("verify_mismatches"), decode_checks=total("decode_checks"),
            decode_mismatches=total("decode_mismatches"), decode_api=bool(h["decode_api"]),
            records=self._records, ring_dropped=total("dropped"),
            watch_dropped=self._dropped_watches + sum(w.dropped for w in self._watches),
            insns_translated=int(h["insns_translated"]), insns_unique=int(h["insns_unique"]),
            insns_tlb_flush=int(h["insns_tlb_flush"]), vcpu_accesses=tuple(int(n) for n in per_vcpu))

    @property
    def overflow(self) -> int:
        """Watched accesses lost so far (full rings, full watcher queues)."""
        return self.stats().overflow

    # ------------------------------------------------------------------ watches

    def watch(self, gpa: int, nbytes: int = 1, on: str = "store") -> Watch:
        """Watch ``[gpa, gpa + nbytes)`` for ``on`` = ``"store"``, ``"load"`` or ``"both"``.

        Every matching access after this returns is delivered (or counted as dropped). The range
        must lie in one range of guest RAM (``AddressError`` otherwise).
        """
        kinds = _check_on(on)
        if nbytes <= 0:
            raise ValueError(f"nbytes must be positive, got {nbytes}")
        self._running()
        offset = self._ram().offset_of(gpa, nbytes)
        w = Watch(self, gpa, nbytes, offset, kinds, self.queue_limit)
        for k in kinds:
            self._refs[w._pages, k] += 1
        self._update_watch(w._pages)
        self._watches.add(w)
        return w

    def wait_for_access(self, gpa: int, nbytes: int = 1, *, on: str = "both", timeout: float = 10.0) -> AccessWaiter:
        """``await`` it for the first access to the range; registered before this returns.

        Raises ``AccessTimeout`` (a ``ShimError``) when none happens within ``timeout`` seconds.
        """
        return AccessWaiter(self.watch(gpa, nbytes, on), timeout)

    def _release(self, w: Watch) -> None:
        if self.state is not TracerState.RUNNING:
            return
        self._watches.discard(w)
        self._dropped_watches += w.dropped
        w.dropped = 0
        for k in w.kinds:
            self._refs[w._pages, k] -= 1
        self._update_watch(w._pages)

    # ------------------------------------------------------------------ foreign-KeyID writes

    def mark_foreign(self, gpa: int, nbytes: int, keyid: int) -> None:
        """A write through ``keyid`` left garbage in the 64-byte lines of ``[gpa, gpa + nbytes)``.

        The guest's next load of a garbage byte in such a line is reported once per line, as a
        :class:`ForeignRead`; guest stores repair the bytes they write (a line whose 64 bytes are
        all rewritten is clean again).
        """
        if nbytes <= 0:
            raise ValueError(f"nbytes must be positive, got {nbytes}")
        if not 0 <= keyid < NKEYIDS:
            raise ValueError(f"keyid must be in 0 .. {NKEYIDS - 1}, got {keyid}")
        self._running()
        pages = self._foreign.mark(self._ram().offset_of(gpa, nbytes), nbytes, keyid)
        self._update_watch(np.array(pages))

    def foreign_garbage(self, gpa: int, nbytes: int) -> np.ndarray:
        """Per byte of the range, whether it is still garbage (as far as the tracer has seen)."""
        self._running()
        return self._foreign.garbage(self._ram().offset_of(gpa, nbytes), nbytes)

    def foreign_reads(self) -> ForeignReads:
        """Subscribe to foreign-KeyID reads from now on (async iterator; ``close()`` to stop)."""
        self._running()
        sub = ForeignReads(self, self.queue_limit)
        self._foreign_subs.add(sub)
        return sub

    # ------------------------------------------------------------------ internals

    def _require(self, state: TracerState, what: str) -> None:
        if self.state is not state:
            raise ShimError(f"{what}() needs a {state.value} tracer, this one is {self.state.value}")

    def _running(self) -> SharedRegion:
        if self.state is not TracerState.RUNNING or self._region is None:
            raise ShimError(f"the tracer is {self.state.value}: call start(vm) first")
        return self._region

    def _ram(self) -> GuestRAM:
        assert self._vm is not None
        return self._vm.ram

    def _counts(self) -> np.ndarray:
        """Per vCPU and page: loads, stores, load bytes, store bytes (SharedRegion.counts)."""
        assert self._region is not None
        return self._region.counts()

    def _gpas(self, offsets: np.ndarray) -> np.ndarray:
        """GPAs of backend offsets (-1 where the offset is not mapped into the guest)."""
        found = (self._map.gpa_at(int(o)) for o in np.ravel(offsets))
        return np.array([-1 if g is None else g for g in found], dtype=np.int64).reshape(np.shape(offsets))

    def _update_watch(self, pages: np.ndarray) -> None:
        region = self._running()
        refs = self._refs[pages]
        flags = np.where(refs[:, KIND_LOAD] > 0, WATCH_LOAD, 0) | np.where(refs[:, KIND_STORE] > 0, WATCH_STORE, 0)
        if self._foreign:
            flags |= np.array([self._foreign.watch_flags(int(p)) for p in pages], dtype=flags.dtype)
        region.attrs["watch"][pages] = flags
        region.bump_attr_gen()

    async def _ram_block_address(self, vm: Machine) -> int:
        """Where QEMU's RAMBlock address space puts guest RAM (``info ramblock``)."""
        text = await vm.qmp.hmp("info ramblock")
        for m in re.finditer(r"^\s*(\S+)\s+\d+ \w+\s+(0x[0-9a-f]+)\s", text, re.M):
            if m[1] == vm.ram.backend_id:
                return int(m[2], 16)
        raise ShimError(f"QEMU's 'info ramblock' does not list the guest-RAM block {vm.ram.backend_id!r}")

    async def _consume(self) -> None:
        try:
            while True:
                await self._consuming.wait()
                n = self._drain()
                await asyncio.sleep(0 if n else self.poll_interval)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 - logged; surfaces in close() and in the readers
            log.error("shim consumer failed: %s", err)
            self._consumer_error = err
            for sub in [*self._watches, *self._foreign_subs]:
                sub._end(err)

    def _drain(self) -> int:
        """Copy every ring's new records out (numpy), publish the tails, dispatch; the count."""
        region = self._region
        assert region is not None
        size = region.geometry.ring_entries
        total = 0
        for cpu in range(region.geometry.nvcpus):
            head = int(region.heads[cpu])               # acquire: x86 loads are not reordered
            tail = int(region.tails[cpu])
            n = head - tail
            if n <= 0:
                continue
            if n > size:                                 # cannot happen with a sane shim
                raise ShimError(f"vCPU {cpu}'s ring claims {n} records in {size} slots")
            start = tail % size
            ring = region.rings[cpu]
            batch = ring[start:start + n].copy() if start + n <= size else \
                np.concatenate((ring[start:], ring[:start + n - size]))
            region.tails[cpu] = head                    # release: after the copies (x86 TSO)
            batch.flags.writeable = False               # watchers may share it
            self._records += n
            total += n
            self._dispatch(batch)
        return total

    def _dispatch(self, batch: np.ndarray) -> None:
        if self._foreign:
            self._check_foreign(batch)
        for w in list(self._watches):
            w._offer(batch)

    def _check_foreign(self, batch: np.ndarray) -> None:
        hits, changed = self._foreign.process(batch["offset"], batch["size"], batch["kind"])
        for hit in hits:
            read = ForeignRead(Access.from_row(batch[hit.index]), hit.keyid,
                               self._map.gpa_at(hit.line_offset), hit.garbage_bytes)
            self.foreign_read_count += 1
            for hook in list(self.foreign_read_hooks):
                hook(read)
            for sub in list(self._foreign_subs):
                sub._push(read, 1)
        if changed:
            self._update_watch(np.array(sorted(changed)))


async def run_trace_summary(vm: Machine, tracer: Tracer, interval: float = 2.0,
                            out: Callable[[str], None] = print, *, top: int = 5) -> None:
    """Print traffic per KeyID and the hottest pages every ``interval`` seconds, then totals.

    Runs until QEMU exits or the task is cancelled (for ``qemu-mktme run --trace``); the final
    summary is printed either way.
    """
    if interval <= 0:
        raise ValueError(f"interval must be positive, got {interval}")
    first = last = tracer.snapshot()
    try:
        while vm.returncode is None:
            await asyncio.sleep(interval)
            now = tracer.snapshot()
            for line in format_summary(now - last, tracer.stats(), top=top, title="trace"):
                out(line)
            last = now
    finally:
        with contextlib.suppress(ShimError):
            for line in format_summary(tracer.snapshot() - first, tracer.stats(), top=top, title="trace total"):
                out(line)


def format_summary(delta: TrafficSnapshot, stats: TracerStats, *, top: int = 5, title: str = "trace") -> list[str]:
    """The lines :func:`run_trace_summary` prints for one interval."""
    total = delta.totals
    rate = total.accesses / delta.seconds if delta.seconds > 0 else 0.0
    lines = [f"{title} {delta.seconds:.1f}s: {_si(total.accesses)} accesses ({_si(rate)}/s), "
             f"{_bytes(total.bytes)} | tlb hit {stats.tlb_hit_rate:.2%} | mmio {stats.io_loads + stats.io_stores:,}"
             f" | dropped {stats.overflow:,}"]
    lines.append(f"  {'KeyID':>6} {'loads':>14} {'stores':>14} {'bytes':>11}")
    for keyid, t in sorted(delta.keyid_totals.items()):
        if t.accesses:
            lines.append(f"  {keyid:>6} {t.loads:>14,} {t.stores:>14,} {_bytes(t.bytes):>11}")
    hot = [p for p in delta.hottest_pages(top) if p.traffic.accesses]
    if hot:
        lines.append("  hottest pages: " + ", ".join(
            f"{_where(p)} {_si(p.traffic.accesses)} (KeyID {p.keyid})" for p in hot))
    return lines


def _where(p: PageTraffic) -> str:
    return f"{p.gpa:#x}" if p.gpa is not None else f"offset {p.offset:#x}"


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def _bytes(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if abs(n) >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


__all__ = ["AccessWaiter", "ForeignReads", "Tracer", "TracerState", "Watch", "format_summary",
           "run_trace_summary"]
