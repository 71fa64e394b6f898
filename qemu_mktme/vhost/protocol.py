"""The vhost-user protocol, back-end side (QEMU's ``docs/interop/vhost-user.rst``).

Written by hand: no maintained Python implementation exists on PyPI (the projects there are
network-only or C bindings). A message is a 12-byte header (request, flags, size) and a payload,
with file descriptors (memfd regions, eventfds) in SCM_RIGHTS ancillary data. This module only
frames and decodes messages and keeps a connection's state machine honest; what a request
means to a device is :class:`Handler`'s business (``blk.VhostUserBlk``).

A peer that breaks the framing (bad version, oversized or truncated payload, unknown request,
wrong fd count) gets its connection closed with one log line; the backend keeps listening.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import enum
import logging
import os
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path


log = logging.getLogger(__name__)

HEADER = struct.Struct("<III")
VERSION = 0x1
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
MAX_PAYLOAD = 4096 + 8          # the largest message (GET_CONFIG's 256-byte space, mem table of 8 regions)
MAX_FDS = 8
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
VRING_NOFD_MASK = 1 << 8
VRING_IDX_MASK = 0xFF


class Req(enum.IntEnum):
    """Front-end requests (the numbers of vhost-user.rst)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    RESET_DEVICE = 34
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolFeature(enum.IntFlag):
    MQ = 1 << 0
    REPLY_ACK = 1 << 3
    CONFIG = 1 << 9
    RESET_DEVICE = 1 << 13
    STATUS = 1 << 16


REPLIES = {Req.GET_FEATURES, Req.GET_PROTOCOL_FEATURES, Req.GET_VRING_BASE, Req.GET_QUEUE_NUM,
           Req.GET_CONFIG, Req.GET_MAX_MEM_SLOTS, Req.GET_STATUS}
"""Requests whose answer is a reply message (all others are acked only if NEED_REPLY asks)."""
FDS = {Req.SET_MEM_TABLE: (1, MAX_FDS), Req.SET_VRING_KICK: (0, 1), Req.SET_VRING_CALL: (0, 1),
       Req.SET_VRING_ERR: (0, 1), Req.SET_LOG_FD: (0, 1), Req.SET_BACKEND_REQ_FD: (0, 1),
       Req.ADD_MEM_REG: (1, 1), Req.SET_INFLIGHT_FD: (0, 1)}
"""How many fds a request may carry (min, max); none for the others."""


class ProtocolError(Exception):
    """The peer broke the protocol: the connection is closed."""


@dataclass(frozen=True)
class MemRegion:
    """One region of SET_MEM_TABLE: guest-physical range, QEMU's virtual address, fd + offset."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int
    fd: int = -1


@dataclass(frozen=True)
class VringAddr:
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


@dataclass
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def u64(self) -> int:
        self._expect(8)
        return struct.unpack("<Q", self.payload[:8])[0]

    def state(self) -> tuple[int, int]:
        """A vring state (index, num)."""
        self._expect(8)
        return struct.unpack("<II", self.payload[:8])

    def vring_addr(self) -> VringAddr:
        self._expect(40)
        return VringAddr(*struct.unpack("<IIQQQQ", self.payload[:40]))

    def mem_table(self) -> list[MemRegion]:
        self._expect(8)
        nregions = struct.unpack("<I", self.payload[:4])[0]
        if not 1 <= nregions <= MAX_FDS or len(self.payload) < 8 + 32 * nregions:
            raise ProtocolError(f"SET_MEM_TABLE with {nregions} regions in {len(self.payload)} bytes")
        if len(self.fds) != nregions:
            raise ProtocolError(f"SET_MEM_TABLE names {nregions} regions but passes {len(self.fds)} fds")
        regions = []
        for i in range(nregions):
            gpa, size, uaddr, offset = struct.unpack_from("<QQQQ", self.payload, 8 + 32 * i)
            regions.append(MemRegion(gpa, size, uaddr, offset, fd=self.fds[i]))
        return regions

    def config(self) -> tuple[int, int, int]:
        """GET/SET_CONFIG's (offset, size, flags)."""
        self._expect(12)
        offset, size, flags = struct.unpack("<III", self.payload[:12])
        if size > 256 or offset > 256 or len(self.payload) < 12 + size:
            raise ProtocolError(f"config request for {size} bytes at {offset} in a {len(self.payload)}-byte message")
        return offset, size, flags

    def _expect(self, n: int) -> None:
        if len(self.payload) < n:
            name = Req(self.request).name if self.request in Req._value2member_map_ else self.request
            raise ProtocolError(f"{name} needs {n} payload bytes, got {len(self.payload)}")


def encode(request: int, payload: bytes = b"", *, reply: bool = False, need_reply: bool = False) -> bytes:
    flags = VERSION | (FLAG_REPLY if reply else 0) | (FLAG_NEED_REPLY if need_reply else 0)
    return HEADER.pack(request, flags, len(payload)) + payload


