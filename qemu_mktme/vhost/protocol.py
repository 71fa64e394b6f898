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

from ..errors import logged

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



def _wake(fut: asyncio.Future[None]) -> None:
    """The reader callback of a receive: the socket is readable."""
    if not fut.done():
        fut.set_result(None)

class Connection:
    """One front end (QEMU) on the unix socket."""

    def __init__(self, sock: socket.socket, handler: Handler, name: str) -> None:
        self.sock = sock
        self.handler = handler
        self.name = name
        sock.setblocking(False)

    async def _recv(self, nbytes: int, fds_ok: bool) -> tuple[bytes, list[int]]:
        loop = asyncio.get_running_loop()
        data, fds = b"", []
        while len(data) < nbytes:
            fut: asyncio.Future[None] = loop.create_future()
            loop.add_reader(self.sock.fileno(), _wake, fut)
            try:
                await fut
            finally:
                loop.remove_reader(self.sock.fileno())
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
                for fd in fds:
                    os.close(fd)
                raise EOFError
            data += chunk
        if fds and not fds_ok:
            for fd in fds:
                os.close(fd)
            raise ProtocolError("file descriptors passed outside a message header")
        return data, fds

    async def receive(self) -> Message:
        head, fds = await self._recv(HEADER.size, True)
        request, flags, size = HEADER.unpack(head)
        try:
            if flags & 0x3 != VERSION:
                raise ProtocolError(f"message version {flags & 3} (flags {flags:#x}), expected {VERSION}")
            if size > MAX_PAYLOAD:
                raise ProtocolError(f"request {request} announces a {size}-byte payload (max {MAX_PAYLOAD})")
            if request not in Req._value2member_map_:
                raise ProtocolError(f"unknown request {request}")
            payload, more = await self._recv(size, False) if size else (b"", [])
            fds += more
            lo, hi = FDS.get(Req(request), (0, 0))
            if not lo <= len(fds) <= hi:
                raise ProtocolError(f"{Req(request).name} carries {len(fds)} fds (expected {lo}..{hi})")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return Message(request, flags, payload, fds)

    async def send(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def serve(self) -> None:
        """Answer requests until the peer hangs up or breaks the protocol."""
        try:
            while True:
                msg = await self.receive()
                log.debug("%s: %s flags=%#x %d bytes %d fds", self.name, Req(msg.request).name, msg.flags,
                          len(msg.payload), len(msg.fds))
                try:
                    reply = self.handler.handle(msg)
                except ProtocolError:
                    for fd in msg.fds:
                        with contextlib.suppress(OSError):
                            os.close(fd)
                    raise
                if msg.request in REPLIES:
                    await self.send(encode(msg.request, reply or b"", reply=True))
                elif msg.need_reply:
                    await self.send(encode(msg.request, struct.pack("<Q", 0), reply=True))
        except EOFError:
            log.info("%s: front end disconnected", self.name)
        except ProtocolError as err:
            log.error("%s: closing the connection, the front end broke the vhost-user protocol: %s", self.name, err)
        except (ConnectionError, OSError) as err:
            log.error("%s: connection lost: %s", self.name, err)
        except Exception as err:  # noqa: BLE001 - logged; a request the device could not take: this peer only
            log.error("%s: closing the connection after a request failed: %s: %s", self.name,
                      type(err).__name__, err)
        finally:
            self.handler.disconnected()
            self.sock.close()


class Server:
    """A listening unix socket serving one front end at a time (QEMU reconnects after a restart)."""

    def __init__(self, path: str | os.PathLike[str], handler: Handler, name: str = "vhost-user") -> None:
        self.path = Path(path)
        self.handler = handler
        self.name = name
        self.connections = 0
        self._listener: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))
            os.chmod(self.path, 0o600)
            sock.listen(1)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._listener = sock
        self._task = asyncio.create_task(self._accept_loop(), name=f"{self.name}-accept")

    async def _accept_loop(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            self.connections += 1
            log.info("%s: front end connected (connection %d)", self.name, self.connections)
            await Connection(conn, self.handler, self.name).serve()

    def close_now(self) -> None:
        """Stop listening and drop the connection without waiting (teardown paths)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self._stop_listening()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with logged(__name__, "stopping the accept loop", asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        self._stop_listening()

    def _stop_listening(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
