"""A virtio-blk device (VIRTIO 1.2 §5.2) served to QEMU's ``vhost-user-blk-pci`` over vhost-user.

The backing store is a raw image file (sparse files stay sparse: DISCARD punches holes); a
completed FLUSH has ``fsync``-ed the file, so it survives a kill -9 of the backend. Requests:
IN, OUT, FLUSH, GET_ID, DISCARD, WRITE_ZEROES; anything else is UNSUPP; a request past the end
of the disk, a bad buffer layout or a faulting address is IOERR; a broken ring sets
DEVICE_NEEDS_RESET on that queue (logged once) and the other queues keep serving.

Guest memory is reached only through the memory object that ``memory_for(regions)`` builds
from SET_MEM_TABLE (``IommuMemory`` over the host model, normally).

Each started queue is served by the compiled dataplane (``native/vhost_dp.c``, one thread per
queue, :mod:`.dataplane`) when it can be built: IN, OUT and FLUSH whose buffers the IOMMU
translation mirror holds go straight between the disk and guest RAM there; everything else (other
request types, bad chains, range errors, an address the mirror lacks: a first touch, a foreign
KeyID, a fault; transfer hooks attached) comes back here to :meth:`VhostUserBlk._request`, whole,
on the loop thread. ``QEMU_MKTME_VHOST=python`` serves every request here.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..host.dma import DmaFault, WatchedList
from ..qemu.devices import POLL_MAX_NS_LIMIT
from . import native
from . import protocol as p
from .dataplane import QueueThread
from .memory import MemTable, close_fds
from .virtqueue import Chain, Memory, RingError, Virtqueue, gather

log = logging.getLogger(__name__)

SECTOR = 512
# feature bits (VIRTIO 1.2 §5.2.3, §6)
F_SEG_MAX, F_RO, F_BLK_SIZE, F_FLUSH, F_MQ, F_DISCARD, F_WRITE_ZEROES = 2, 5, 6, 9, 12, 13, 14
F_INDIRECT_DESC, F_EVENT_IDX, F_VERSION_1 = 28, 29, 32
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
TYPE_NAMES = {T_IN: "in", T_OUT: "out", T_FLUSH: "flush", T_GET_ID: "get-id", T_DISCARD: "discard",
              T_WRITE_ZEROES: "write-zeroes"}
QUEUE_SIZE = 256          # QEMU's virtio-blk default; the front end is told it (``queue-size``)
POLL_MAX_NS = 512_000
"""How long a queue thread may watch a ring that ran empty for the driver's next request (QEMU's
iothread ``poll-max-ns``; adaptive below it, see native/vhost_dp.c). QEMU's own default, 32 us,
is shorter than a TCG guest's turn-around between a completion and its next request (about
100 us on a 2-core machine): measured in scripts/bench_dma.py."""

IOV_MAX = 1024
MAX_DISCARD_SECTORS = 1 << 22
STATUS_NEEDS_RESET = 0x40


@dataclass(frozen=True)
class Transfer:
    """One completed request, as ``dma_trace`` yields it."""

    device: str
    queue: int
    request: str
    sector: int
    iova: int
    hpa: int
    keyid: int
    length: int
    direction: str          # "to-device" (guest memory read by the device), "from-device", or "none"
    status: int
    latency: float          # seconds from taking the chain to completing it


class Queue:
    """One virtqueue's vhost-user state (size, addresses, eventfds, enable)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.num = 0
        self.addr: p.VringAddr | None = None
        self.base = 0
        self.kick = -1
        self.call = -1
        self.err = -1
        self.enabled = False
        self.started = False
        self.ring: Virtqueue | None = None
        self.broken = False
        self.dp: QueueThread | None = None      # the compiled dataplane's thread, while it serves

    def close_fds(self) -> None:
        for name in ("kick", "call", "err"):
            fd = getattr(self, name)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, -1)


