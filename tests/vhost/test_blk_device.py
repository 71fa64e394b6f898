"""The vhost-user-blk backend against a hand-written front end and guest driver (no QEMU): the
requests the stock driver issues, what a wrong IOMMU KeyID does to the data (checked against
`cryptography`), hostile rings, a fuzzed peer."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import socket
import struct

import pytest


from fake_driver import DATA, F_INDIRECT, F_NEXT, F_WRITE, FakeDriver
from helpers import patience
from qemu_mktme.vhost.__main__ import StandaloneMemory
from qemu_mktme.vhost.blk import STATUS_NEEDS_RESET, VhostUserBlk
from qemu_mktme.vhost.protocol import Server
from reference import user_payload, xts_lines
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

KEY, TWEAK = bytes(range(16)), bytes(range(16, 32))
KEY2, TWEAK2 = bytes(range(100, 116)), bytes(range(200, 216))
T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
DISK = 1 << 20


class Rig:
    def __init__(self, tmp_path, direct: bool = False) -> None:
        self.disk = tmp_path / "disk.img"
        with open(self.disk, "wb") as f:
            f.truncate(DISK)
        self.memory = StandaloneMemory(key_payload=user_payload(KEY, TWEAK))
        self.device = VhostUserBlk(self.disk, self.memory, serial="fake-serial-1", direct=direct)
        self.server = Server(tmp_path / "blk.sock", self.device)
        self.driver = FakeDriver(str(tmp_path / "blk.sock"))

    async def __aenter__(self) -> Rig:
        await self.server.start()
        await self.driver.setup()
        return self

    async def __aexit__(self, *exc) -> None:
        self.driver.close()
        await self.server.close()
        self.device.close()

    @property
    def guest(self):
        return self.memory.devices[-1].guest

    @property
    def assigned(self):
        return self.memory.devices[-1]


def xts_decrypt_lines(key: bytes, tweak: bytes, hpa: int, data: bytes) -> bytes:
    out = []
    for i in range(0, len(data), 64):
        dec = Cipher(algorithms.AES(key + tweak), modes.XTS((hpa + i).to_bytes(16, "little"))).decryptor()
        out.append(dec.update(data[i:i + 64]) + dec.finalize())
    return b"".join(out)


@pytest.mark.parametrize("direct", [False, True], ids=["cached", "cache-none"])
async def test_requests_of_the_stock_driver_round_trip(tmp_path, direct):
    async with Rig(tmp_path, direct) as rig:
        assert (os.get_blocking(rig.device.fd), bool(fcntl.fcntl(rig.device.fd, fcntl.F_GETFL) & os.O_DIRECT)) == (True, direct)
        d = rig.driver
        pattern = os.urandom(8192)
        assert (await d.request(T_OUT, 8, pattern))[:2] == (0, 1)
        assert (await d.request(T_FLUSH, 0))[:2] == (0, 1)
        assert rig.disk.read_bytes()[8 * 512:8 * 512 + 8192] == pattern
        status, used, back = await d.request(T_IN, 8, length=8192, indirect=True)
        assert (status, used, back) == (0, 8193, pattern)
        status, used, ident = await d.request(T_GET_ID, 0, length=20)
        assert status == 0 and ident.rstrip(b"\0") == b"fake-serial-1"
        assert (await d.request(99, 0))[0] == 2                                     # UNSUPP
        assert (await d.request(T_IN, DISK // 512 - 1, length=1024))[0] == 1        # past the end: IOERR
        assert (await d.request(T_OUT, 0, b"x" * 100))[0] == 1                      # not whole sectors
        # the device read the guest's plaintext through the VM's KeyID: nothing for the sanitizer
        assert rig.assigned.sanitizer.count == 0
        assert rig.assigned.counters.read_bytes >= 8192 and rig.assigned.counters.write_bytes >= 8192
        assert rig.device.counters["unsupported"] == 1


async def test_a_wrong_iommu_keyid_corrupts_dma_as_hardware_would(tmp_path):
    async with Rig(tmp_path) as rig:
        d, guest = rig.driver, rig.guest
        await d.request(T_FLUSH, 0)                       # rings in use, memory bound
        other = rig.memory.host.keys.add("other", user_payload(KEY2, TWEAK2), tenant="vhost")
        keyid2 = rig.memory.host.keys.use(other, "test", tenant="vhost")
        foreign = []
        guest.foreign_write_hooks.append(lambda gpa, n, k: foreign.append((gpa, n, k)))
        assert guest.set_iommu_keyid(keyid2, DATA, 2 << 20) == 1        # the data buffers' 2 MiB leaf only
        pattern = bytes(range(256)) * 16
        assert (await d.request(T_OUT, 0, pattern))[0] == 0
        on_disk = rig.disk.read_bytes()[:4096]
        hpa = guest.hpa_of(DATA + 0x1000)
        # DRAM holds the guest's data under its key; the device decrypted it with KeyID 2's key
        assert on_disk == xts_decrypt_lines(KEY2, TWEAK2, hpa, xts_lines(KEY, TWEAK, hpa, pattern))
        assert on_disk != pattern
        reports = [r for r in rig.assigned.sanitizer.reports if r.direction == "read"]
        assert reports and reports[0].keyid == keyid2 and reports[0].expected_keyid == guest.keyid
        assert reports[0].iova == DATA + 0x1000 and reports[0].nbytes == 4096 and reports[0].hpa == hpa
        # reading back: the device writes through KeyID 2, the guest sees garbage, marked foreign
        with open(rig.disk, "r+b") as f:
            f.write(pattern)
        status, _, back = await d.request(T_IN, 0, length=4096)
        assert status == 0 and back != pattern
        assert back == xts_decrypt_lines(KEY, TWEAK, hpa, xts_lines(KEY2, TWEAK2, hpa, pattern))
        assert (DATA + 0x1000, 4096, keyid2) in foreign
        guest.set_iommu_keyid(guest.keyid)                # repaired: the next DMA is right again
        assert (await d.request(T_IN, 0, length=4096))[2] == pattern


async def test_rings_behind_a_wrong_keyid_need_a_reset_and_the_backend_serves_on(tmp_path, caplog):
    async with Rig(tmp_path) as rig:
        d = rig.driver
        await d.request(T_FLUSH, 0)
        rig.guest.set_iommu_keyid(9, 0, 2 << 20)          # the rings' leaf
        d.desc(5, DATA, 16)
        d.make_available(5)
        await asyncio.sleep(0.05)
        deadline = asyncio.get_running_loop().time() + patience(5)
        while not rig.device.status & STATUS_NEEDS_RESET:
            assert asyncio.get_running_loop().time() < deadline, "the device never gave up on the ring"
            await asyncio.sleep(0.01)
        assert "device needs reset" in caplog.text
    async with Rig(tmp_path) as rig:                      # a new front end, a working device
        assert (await rig.driver.request(T_FLUSH, 0))[0] == 0


async def test_hostile_chains_get_an_error_status_and_the_device_keeps_serving(tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    async with Rig(tmp_path) as rig:
        d = rig.driver
        hdr, status = DATA, DATA + 0x800
        d.write(hdr, struct.pack("<IIQ", T_IN, 0, 0))
        cases = {
            "loop": [(0, hdr, 16, F_NEXT, 1), (1, status, 1, F_WRITE | F_NEXT, 0)],
            "next out of range": [(0, hdr, 16, F_NEXT, 500)],
            "outside the domain": [(0, hdr, 16, F_NEXT, 1), (1, 0x4000_0000, 4096, F_WRITE | F_NEXT, 2), (2, status, 1, F_WRITE, 0)],
            "crossing the end of RAM": [(0, hdr, 16, F_NEXT, 1), (1, d.size - 512, 1024, F_WRITE | F_NEXT, 2), (2, status, 1, F_WRITE, 0)],
            "zero-length header": [(0, hdr, 0, F_NEXT, 1), (1, status, 1, F_WRITE, 0)],
            "readable after writable": [(0, status, 1, F_WRITE | F_NEXT, 1), (1, hdr, 16, 0, 0)],
            "no status byte": [(0, hdr, 16, 0, 0)],
            "nested indirect": [(0, DATA + 0x4000, 16, F_INDIRECT, 0)],
        }
        d.desc(0, DATA + 0x4000, 16, F_INDIRECT, 0, table=DATA + 0x4000)     # the indirect table points at itself
        for name, descs in cases.items():
            if name != "nested indirect":
                for index, addr, length, flags, nxt in descs:
                    d.desc(index, addr, length, flags, nxt)
            else:
                d.desc(0, DATA + 0x4000, 16, F_INDIRECT, 0)
            d.write(status, b"\xee")
            before = d.used_idx()
            d.make_available(0)
            await d.wait_used((before + 1) & 0xFFFF, patience(5))
            head, used = d.used_elem(before)
            assert head == 0 and used in (0, 1), name
            if used:
                assert d.read(status, 1) == b"\x01", name          # IOERR where a status byte exists
        assert not rig.device.status & STATUS_NEEDS_RESET
        d.next_desc = 8
        assert (await d.request(T_OUT, 0, b"ok" * 256))[0] == 0            # still serving
        assert rig.assigned.counters.faults >= 2
        assert caplog.text.count("bad descriptor chain") >= 3


async def test_a_fuzzed_peer_loses_its_connection_not_the_backend(tmp_path, caplog):
    caplog.set_level(logging.ERROR)
    async with Rig(tmp_path) as rig:
        pass
    device = VhostUserBlk(rig.disk, StandaloneMemory())
    server = Server(tmp_path / "fuzz.sock", device)
    await server.start()
    loop = asyncio.get_running_loop()
    garbage = [struct.pack("<III", 1, 0x2, 0),                   # version 2
               struct.pack("<III", 1, 0x1, 1 << 30),             # a 1 GiB payload
               struct.pack("<III", 77, 0x1, 0),                  # unknown request
               struct.pack("<III", 8, 0x1, 3) + b"abc",          # SET_VRING_NUM with 3 bytes
               struct.pack("<III", 8, 0x1, 8) + struct.pack("<II", 0, 1000),   # not a power of two
               struct.pack("<III", 5, 0x1, 40) + bytes(40)]      # SET_MEM_TABLE without an fd
    try:
        for blob in garbage:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            await loop.sock_connect(s, str(tmp_path / "fuzz.sock"))
            await loop.sock_sendall(s, blob)
            assert await asyncio.wait_for(loop.sock_recv(s, 64), patience(5)) == b""   # closed
            s.close()
        assert caplog.text.count("broke the vhost-user protocol") == len(garbage)
        # a memory table whose "memory" is an eventfd: that peer goes, with a clear line
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        await loop.sock_connect(s, str(tmp_path / "fuzz.sock"))
        efd = os.eventfd(0)
        s.sendmsg([struct.pack("<III", 5, 1, 40) + struct.pack("<IIQQQQ", 1, 0, 0, 1 << 20, 0, 0)],
                  [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("<i", efd))])
        os.close(efd)
        assert await asyncio.wait_for(loop.sock_recv(s, 64), patience(5)) == b""
        s.close()
        assert "memory region at GPA 0x0: not a memory file" in caplog.text
        d = FakeDriver(str(tmp_path / "fuzz.sock"))
        try:
            await d.setup()
            assert (await d.request(T_FLUSH, 0))[0] == 0
        finally:
            d.close()
    finally:
        await server.close()
        device.close()


def test_a_write_that_makes_no_progress_is_an_error_not_a_spin(tmp_path, monkeypatch):
    """pwritev returning 0 for bytes left (no progress) ends the request with an error (the
    caller answers IOERR); it used to loop for ever on the loop thread."""
    import numpy as np

    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(8192))
    device = VhostUserBlk(disk, lambda regions: None)
    try:
        calls = []

        def stalled(call, arrays, offset):
            calls.append(offset)
            return 512 if len(calls) == 1 else 0

        monkeypatch.setattr(device, "_io", stalled)
        with pytest.raises(OSError, match="stopped after 512"):
            device._writev([np.zeros(4096, np.uint8)], 0, 4096)
        assert calls == [0, 512]
    finally:
        device.close()
