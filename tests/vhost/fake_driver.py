"""A hand-written vhost-user front end and virtio-blk guest driver for tests: it plays QEMU on
the socket (memory table with a memfd, eventfds) and the guest's driver in guest RAM (descriptor
table, available ring), so a test can put any ring content, hostile or not, in front of the
backend. Guest RAM is a memfd mapped here: the driver writes it as the guest's CPU would."""

from __future__ import annotations

import array
import asyncio
import fcntl
import mmap
import os
import socket
import struct
import time

from qemu_mktme.vhost import protocol as p

UVA_BASE = 0x7F00_0000_0000
DESC, AVAIL, USED = 0x10000, 0x11000, 0x12000
HEADER = 0x20000         # request headers and status bytes, in the rings' 2 MiB IOMMU leaf
DATA = 0x200000           # its own 2 MiB IOMMU leaf, apart from the rings
F_NEXT, F_WRITE, F_INDIRECT = 1, 2, 4
EVENT_IDX, INDIRECT, VERSION_1 = 1 << 29, 1 << 28, 1 << 32


async def connect_unix(path: str, seconds: float = 10.0) -> socket.socket:
    """A connected non-blocking unix socket. A full listen backlog makes connect() fail with
    EAGAIN (which asyncio's sock_connect takes for success): retry until ``seconds`` pass."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    deadline = time.monotonic() + seconds
    while True:
        try:
            sock.connect(path)
            return sock
        except BlockingIOError:
            if time.monotonic() > deadline:
                sock.close()
                raise TimeoutError(f"{path}: listen backlog full for {seconds} s") from None
            await asyncio.sleep(0.01)
        except OSError:
            sock.close()
            raise


def sealed_memfd(size: int, *, seal: bool = True) -> int:
    """Guest RAM as QEMU's memory-backend-memfd makes it: sealed against growing and shrinking."""
    fd = os.memfd_create("fake-guest-ram", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    return fd


class FakeDriver:
    """Front end + driver for one queue of ``num`` entries over ``ram_size`` bytes of RAM."""

    def __init__(self, socket_path: str, ram_size: int = 8 << 20, num: int = 64, *, sealed: bool = True) -> None:
        self.path, self.size, self.num = socket_path, ram_size, num
        self.memfd = sealed_memfd(ram_size, seal=sealed)
        self.ram = mmap.mmap(self.memfd, ram_size)
        self.sock: socket.socket | None = None
        self.kick = os.eventfd(0, os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_NONBLOCK)
        self.avail_idx = 0
        self.next_desc = 0
        self.features = 0

    # ------------------------------------------------------------------ front end (QEMU's part)

    async def connect(self) -> None:
        self.sock = await connect_unix(self.path)

    async def send(self, req: int, payload: bytes = b"", fds: tuple[int, ...] = (), reply: bool = False) -> bytes | None:
        assert self.sock is not None
        data = p.encode(req, payload)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        self.sock.sendmsg([data], anc)
        if not reply:
            return None
        loop = asyncio.get_running_loop()
        head = await loop.sock_recv(self.sock, 12)
        if len(head) < 12:
            raise EOFError("backend closed the connection")
        _, flags, size = struct.unpack("<III", head)
        assert flags & p.FLAG_REPLY
        body = b""
        while len(body) < size:
            chunk = await loop.sock_recv(self.sock, size - len(body))
            if not chunk:
                raise EOFError
            body += chunk
        return body

    async def setup(self, features: int = VERSION_1 | EVENT_IDX | INDIRECT) -> None:
        await self.connect()
        offered = struct.unpack("<Q", await self.send(p.Req.GET_FEATURES, reply=True))[0]
        proto = struct.unpack("<Q", await self.send(p.Req.GET_PROTOCOL_FEATURES, reply=True))[0]
        await self.send(p.Req.SET_PROTOCOL_FEATURES, struct.pack("<Q", proto))
        await self.send(p.Req.SET_OWNER)
        self.features = (features & offered) | p.VHOST_USER_F_PROTOCOL_FEATURES
        await self.send(p.Req.SET_FEATURES, struct.pack("<Q", self.features))
        await self.send(p.Req.SET_MEM_TABLE, struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, self.size, UVA_BASE, 0),
                        fds=(self.memfd,))
        await self.send(p.Req.SET_VRING_NUM, struct.pack("<II", 0, self.num))
        await self.send(p.Req.SET_VRING_BASE, struct.pack("<II", 0, 0))
        await self.send(p.Req.SET_VRING_ADDR, struct.pack("<IIQQQQ", 0, 0, UVA_BASE + DESC, UVA_BASE + USED,
                                                            UVA_BASE + AVAIL, 0))
        await self.send(p.Req.SET_VRING_CALL, struct.pack("<Q", 0), fds=(self.call,))
        await self.send(p.Req.SET_VRING_KICK, struct.pack("<Q", 0), fds=(self.kick,))
        await self.send(p.Req.SET_VRING_ENABLE, struct.pack("<II", 0, 1))
        await self.send(p.Req.GET_FEATURES, reply=True)        # a round trip: all of the above is handled

    # ------------------------------------------------------------------ the guest's driver

    def write(self, gpa: int, data: bytes) -> None:
        self.ram[gpa:gpa + len(data)] = data

    def read(self, gpa: int, n: int) -> bytes:
        return bytes(self.ram[gpa:gpa + n])

    def desc(self, index: int, addr: int, length: int, flags: int = 0, nxt: int = 0, table: int = DESC) -> None:
        self.write(table + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))

    def used_idx(self) -> int:
        return struct.unpack("<H", self.read(USED + 2, 2))[0]

    def used_elem(self, i: int) -> tuple[int, int]:
        return struct.unpack("<II", self.read(USED + 4 + 8 * (i % self.num), 8))

    def make_available(self, head: int, *, kick: bool = True) -> None:
        self.write(AVAIL + 4 + 2 * (self.avail_idx % self.num), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.write(AVAIL + 2, struct.pack("<H", self.avail_idx))
        if kick:
            os.eventfd_write(self.kick, 1)

    async def wait_used(self, count: int, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (self.used_idx() - count) & 0x8000:     # used index still behind ``count`` (mod 2^16)
            if time.monotonic() > deadline:
                raise AssertionError(f"the device did not complete buffer {count} in {seconds} s")
            await asyncio.sleep(0.002)

    async def request(self, rtype: int, sector: int, data: bytes = b"", length: int = 0, *, indirect: bool = False,
                      seconds: float = 10.0) -> tuple[int, int, bytes]:
        """One request in a 3-descriptor chain (header, data, status): (status, used len, data read)."""
        hdr, buf, status = HEADER, DATA + 0x1000, HEADER + 0x100
        self.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
        self.write(status, b"\xee")
        if data:
            self.write(buf, data)
        n = len(data) or length
        descs = [(hdr, 16, 0)]
        if n:
            descs.append((buf, n, F_WRITE if length else 0))
        descs.append((status, 1, F_WRITE))
        head = self.next_desc % self.num
        if indirect:
            table = DATA + 0x80000
            for i, (a, ln, fl) in enumerate(descs):
                self.desc(i, a, ln, fl | (F_NEXT if i + 1 < len(descs) else 0), i + 1, table=table)
            self.desc(head, table, 16 * len(descs), F_INDIRECT)
            self.next_desc += 1
        else:
            for i, (a, ln, fl) in enumerate(descs):
                last = i + 1 == len(descs)
                self.desc((head + i) % self.num, a, ln, fl | (0 if last else F_NEXT), (head + i + 1) % self.num)
            self.next_desc += len(descs)
        before = self.used_idx()
        self.make_available(head)
        await self.wait_used((before + 1) & 0xFFFF, seconds)
        _, used_len = self.used_elem(before)
        return self.read(status, 1)[0], used_len, self.read(buf, length) if length else b""

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.ram.close()
        for fd in (self.memfd, self.kick, self.call):
            os.close(fd)