class Handler:
    """What a device does with requests; ``handle`` returns the reply payload or None."""

    def handle(self, msg: Message) -> bytes | None:
        raise NotImplementedError

    def disconnected(self) -> None:
        """The front end went away: stop the queues (a reconnecting QEMU sets everything again)."""


QUERIES = {Req.GET_FEATURES, Req.GET_PROTOCOL_FEATURES, Req.GET_QUEUE_NUM, Req.GET_CONFIG,
           Req.GET_MAX_MEM_SLOTS}
"""Requests that read the device without changing it: any connection gets an answer. Every other
request configures the device and needs the connection to own it (:meth:`Server.claim`)."""

MESSAGE_DEADLINE = 5.0
"""Seconds a peer has to finish a message (header and payload) once its first byte arrived, and
to take a reply: a half-sent message or a peer that never reads costs only its own connection."""
IDLE_DEADLINE = 10.0
"""Seconds a connection that does not own the device may stay silent before it is closed (the
owner, QEMU, is legitimately silent while the guest runs)."""
MAX_CONNECTIONS = 8
"""Connections served at once; one more evicts the non-owner that was silent longest."""


class Connection:
    """One front end (QEMU) on the unix socket, served in its own task (:meth:`serve`)."""

    def __init__(self, sock: socket.socket, server: Server, name: str) -> None:
        self.sock = sock
        self.server = server
        self.handler = server.handler
        self.name = name
        self.last_active = asyncio.get_running_loop().time()
        self.busy = False             # inside a message or a reply (their deadline applies)
        self.deadline = 0.0           # loop time by which the message begun must be whole
        sock.setblocking(False)

    async def _readable(self, timeout: float | None) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        loop.add_reader(self.sock.fileno(), _wake, fut)
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            loop.remove_reader(self.sock.fileno())

    async def _recv(self, nbytes: int, fds_ok: bool, deadline: float | None) -> tuple[bytes, list[int]]:
        """``nbytes`` (and any fds), by the loop time ``deadline`` once the first byte is in
        (``TimeoutError``); before it, a non-owner waits at most :data:`IDLE_DEADLINE`."""
        loop = asyncio.get_running_loop()
        data, fds = b"", []
        try:
            while len(data) < nbytes:
                if deadline is not None:
                    timeout: float | None = max(deadline - loop.time(), 0.0)
                elif self.server.owner is self:
                    timeout = None
                else:
                    timeout = max(self.last_active + self.server.idle_deadline - loop.time(), 0.0)
                await self._readable(timeout)
                try:
                    chunk, anc, _, _ = self.sock.recvmsg(nbytes - len(data), socket.CMSG_SPACE(MAX_FDS * 4))
                except (BlockingIOError, InterruptedError):
                    continue
                for level, kind, blob in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        got = array.array("i")
                        got.frombytes(blob[:len(blob) - len(blob) % 4])
                        fds += list(got)
                if not chunk:
                    raise EOFError
                if deadline is None:
                    deadline = self.deadline = loop.time() + self.server.message_deadline
                    self.busy = True
                data += chunk
            if fds and not fds_ok:
                raise ProtocolError("file descriptors passed outside a message header")
        except BaseException:
            close_all(fds)
            raise
        return data, fds

    async def receive(self) -> Message:
        """The next whole message (``TimeoutError`` if it does not arrive in time)."""
        head, fds = await self._recv(HEADER.size, True, None)
        deadline = self.deadline                # the payload is due by the same time as the header
        request, flags, size = HEADER.unpack(head)
        try:
            if flags & 0x3 != VERSION:
                raise ProtocolError(f"message version {flags & 3} (flags {flags:#x}), expected {VERSION}")
            if size > MAX_PAYLOAD:
                raise ProtocolError(f"request {request} announces a {size}-byte payload (max {MAX_PAYLOAD})")
            if request not in Req._value2member_map_:
                raise ProtocolError(f"unknown request {request}")
            payload, more = await self._recv(size, False, deadline) if size else (b"", [])
            fds += more
            lo, hi = FDS.get(Req(request), (0, 0))
            if not lo <= len(fds) <= hi:
                raise ProtocolError(f"{Req(request).name} carries {len(fds)} fds (expected {lo}..{hi})")
        except BaseException:
            close_all(fds)
            raise
        self.last_active = asyncio.get_running_loop().time()
        self.busy = False
        return Message(request, flags, payload, fds)

    async def send(self, data: bytes) -> None:
        self.busy = True
        await asyncio.wait_for(asyncio.get_running_loop().sock_sendall(self.sock, data), self.server.message_deadline)
        self.busy = False

    def alive(self) -> bool:
        """Whether the peer is still there (no hang-up waiting to be read)."""
        try:
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False

    async def serve(self) -> None:
        """Answer requests until the peer hangs up, breaks the protocol or misses a deadline."""
        try:
            while True:
                msg = await self.receive()
                log.debug("%s: %s flags=%#x %d bytes %d fds", self.name, Req(msg.request).name, msg.flags,
                          len(msg.payload), len(msg.fds))
                try:
                    if msg.request not in QUERIES and not self.server.claim(self):
                        raise ProtocolError(f"{Req(msg.request).name}: the device belongs to another front end")
                    reply = self.handler.handle(msg)
                except ProtocolError:
                    close_all(msg.fds)
                    raise
                if msg.request in REPLIES:
                    await self.send(encode(msg.request, reply or b"", reply=True))
                elif msg.need_reply:
                    await self.send(encode(msg.request, struct.pack("<Q", 0), reply=True))
        except EOFError:
            log.info("%s: front end disconnected", self.name)
        except TimeoutError:
            log.warning("%s: closing the connection: %s", self.name,
                        "a message or a reply missed its deadline" if self.busy
                        else "silent too long without owning the device")
        except ProtocolError as err:
            log.error("%s: closing the connection, the front end broke the vhost-user protocol: %s", self.name, err)
        except (ConnectionError, OSError) as err:
            log.error("%s: connection lost: %s", self.name, err)
        except Exception as err:  # noqa: BLE001 - logged; a request the device could not take: this peer only
            log.error("%s: closing the connection after a request failed: %s: %s", self.name,
                      type(err).__name__, err)
        finally:
            self.closed()

    def task_done(self, _task: asyncio.Task[None]) -> None:
        self.closed()

    def closed(self) -> None:
        """The connection is over: release the device if it owned it, close the socket."""
        self.server.release(self)
        self.sock.close()