class VhostUserBlk(p.Handler):
    """The device behind one vhost-user socket; see the module docstring."""

    def __init__(self, path: str | os.PathLike[str], memory_for: Callable[[list[p.MemRegion]], Any], *,
                 readonly: bool = False, num_queues: int = 4, name: str = "vhost-blk0",
                 serial: str = "qemu-mktme-vhost", direct: bool = False, queue_size: int = QUEUE_SIZE,
                 poll_max_ns: int = POLL_MAX_NS) -> None:
        native.library()          # built now: QEMU_MKTME_VHOST=native fails here, not mid-negotiation
        self.path = Path(path)
        self.queue_size = queue_size
        if not 0 <= poll_max_ns <= POLL_MAX_NS_LIMIT:
            raise ValueError(f"poll-max-ns must be in 0..{POLL_MAX_NS_LIMIT}, got {poll_max_ns}")
        self.poll_max_ns = poll_max_ns
        # segments per request as QEMU's virtio-blk offers them (seg-max-adjust: queue size - 2,
        # the header and the status): a 1 MiB request in two chains, not three
        self.seg_max = max(1, queue_size - 2)
        self.name = name
        self.readonly = readonly
        self.num_queues = num_queues
        self.serial = serial.encode()[:20]
        self.memory_for = memory_for
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        self.fd = os.open(self.path, flags)
        self.direct = direct
        self.buffered_fd = self.fd      # requests O_DIRECT cannot take (unaligned buffers) go here
        st = os.fstat(self.fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            os.close(self.fd)
            raise ValueError(f"disk {self.path} is not a regular file or block device")
        if direct:                      # cache=none as QEMU's: the host page cache is bypassed
            try:
                self.fd = os.open(self.path, flags | os.O_DIRECT)
            except OSError as err:
                os.close(self.buffered_fd)
                raise ValueError(f"disk {self.path}: cache=none (O_DIRECT) is not possible here: "
                                 f"{err.strerror}") from None
        size = st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(self.fd, 0, os.SEEK_END)
        self.capacity = size // SECTOR
        self.features = ((1 << F_SEG_MAX) | (1 << F_BLK_SIZE) | (1 << F_FLUSH) | (1 << F_MQ)
                         | (1 << F_DISCARD) | (1 << F_WRITE_ZEROES) | (1 << F_INDIRECT_DESC)
                         | (1 << F_EVENT_IDX) | (1 << F_VERSION_1) | p.VHOST_USER_F_PROTOCOL_FEATURES
                         | ((1 << F_RO) if readonly else 0))
        self.protocol_features = (p.ProtocolFeature.MQ | p.ProtocolFeature.REPLY_ACK | p.ProtocolFeature.CONFIG
                                  | p.ProtocolFeature.RESET_DEVICE)
        self.acked = 0
        self.acked_protocol = 0
        self.queues = [Queue(i) for i in range(num_queues)]
        self.memory: Any = None
        self.table: MemTable | None = None
        self.status = 0
        self.transfer_hooks: list[Callable[[Transfer], None]] = WatchedList(self._hooks_changed)
        self._counters = {"requests": 0, "errors": 0, "unsupported": 0, "resets": 0, "native": 0,
                          "merged": 0, "polls": 0, "poll_hits": 0, "poll_us": 0, "poll_backoffs": 0}
        self._poll_ns = 0
        self._logged: set[str] = set()
        self._mirror: native.Mirror | None = None   # the memory's, while queue threads use it

    @property
    def counters(self) -> dict[str, int]:
        """Requests, errors, unsupported, resets; ``native``: the requests the compiled dataplane
        served (counted in ``requests`` too); ``merged``: of those, the ones served by a preceding
        adjacent request's preadv/pwritev (the I/Os merging saved); ``polls``: the times a queue
        thread watched the ring after it ran empty (``poll-max-ns``), ``poll_hits``: the requests
        it found so (each saved the guest a kick), ``poll_us``: the time spent watching,
        ``poll_backoffs``: windows shut because a busy thread wanted the CPU."""
        if self._mirror is not None:
            n = self._mirror.take_requests()
            self._counters["requests"] += n
            self._counters["native"] += n
            self._counters["merged"] += self._mirror.take_merged()
            polls, hits, ns, backoffs = self._mirror.take_polls()
            self._counters["polls"] += polls
            self._counters["poll_hits"] += hits
            self._counters["poll_backoffs"] += backoffs
            self._poll_ns += ns
            self._counters["poll_us"] = self._poll_ns // 1000
        return self._counters

    def _hooks_changed(self) -> None:
        for q in self.queues:
            if q.dp is not None:
                q.dp.set_slow(bool(self.transfer_hooks))

    # ------------------------------------------------------------------ config space

    def config_space(self) -> bytes:
        """struct virtio_blk_config (VIRTIO 1.2 §5.2.4), zero-padded to 256 bytes."""
        cfg = struct.pack("<QII", self.capacity, 0, self.seg_max)
        cfg += struct.pack("<HBB", 0, 0, 0)                  # geometry (not offered)
        cfg += struct.pack("<I", SECTOR)                     # blk_size
        cfg += struct.pack("<BBHI", 0, 0, 0, 0)              # topology (not offered)
        cfg += struct.pack("<BBH", 0, 0, self.num_queues)    # writeback, unused, num_queues
        cfg += struct.pack("<III", MAX_DISCARD_SECTORS, 1, 8)            # discard
        cfg += struct.pack("<IIB3x", MAX_DISCARD_SECTORS, 1, 1)          # write zeroes
        return cfg.ljust(256, b"\0")

    # ------------------------------------------------------------------ vhost-user requests

    def _queue(self, index: int) -> Queue:
        if not 0 <= index < self.num_queues:
            raise p.ProtocolError(f"queue index {index} (the device has {self.num_queues})")
        return self.queues[index]

    def handle(self, msg: p.Message) -> bytes | None:
        req = p.Req(msg.request)
        if req is p.Req.GET_FEATURES:
            return struct.pack("<Q", self.features)
        if req is p.Req.SET_FEATURES:
            acked = msg.u64()
            if acked & ~self.features:
                raise p.ProtocolError(f"front end acked features {acked & ~self.features:#x} never offered")
            self.acked = acked
            return None
        if req is p.Req.GET_PROTOCOL_FEATURES:
            return struct.pack("<Q", int(self.protocol_features))
        if req is p.Req.SET_PROTOCOL_FEATURES:
            self.acked_protocol = msg.u64() & int(self.protocol_features)
            return None
        if req in (p.Req.SET_OWNER, p.Req.SET_CONFIG):
            return None
        if req in (p.Req.RESET_OWNER, p.Req.RESET_DEVICE):
            self.reset()
            return None
        if req is p.Req.GET_QUEUE_NUM:
            return struct.pack("<Q", self.num_queues)
        if req is p.Req.GET_CONFIG:
            offset, size, flags = msg.config()
            return struct.pack("<III", offset, size, flags) + self.config_space()[offset:offset + size].ljust(size, b"\0")
        if req is p.Req.SET_MEM_TABLE:
            regions = msg.mem_table()
            try:
                self._set_memory(regions)
            finally:
                close_fds(regions)
            return None
        if req is p.Req.SET_VRING_NUM:
            index, num = msg.state()
            if not (1 <= num <= 32768 and num & (num - 1) == 0):
                raise p.ProtocolError(f"vring size {num} is not a power of two up to 32768")
            self._queue(index).num = num
            return None
        if req is p.Req.SET_VRING_ADDR:
            addr = msg.vring_addr()
            self._queue(addr.index).addr = addr
            return None
        if req is p.Req.SET_VRING_BASE:
            index, base = msg.state()
            self._queue(index).base = base & 0xFFFF
            return None
        if req is p.Req.GET_VRING_BASE:
            index, _ = msg.state()
            q = self._queue(index)
            self._stop(q)
            return struct.pack("<II", index, q.base)
        if req in (p.Req.SET_VRING_KICK, p.Req.SET_VRING_CALL, p.Req.SET_VRING_ERR):
            value = msg.u64()
            q = self._queue(value & p.VRING_IDX_MASK)
            nofd = bool(value & p.VRING_NOFD_MASK)
            if nofd == bool(msg.fds):
                raise p.ProtocolError(f"{req.name} with NOFD={int(nofd)} and {len(msg.fds)} fds")
            fd = msg.fds[0] if msg.fds else -1
            attr = {p.Req.SET_VRING_KICK: "kick", p.Req.SET_VRING_CALL: "call", p.Req.SET_VRING_ERR: "err"}[req]
            if fd >= 0:
                _check_notifier(fd, req.name)
                os.set_blocking(fd, False)     # a full call counter or a drained kick never blocks us
            restart = attr == "kick" or (attr == "call" and q.dp is not None)
            if restart:                        # the dataplane thread must not use the old fd
                self._stop(q)
            old = getattr(q, attr)
            if old >= 0:
                os.close(old)
            setattr(q, attr, fd)
            if attr == "kick" and not self.acked & p.VHOST_USER_F_PROTOCOL_FEATURES:
                q.enabled = True
            if restart:
                self._start(q)
            return None
        if req is p.Req.SET_VRING_ENABLE:
            index, enable = msg.state()
            q = self._queue(index)
            q.enabled = bool(enable)
            if q.enabled:
                self._start(q)
            else:
                self._stop(q)
            return None
        raise p.ProtocolError(f"{req.name} is not supported by this device (never offered)")

    def _set_memory(self, regions: list[p.MemRegion]) -> None:
        """A new memory table replaces the old: the queues let go of the old memory, which is
        closed (unmapped) before the new one is built; they restart on the new one."""
        running = [q for q in self.queues if q.started]
        for q in running:
            self._stop(q)
        old, self.memory, self.table = self.memory, None, None
        self._let_go_mirror()
        if old is not None and hasattr(old, "close"):
            old.close()
        memory = self.memory_for(regions)
        self.table, self.memory = MemTable(regions), memory
        for q in running:
            self._start(q)

    def reset(self) -> None:
        """Back to the state before negotiation (RESET_OWNER, RESET_DEVICE, a new front end)."""
        for q in self.queues:
            self._stop(q)
            q.close_fds()
            q.__init__(q.index)        # type: ignore[misc]
        self.acked = 0
        self.status = 0
        self._counters["resets"] += 1

    def disconnected(self) -> None:
        self.reset()
        self._let_go_mirror()
        if self.memory is not None and hasattr(self.memory, "close"):
            self.memory.close()
        self.memory = None
        self.table = None

    def close(self) -> None:
        self.disconnected()
        for fd in {self.fd, self.buffered_fd}:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.fd = self.buffered_fd = -1

    # ------------------------------------------------------------------ queues

    def _start(self, q: Queue) -> None:
        if q.started or not q.enabled or q.kick < 0 or q.addr is None or self.memory is None or not q.num:
            return
        try:
            assert self.table is not None
            desc, avail, used = (self.table.gpa_of_uva(a) for a in (q.addr.desc, q.addr.avail, q.addr.used))
            q.ring = Virtqueue(self.memory, q.num, desc, avail, used, event_idx=bool(self.acked & (1 << F_EVENT_IDX)),
                               indirect=bool(self.acked & (1 << F_INDIRECT_DESC)), last_avail=q.base)
        except (RingError, DmaFault) as err:
            self._broken(q, str(err))
            return
        q.started = True
        if self._start_dataplane(q):
            return
        asyncio.get_running_loop().add_reader(q.kick, self._kicked, q)
        self._process(q)     # buffers made available before the kick fd arrived

    def _start_dataplane(self, q: Queue) -> bool:
        """Serve ``q`` from a dataplane thread if the compiled dataplane is there (False: the
        Python path serves it, from the loop)."""
        lib = native.library()
        make = getattr(self.memory, "mirror", None)
        if lib is None or make is None or q.ring is None:
            return False
        try:
            self._mirror = make(lib)
        except native.DataplaneUnavailable as err:
            self._log_once("dataplane", f"the compiled dataplane cannot serve this memory ({err}): "
                                        "requests take the Python path", logging.WARNING)
            return False
        q.dp = QueueThread(lib, self._mirror, q.ring, name=f"{self.name}-q{q.index}", kick=q.kick, call=q.call,
                           disk=self.fd, buffered=self.buffered_fd, capacity=self.capacity,
                           readonly=self.readonly, slow=bool(self.transfer_hooks), on_event=self._dp_event,
                           poll_max_ns=self.poll_max_ns)
        q.dp.start()
        return True

    def _dp_event(self, dp: QueueThread, code: int) -> None:
        """The dataplane thread of a queue hands it over (loop thread): serve what C would not,
        then give it back."""
        q = next((q for q in self.queues if q.dp is dp), None)
        if q is None or dp.stopping:
            return                              # stopped meanwhile: the state went to q.base
        if code == native.KICK_GONE:
            err = dp.state.err
            self._kick_gone(q, f"reading it failed: {os.strerror(err)}" if err else "its writer hung up")
            return
        try:
            if code == native.CALL_DEAD:
                self._call_dead(q, dp.state.err)
            elif code == native.HANDOFF_RING:
                self._process(q)                # a ring C cannot map: today's path, until empty
            else:
                self._serve_one(q)
        finally:
            if q.dp is dp and not dp.stopping:  # not stopped by a broken ring meanwhile
                dp.resume(q.call)

    def _serve_one(self, q: Queue) -> None:
        """The chain the dataplane stopped at, served by the Python path."""
        ring = q.ring
        try:
            chain = ring.pop() if ring is not None else None
            if ring is None or chain is None:
                return
            ring.push(chain.head, self._request(q, ring, chain))
            if ring.should_notify() and q.call >= 0:
                self._signal(q)
        except RingError as err:
            self._broken(q, str(err))

    def _let_go_mirror(self) -> None:
        """Before the memory closes (no queue thread runs): its mirror's counts are taken."""
        self.counters                           # noqa: B018 (folds the mirror's requests)
        self._mirror = None

    def _stop(self, q: Queue) -> None:
        if q.dp is not None:
            dp, q.dp = q.dp, None
            dp.stop()
            q.started = False
        if q.started:
            with contextlib.suppress(RuntimeError, ValueError, OSError):      # no loop any more, or a closed fd
                asyncio.get_running_loop().remove_reader(q.kick)
            q.started = False
        if q.ring is not None:
            q.base = q.ring.last_avail
            q.ring = None

    def _kicked(self, q: Queue) -> None:
        try:
            os.set_blocking(q.kick, False)      # the front end may have cleared it (see _signal)
            got = os.read(q.kick, 512)          # an eventfd gives its 8-byte counter, a pipe its bytes
        except (BlockingIOError, InterruptedError):
            return                              # someone else drained it: nothing to do
        except OSError as err:
            self._kick_gone(q, f"reading it failed: {err.strerror}")
            return
        if not got:
            self._kick_gone(q, "its writer hung up")
            return
        if q.started:
            self._process(q)

    def _kick_gone(self, q: Queue, why: str) -> None:
        """The kick fd can never signal again (EOF/HUP): the queue is stopped until a new one."""
        self._log_once(f"kick{q.index}", f"queue {q.index}: kick fd unusable ({why}): queue stopped", logging.WARNING)
        self._stop(q)

    def _signal(self, q: Queue) -> None:
        """Interrupt the driver through the call fd without ever blocking: a counter at its
        maximum (EAGAIN) has a signal pending already; a dead fd is dropped. O_NONBLOCK is the
        open file description's, which the front end shares and may clear: set again each time."""
        try:
            os.set_blocking(q.call, False)
            os.write(q.call, _ONE)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as err:
            self._call_dead(q, err.errno or 0)

    def _call_dead(self, q: Queue, err: int) -> None:
        self._log_once(f"call{q.index}", f"queue {q.index}: call fd unusable ({os.strerror(err)}): "
                       "completions go unsignalled", logging.WARNING)
        os.close(q.call)
        q.call = -1

    def _log_once(self, kind: str, message: str, level: int = logging.ERROR) -> None:
        if kind not in self._logged:
            self._logged.add(kind)
            log.log(level, "%s: %s (logged once)", self.name, message)

    def _broken(self, q: Queue, why: str) -> None:
        """A ring the device cannot use: DEVICE_NEEDS_RESET, the queue stops, the rest serve on."""
        self._log_once(f"ring{q.index}", f"queue {q.index}: {why}: device needs reset")
        self.status |= STATUS_NEEDS_RESET
        q.broken = True
        self._stop(q)

    def _process(self, q: Queue) -> None:
        ring = q.ring
        try:
            while ring is not None and q.started:
                notify = False
                while True:
                    chain = ring.pop()
                    if chain is None:
                        break
                    written = self._request(q, ring, chain)
                    ring.push(chain.head, written)
                    notify = True
                ring.enable_kicks()
                if notify and ring.should_notify() and q.call >= 0:
                    self._signal(q)
                if not ring.pending():
                    break
        except RingError as err:
            self._broken(q, str(err))

    # ------------------------------------------------------------------ requests

    def _request(self, q: Queue, ring: Virtqueue, chain: Chain) -> int:
        """Serve one chain; returns the bytes written into it (for the used ring)."""
        mem: Memory = self.memory
        start = time.perf_counter()
        self._counters["requests"] += 1
        rlen, wlen = chain.readable_len, chain.writable_len
        if chain.error is None and (rlen < 16 or wlen < 1):
            chain.error = f"request of {rlen} readable / {wlen} writable bytes"
        if chain.error is not None:
            self._counters["errors"] += 1
            self._log_once(f"chain:{chain.error.split(':')[0]}", f"queue {q.index}: bad descriptor chain: {chain.error}")
            return self._status(mem, chain, S_IOERR, 0)
        try:
            r, w = chain.readable, chain.writable
            if r[0][1] == 16:                       # the usual layout: header, data..., status
                header, data_out = mem.read(*r[0]), r[1:]
            else:
                header = b"".join(mem.read(a, n) for a, n in gather(r, 0, 16))
                data_out = gather(r, 16, rlen - 16)
            rtype, _ioprio, sector = struct.unpack("<IIQ", header)
            data_in = w[:-1] if w[-1][1] == 1 else gather(w, 0, wlen - 1)     # all but the status byte
            status, written = self._serve(mem, rtype, sector, data_in, data_out, chain,
                                          wlen - 1 if rtype == T_IN else rlen - 16)
        except DmaFault as err:
            self._counters["errors"] += 1
            self._log_once("fault", f"queue {q.index}: DMA fault, request failed with IOERR: {err}", logging.WARNING)
            rtype, sector, status, written, data_in, data_out = -1, 0, S_IOERR, 0, [], []
        except OSError as err:                  # the disk failed (EIO, ENOSPC): the guest sees IOERR
            self._counters["errors"] += 1
            self._log_once(f"io{err.errno}", f"queue {q.index}: disk I/O failed, request failed with IOERR: "
                                             f"{err.strerror}")
            rtype, sector, status, written, data_in, data_out = -1, 0, S_IOERR, 0, [], []
        try:
            written = self._status(mem, chain, status, written)
        except DmaFault:
            written = 0
        if self.transfer_hooks:
            self._emit(q, rtype, sector, data_in if rtype in (T_IN, T_GET_ID) else data_out, status, time.perf_counter() - start)
        return written

    def _status(self, mem: Memory, chain: Chain, status: int, written: int) -> int:
        """Write the status byte (the last writable byte) if there is one; the used length."""
        if not chain.writable or chain.writable[-1][1] < 1:
            return 0
        addr, n = chain.writable[-1]
        try:
            mem.write(addr + n - 1, bytes([status]))
        except DmaFault:
            return 0
        return written + 1

    def _serve(self, mem: Memory, rtype: int, sector: int, data_in: list[tuple[int, int]],
               data_out: list[tuple[int, int]], chain: Chain, nbytes: int) -> tuple[int, int]:
        """Serve one request; ``nbytes``: its data bytes (IN: device-writable, else readable)."""
        if rtype in (T_IN, T_OUT):
            if nbytes % SECTOR or sector > self.capacity or sector + nbytes // SECTOR > self.capacity:
                self._log_once("range", f"{TYPE_NAMES[rtype]} of {nbytes} bytes at sector {sector} "
                                        f"(capacity {self.capacity}, {SECTOR}-byte sectors)")
                return S_IOERR, 0
            if rtype == T_IN:
                views = mem.write_views(data_in)          # zero copy: the file straight into guest RAM
                if views is not None:
                    self._readv(views, sector * SECTOR, nbytes)
                    return S_OK, nbytes
                buf = np.empty(nbytes, np.uint8)
                self._readv([buf], sector * SECTOR, nbytes)
                mem.write_sg(data_in, buf)
                return S_OK, nbytes
            if self.readonly:
                self._log_once("ro", "write to a read-only disk")
                return S_IOERR, 0
            self._writev(mem.read_sg(data_out), sector * SECTOR, nbytes)
            return S_OK, 0
        if rtype == T_FLUSH:
            if not self.readonly:
                os.fdatasync(self.fd)          # as QEMU's file driver flushes (qemu_fdatasync)
            return S_OK, 0
        if rtype == T_GET_ID:
            n = min(20, sum(n for _, n in data_in))
            ident = self.serial.ljust(20, b"\0")[:n]
            pos = 0
            for addr, m in gather(data_in, 0, n):
                mem.write(addr, ident[pos:pos + m])
                pos += m
            return S_OK, n
        if rtype in (T_DISCARD, T_WRITE_ZEROES):
            if self.readonly:
                return S_IOERR, 0
            raw = b"".join(mem.read(a, n) for a, n in data_out)
            if not raw or len(raw) % 16:
                return S_IOERR, 0
            for off in range(0, len(raw), 16):
                first, count, _flags = struct.unpack_from("<QII", raw, off)
                if count > MAX_DISCARD_SECTORS or first + count > self.capacity:
                    return S_IOERR, 0
                mode = 0x02 | 0x01           # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE: reads back zeros
                try:
                    _fallocate(self.fd, mode, first * SECTOR, count * SECTOR)
                except OSError:
                    os.pwrite(self.fd, bytes(count * SECTOR), first * SECTOR)
            return S_OK, 0
        self._counters["unsupported"] += 1
        self._log_once(f"type{rtype}", f"unknown request type {rtype}: UNSUPP")
        return S_UNSUPP, 0

    def _readv(self, arrays: list[np.ndarray], offset: int, nbytes: int) -> None:
        """Fill ``arrays`` (``nbytes`` in all) from the disk at ``offset`` (in IOV_MAX pieces);
        past the end of the file reads zeros."""
        for i in range(0, len(arrays), IOV_MAX):
            part = arrays[i:i + IOV_MAX]
            want = nbytes if len(arrays) <= IOV_MAX else sum(a.size for a in part)
            got = self._io(os.preadv, part, offset)
            while got < want:                           # short: the end of the file, or a retry
                rest = _after(part, got)
                more = self._io(os.preadv, rest, offset + got)
                if more <= 0:
                    for a in rest:
                        a[:] = 0
                    break
                got += more
            offset += want

    def _writev(self, arrays: list[np.ndarray], offset: int, nbytes: int) -> None:
        for i in range(0, len(arrays), IOV_MAX):
            part = arrays[i:i + IOV_MAX]
            want = nbytes if len(arrays) <= IOV_MAX else sum(a.size for a in part)
            got = self._io(os.pwritev, part, offset)
            while got < want:                           # short write: finish what is left
                more = self._io(os.pwritev, _after(part, got), offset + got)
                if more <= 0:                           # no progress (a full file system, a device end)
                    raise OSError(errno.EIO, f"write of {want} bytes at {offset} stopped after {got}")
                got += more
            offset += want

    def _io(self, call: Callable[..., int], arrays: list[np.ndarray], offset: int) -> int:
        """``call`` (preadv/pwritev) on the disk; with cache=none, buffers O_DIRECT refuses
        (EINVAL: not aligned to the device's block) go through the page cache instead."""
        try:
            return call(self.fd, arrays, offset)
        except OSError as err:
            if err.errno != errno.EINVAL or self.fd == self.buffered_fd:
                raise
        return call(self.buffered_fd, arrays, offset)

    def _emit(self, q: Queue, rtype: int, sector: int, data: list[tuple[int, int]], status: int,
              latency: float) -> None:
        """Tell the trace hooks about one request; ``data`` is its data segments (IN: written by
        the device, else read), the first of which gives IOVA, HPA and KeyID."""
        iova = data[0][0] if data else 0
        length = sum(n for _, n in data)
        hpa, keyid = -1, -1
        device = getattr(self.memory, "device", None)
        if device is not None and data:
            with contextlib.suppress(DmaFault):
                hpa, keyid = device.translate(iova)
        direction = {T_IN: "from-device", T_GET_ID: "from-device", T_OUT: "to-device"}.get(rtype, "none")
        t = Transfer(self.name, q.index, TYPE_NAMES.get(rtype, str(rtype)), sector, iova, hpa, keyid, length,
                     direction, status, latency)
        for hook in list(self.transfer_hooks):
            hook(t)


_ONE = (1).to_bytes(8, "little")


def _after(arrays: list[np.ndarray], skip: int) -> list[np.ndarray]:
    """The views of ``arrays`` after their first ``skip`` bytes."""
    out = []
    for a in arrays:
        if skip >= a.size:
            skip -= a.size
            continue
        out.append(a[skip:])
        skip = 0
    return out


def _check_notifier(fd: int, what: str) -> None:
    """Kick, call and error fds are eventfds (QEMU's ``event_notifier``) or pipes (its fallback)."""
    mode = os.fstat(fd).st_mode
    if stat.S_ISFIFO(mode):
        return
    try:
        kind = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        kind = ""
    if kind != "anon_inode:[eventfd]":
        raise p.ProtocolError(f"{what} passes {kind or 'a file'} (an eventfd or a pipe expected)")


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    import ctypes
    import ctypes.util
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.fallocate(fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