def _wake(fut: asyncio.Future[None]) -> None:
    """The reader callback of a receive: the socket is readable."""
    if not fut.done():
        fut.set_result(None)


def close_all(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class Server:
    """A listening unix socket (mode 0600) for one device.

    Each connection is served in its own task, so a silent peer, one that sends half a message or
    one that never reads its replies costs only its own connection: a message must arrive whole,
    and a reply be taken, within ``message_deadline``; a connection that does not own the device is
    closed after ``idle_deadline`` of silence; at most ``max_connections`` are open (one more evicts
    the non-owner silent longest). The device belongs to one front end at a time: the first
    connection that configures it owns it until it hangs up (QEMU reconnects after a restart),
    and any connection may ask the read-only queries (:data:`QUERIES`).
    """

    def __init__(self, path: str | os.PathLike[str], handler: Handler, name: str = "vhost-user", *,
                 max_connections: int = MAX_CONNECTIONS, message_deadline: float = MESSAGE_DEADLINE,
                 idle_deadline: float = IDLE_DEADLINE) -> None:
        if max_connections < 2:
            raise ValueError("max_connections must be at least 2 (the owner and one more)")
        self.path = Path(path)
        self.handler = handler
        self.name = name
        self.max_connections = max_connections
        self.message_deadline = message_deadline
        self.idle_deadline = idle_deadline
        self.connections = 0
        self.owner: Connection | None = None
        self._open: dict[Connection, asyncio.Task[None]] = {}
        self._listener: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, 0o600)
            sock.listen(64)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._listener = sock
        self._task = asyncio.create_task(self._accept_loop(), name=f"{self.name}-accept")

    def claim(self, conn: Connection) -> bool:
        """Make ``conn`` the device's owner if nobody (alive) owns it; whether it owns it now."""
        owner = self.owner
        if owner is not None and owner is not conn and not owner.alive():
            log.info("%s: the previous front end hung up", self.name)
            self._drop(owner)
            owner = None
        if owner is None:
            self.owner = conn
            log.info("%s: %s owns the device", self.name, conn.name)
        return self.owner is conn

    def release(self, conn: Connection) -> None:
        """``conn`` is gone: if it owned the device, the device stops (ready for the next)."""
        self._open.pop(conn, None)
        if self.owner is conn:
            self.owner = None
            self.handler.disconnected()

    def _drop(self, conn: Connection) -> None:
        task = self._open.get(conn)
        self.release(conn)
        if task is not None:
            task.cancel()

    async def _accept_loop(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while True:
            sock, _ = await loop.sock_accept(self._listener)
            self.connections += 1
            if len(self._open) >= self.max_connections:
                victim = min((c for c in self._open if c is not self.owner), key=lambda c: c.last_active)
                log.warning("%s: %d connections open, closing the one silent longest (%s)", self.name,
                            len(self._open), victim.name)
                self._drop(victim)
            conn = Connection(sock, self, f"{self.name}#{self.connections}")
            log.info("%s: front end connected", conn.name)
            task = self._open[conn] = asyncio.create_task(conn.serve(), name=conn.name)
            task.add_done_callback(conn.task_done)       # also when cancelled before it ran

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def close_now(self) -> None:
        """Stop listening and drop every connection without waiting (teardown paths)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for conn in list(self._open):
            self._drop(conn)
        self._stop_listening()

    async def close(self) -> None:
        tasks = list(self._open.values())
        if self._task is not None:
            tasks.append(self._task)
        self.close_now()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _stop_listening(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
