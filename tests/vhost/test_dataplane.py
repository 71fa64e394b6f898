"""The compiled dataplane (qemu_mktme/vhost/native) against the hand-written front end: it serves
IN/OUT/FLUSH itself once the IOMMU translation mirror holds the buffers, and everything else
(a first touch, a foreign KeyID, a fault, GET_ID, transfer hooks) goes to the Python path in
order; stop and kill leave no thread behind. Ciphertext is checked against `cryptography`."""

from __future__ import annotations

import asyncio
import os
import struct
import threading

import pytest

from fake_driver import AVAIL, DATA, F_INDIRECT, F_NEXT, F_WRITE, HEADER, UVA_BASE, FakeDriver
from helpers import patience
from qemu_mktme.vhost import native
from qemu_mktme.vhost.__main__ import StandaloneMemory
from qemu_mktme.vhost.blk import VhostUserBlk
from qemu_mktme.vhost.protocol import Req, Server
from reference import user_payload, xts_lines
import test_blk_device
from test_blk_device import KEY, KEY2, TWEAK, TWEAK2, xts_decrypt_lines

T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
DISK = 4 << 20

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"no compiled dataplane: {native.status()}")


class Rig(test_blk_device.Rig):
    """test_blk_device's rig with a 4 MiB disk of random bytes."""

    def __init__(self, tmp_path, direct: bool = False, **device: int) -> None:   # not super().__init__: its own disk
        self.disk = tmp_path / "disk.img"
        self.disk.write_bytes(os.urandom(DISK))
        self.memory = StandaloneMemory(key_payload=user_payload(KEY, TWEAK))
        self.device = VhostUserBlk(self.disk, self.memory, serial="dp-serial", direct=direct, **device)
        self.server = Server(tmp_path / "blk.sock", self.device)
        self.driver = FakeDriver(str(tmp_path / "blk.sock"), 8 << 20, 64)

    @property
    def served(self) -> int:
        mirror = self.device._mirror
        return mirror.total() if mirror is not None else 0


def dp_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("vhost-blk0-q")]


def chain(d: FakeDriver, head: int, rtype: int, sector: int, buf: int, n: int, slot: int) -> None:
    """Header, one data buffer, status: descriptors head..head+2, header/status at slot."""
    hdr, status = HEADER + 0x40 * slot, HEADER + 0x1000 + slot
    d.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
    d.write(status, b"\xee")
    d.desc(head, hdr, 16, F_NEXT, head + 1)
    d.desc(head + 1, buf, n, F_NEXT | (F_WRITE if rtype in (T_IN, T_GET_ID) else 0), head + 2)
    d.desc(head + 2, status, 1, F_WRITE)


async def test_reads_and_writes_are_served_natively_and_land_as_the_model_says(tmp_path):
    async with Rig(tmp_path) as rig:
        d = rig.driver
        image = rig.disk.read_bytes()
        assert (await d.request(T_IN, 0, length=8192))[2] == image[:8192]    # first touch: Python
        before = rig.served
        for sector in (8, 64, 1000, DISK // 512 - 16):
            status, used, back = await d.request(T_IN, sector, length=8192)
            assert (status, used, back) == (0, 8193, image[sector * 512:sector * 512 + 8192])
        pattern = os.urandom(16384)
        assert (await d.request(T_OUT, 40, pattern))[:2] == (0, 1)
        assert (await d.request(T_FLUSH, 0))[:2] == (0, 1)
        assert rig.disk.read_bytes()[40 * 512:40 * 512 + 16384] == pattern
        assert rig.served - before == 6                                     # all of them in C
        # the device wrote through the VM's KeyID: DRAM holds AES-XTS of the data under its key
        assert (await d.request(T_IN, 40, length=4096))[2] == pattern[:4096]
        hpa = rig.guest.hpa_of(DATA + 0x1000)
        assert rig.guest.dram(DATA + 0x1000, 4096) == xts_lines(KEY, TWEAK, hpa, pattern[:4096])
        c = rig.assigned.counters
        assert c.write_bytes >= 4 * 8192 + 4096 and c.read_bytes >= 16384 and c.faults == 0
        assert rig.assigned.sanitizer.count == 0 and rig.device.counters["requests"] == 8


async def test_a_retagged_domain_takes_the_python_path_on_the_next_request(tmp_path):
    async with Rig(tmp_path) as rig:
        d, guest = rig.driver, rig.guest
        pattern = bytes(range(256)) * 16
        await d.request(T_OUT, 0, pattern)
        await d.request(T_OUT, 0, pattern)
        served = rig.served
        assert served >= 1
        other = rig.memory.host.keys.add("other", user_payload(KEY2, TWEAK2), tenant="vhost")
        keyid2 = rig.memory.host.keys.use(other, "test", tenant="vhost")
        assert guest.set_iommu_keyid(keyid2, DATA, 2 << 20) == 1           # the data leaf only
        assert (await d.request(T_OUT, 8, pattern))[0] == 0
        hpa = guest.hpa_of(DATA + 0x1000)
        on_disk = rig.disk.read_bytes()[8 * 512:8 * 512 + 4096]
        assert on_disk == xts_decrypt_lines(KEY2, TWEAK2, hpa, xts_lines(KEY, TWEAK, hpa, pattern))
        assert rig.assigned.sanitizer.count >= 1 and rig.served == served   # Python served it
        guest.set_iommu_keyid(guest.keyid)                                  # repaired
        await d.request(T_IN, 0, length=4096)                               # first touch again
        assert (await d.request(T_IN, 0, length=4096))[2] == pattern and rig.served > served


async def test_a_fault_is_an_ioerr_and_the_queue_serves_on(tmp_path):
    async with Rig(tmp_path) as rig:
        d = rig.driver
        await d.request(T_IN, 0, length=4096)
        chain(d, 10, T_IN, 0, 64 << 20, 4096, 1)                # outside the 8 MiB domain
        before = d.used_idx()
        d.make_available(10)
        await d.wait_used(before + 1, patience(5))
        assert d.read(HEADER + 0x1001, 1) == b"\x01"
        assert rig.assigned.counters.faults >= 1
        assert (await d.request(T_IN, 0, length=4096))[0] == 0


async def test_a_hand_off_mid_batch_keeps_order_and_ring_state(tmp_path):
    async with Rig(tmp_path) as rig:
        d = rig.driver
        image = rig.disk.read_bytes()
        await d.request(T_IN, 0, length=4096)
        served = rig.served
        kinds = [T_IN, T_IN, T_GET_ID, T_IN, T_GET_ID, T_IN]
        base = d.used_idx()
        for i, kind in enumerate(kinds):                     # several chains, one kick
            chain(d, 20 + 3 * i, kind, 8 * i, DATA + 0x1000 * (i + 1), 20 if kind == T_GET_ID else 4096, i + 1)
            d.make_available(20 + 3 * i, kick=False)
        os.eventfd_write(d.kick, 1)
        await d.wait_used(base + len(kinds), patience(5))
        assert [d.used_elem(base + i) for i in range(len(kinds))] == \
            [(20 + 3 * i, 21 if k == T_GET_ID else 4097) for i, k in enumerate(kinds)]
        for i, kind in enumerate(kinds):
            got = d.read(DATA + 0x1000 * (i + 1), 20 if kind == T_GET_ID else 4096)
            assert got == (b"dp-serial".ljust(20, b"\0") if kind == T_GET_ID else image[i * 4096:(i + 1) * 4096])
            assert d.read(HEADER + 0x1000 + i + 1, 1) == b"\x00"
        assert rig.served - served == 4
        assert (await d.request(T_IN, 0, length=4096))[0] == 0               # and on it goes


async def test_transfer_hooks_see_every_request(tmp_path):
    async with Rig(tmp_path) as rig:
        d = rig.driver
        await d.request(T_IN, 0, length=4096)
        seen = []
        rig.device.transfer_hooks.append(seen.append)
        served = rig.served
        for _ in range(3):
            await d.request(T_IN, 0, length=4096)
        assert len(seen) == 3 and rig.served == served
        rig.device.transfer_hooks.remove(seen.append)
        await d.request(T_IN, 0, length=4096)
        assert rig.served == served + 1


async def test_stop_while_busy_returns_the_ring_state(tmp_path):
    async with Rig(tmp_path) as rig:
        d = rig.driver
        await d.request(T_IN, 0, length=4096)
        for i in range(20):
            chain(d, 3 * i, T_IN, 0, DATA + 0x8000 * i, 1 << 15, i + 1)
            d.make_available(3 * i, kick=False)
        os.eventfd_write(d.kick, 1)
        reply = await d.send(Req.GET_VRING_BASE, struct.pack("<II", 0, 0), reply=True)
        _, base = struct.unpack("<II", reply)
        assert base == d.used_idx() and not dp_threads()       # every chain taken is completed
        assert base <= d.avail_idx


async def test_a_killed_front_end_leaves_no_thread_or_mapping(tmp_path):
    async with Rig(tmp_path) as rig:
        d = rig.driver
        await d.request(T_IN, 0, length=4096)
        assert dp_threads()
        for i in range(20):
            chain(d, 3 * i, T_OUT, 0, DATA + 0x8000 * i, 1 << 15, i + 1)
            d.make_available(3 * i, kick=False)
        os.eventfd_write(d.kick, 1)
        d.sock.close()
        d.sock = None
        deadline = asyncio.get_running_loop().time() + patience(5)
        while dp_threads() or rig.memory.devices:
            assert asyncio.get_running_loop().time() < deadline, "threads or the memory table outlived the peer"
            await asyncio.sleep(0.01)
        assert rig.device._mirror is None and rig.device.memory is None


async def test_the_python_switch_serves_without_threads(tmp_path, monkeypatch):
    monkeypatch.setenv(native.ENV_SELECT, "python")
    monkeypatch.setattr(native, "_state", {})
    async with Rig(tmp_path) as rig:
        image = rig.disk.read_bytes()
        for _ in range(2):
            assert (await rig.driver.request(T_IN, 8, length=4096))[2] == image[4096:8192]
        assert not dp_threads() and rig.device._mirror is None
        assert native.status() == f"Python path ({native.ENV_SELECT}=python)"
    monkeypatch.setenv(native.ENV_SELECT, "bogus")
    monkeypatch.setattr(native, "_state", {})
    with pytest.raises(native.DataplaneUnavailable, match="expected python or native"):
        native.library()


async def test_a_dead_call_fd_is_dropped_once_and_a_hung_up_kick_stops_the_queue(tmp_path, caplog):
    async with Rig(tmp_path) as rig:
        d = rig.driver
        await d.request(T_IN, 0, length=4096)
        await d.request(T_IN, 0, length=4096)
        r, w = os.pipe()
        await d.send(Req.SET_VRING_CALL, struct.pack("<Q", 0), fds=(w,))   # the thread restarts on it
        await d.send(Req.GET_FEATURES, reply=True)   # a round trip: handled
        os.close(w)
        os.close(r)                                   # nobody reads: the next signal gets EPIPE
        served = rig.served
        for _ in range(3):
            d.write(AVAIL + 4 + 2 * d.num, struct.pack("<H", d.used_idx()))   # used_event: interrupt me
            assert (await d.request(T_IN, 0, length=4096))[0] == 0
        assert rig.served == served + 3 and rig.device.queues[0].call == -1
        assert caplog.text.count("call fd unusable") == 1
        kr, kw = os.pipe()
        await d.send(Req.SET_VRING_KICK, struct.pack("<Q", 0), fds=(kr,))
        await d.send(Req.GET_FEATURES, reply=True)
        assert dp_threads()
        os.close(kw)                                  # the kick's writer hangs up
        deadline = asyncio.get_running_loop().time() + patience(5)
        while dp_threads():
            assert asyncio.get_running_loop().time() < deadline, "the queue outlived its kick fd"
            await asyncio.sleep(0.01)
        assert "kick fd unusable (its writer hung up)" in caplog.text
        assert not rig.device.queues[0].started


async def test_cache_none_takes_unaligned_buffers_through_the_page_cache(tmp_path):
    async with Rig(tmp_path, direct=True) as rig:
        d = rig.driver
        image = rig.disk.read_bytes()
        await d.request(T_IN, 0, length=4096)
        served = rig.served
        for i, buf in enumerate((DATA + 0x10000, DATA + 0x20001)):     # aligned, then not (EINVAL)
            chain(d, 30, T_IN, 16, buf, 4096, 1)
            d.make_available(30)
            await d.wait_used(d.avail_idx, patience(5))
            assert d.read(HEADER + 0x1001, 1) == b"\x00" and d.read(buf, 4096) == image[8192:12288], i
            pattern = os.urandom(4096)
            d.write(buf, pattern)
            chain(d, 30, T_OUT, 24 + 8 * i, buf, 4096, 1)
            d.make_available(30)
            await d.wait_used(d.avail_idx, patience(5))
            assert rig.disk.read_bytes()[(24 + 8 * i) * 512:][:4096] == pattern
        assert rig.served - served == 4


def test_native_required_but_unbuildable_is_one_clear_error_at_device_creation(tmp_path, monkeypatch):
    monkeypatch.setenv(native.ENV_SELECT, "native")
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("PATH", str(tmp_path))                     # no gcc
    monkeypatch.setenv("QEMU_MKTME_CACHE", str(tmp_path / "cache"))  # nothing built yet
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    with pytest.raises(native.DataplaneUnavailable, match="gcc not found"):
        VhostUserBlk(disk, lambda regions: None)
    monkeypatch.delenv(native.ENV_SELECT)
    monkeypatch.setattr(native, "_state", {})
    device = VhostUserBlk(disk, lambda regions: None)             # unset: the Python path, said once
    assert native.status().startswith("Python path (gcc not found")
    device.close()


async def test_two_queues_are_served_by_two_threads_at_once(tmp_path):
    """Queue 1 with its own rings beside the driver's queue 0: both served natively, in their
    own threads, through the one mirror."""
    desc1, avail1, used1 = 0x13000, 0x14000, 0x15000
    async with Rig(tmp_path) as rig:
        d = rig.driver
        image = rig.disk.read_bytes()
        kick1, call1 = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
        try:
            await d.send(Req.SET_VRING_NUM, struct.pack("<II", 1, d.num))
            await d.send(Req.SET_VRING_BASE, struct.pack("<II", 1, 0))
            await d.send(Req.SET_VRING_ADDR, struct.pack("<IIQQQQ", 1, 0, UVA_BASE + desc1, UVA_BASE + used1,
                                                          UVA_BASE + avail1, 0))
            await d.send(Req.SET_VRING_CALL, struct.pack("<Q", 1), fds=(call1,))
            await d.send(Req.SET_VRING_KICK, struct.pack("<Q", 1), fds=(kick1,))
            await d.send(Req.SET_VRING_ENABLE, struct.pack("<II", 1, 1))
            await d.send(Req.GET_FEATURES, reply=True)
            await d.request(T_IN, 0, length=4096)                    # the data leaf in the mirror
            assert sorted(dp_threads()) == ["vhost-blk0-q0", "vhost-blk0-q1"]
            served = rig.served
            rounds, base = 20, {0: d.avail_idx, 1: 0}
            for i in range(rounds):                                   # one chain on each queue per round
                for q, table, avail in ((0, 0x10000, 0x11000), (1, desc1, avail1)):
                    buf, slot = DATA + 0x10000 * (2 * q + 1) + 0x1000 * (i % 8), 1 + q
                    hdr, status = HEADER + 0x40 * slot, HEADER + 0x1000 + slot
                    d.write(hdr, struct.pack("<IIQ", T_IN, 0, 8 * (i + q)))
                    d.desc(0, hdr, 16, F_NEXT, 1, table=table)
                    d.desc(1, buf, 4096, F_NEXT | F_WRITE, 2, table=table)
                    d.desc(2, status, 1, F_WRITE, table=table)
                    d.write(avail + 4 + 2 * ((base[q] + i) % d.num), struct.pack("<H", 0))
                    d.write(avail + 2, struct.pack("<H", base[q] + i + 1))
                os.eventfd_write(d.kick, 1)
                os.eventfd_write(kick1, 1)
                deadline = asyncio.get_running_loop().time() + patience(5)
                while (d.used_idx(), struct.unpack("<H", d.read(used1 + 2, 2))[0]) != (base[0] + i + 1, i + 1):
                    assert asyncio.get_running_loop().time() < deadline, "a queue stalled"
                    await asyncio.sleep(0.001)
                for q in (0, 1):
                    buf = DATA + 0x10000 * (2 * q + 1) + 0x1000 * (i % 8)
                    assert d.read(buf, 4096) == image[(8 * (i + q)) * 512:][:4096]
            assert rig.served - served == 2 * rounds
        finally:
            os.close(kick1)
            os.close(call1)


def publish(d: FakeDriver, heads: list[int]) -> None:
    """Make the chains at ``heads`` available at once (one avail-index update, one kick)."""
    for i, head in enumerate(heads):
        d.write(AVAIL + 4 + 2 * ((d.avail_idx + i) % d.num), struct.pack("<H", head))
    d.avail_idx = (d.avail_idx + len(heads)) & 0xFFFF
    d.write(AVAIL + 2, struct.pack("<H", d.avail_idx))
    os.eventfd_write(d.kick, 1)


async def served_batch(rig: Rig, runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Publish one chain (header, one data buffer, status) per (type, sector) of 4 KiB each at
    once; (status, used length) of each, in ring order."""
    d = rig.driver
    base = d.used_idx()
    for i, (kind, sector) in enumerate(runs):
        chain(d, 3 * i, kind, sector, DATA + 0x10000 + 0x1000 * i, 4096, i + 1)
    publish(d, [3 * i for i in range(len(runs))])
    await d.wait_used((base + len(runs)) & 0xFFFF, patience(5))
    assert [d.used_elem(base + i)[0] for i in range(len(runs))] == [3 * i for i in range(len(runs))]
    return [(d.read(HEADER + 0x1000 + i + 1, 1)[0], d.used_elem(base + i)[1]) for i in range(len(runs))]


@pytest.mark.parametrize("direct", [False, True], ids=["writeback", "none"])
async def test_adjacent_requests_of_one_batch_are_one_io_and_a_gap_or_another_type_ends_the_run(tmp_path, direct):
    """As QEMU's virtio_blk_submit_multireq: adjacent same-type chains published together are one
    preadv/pwritev (the ``merged`` counter counts the I/Os saved); the bytes are the file's."""
    async with Rig(tmp_path, direct=direct) as rig:
        d = rig.driver
        await d.request(T_IN, 0, length=4096)                            # first touch: the mirror
        rig.device.counters                                              # noqa: B018 (zeroes the delta)
        merged, served = rig.device.counters["merged"], rig.served
        patterns = [os.urandom(4096) for _ in range(6)]
        for i, p in enumerate(patterns):
            d.write(DATA + 0x10000 + 0x1000 * i, p)
        # W W W W | R | W (adjacent to the 4th but after a read): one run of 4, then 1, then 1
        runs = [(T_OUT, 100), (T_OUT, 108), (T_OUT, 116), (T_OUT, 124), (T_IN, 0), (T_OUT, 132)]
        d.write(DATA + 0x10000 + 0x1000 * 5, patterns[5])
        assert await served_batch(rig, runs) == [(0, 1)] * 4 + [(0, 4097), (0, 1)]
        image = rig.disk.read_bytes()
        assert image[100 * 512:100 * 512 + 4 * 4096] == b"".join(patterns[:4])
        assert image[132 * 512:132 * 512 + 4096] == patterns[5]
        assert rig.device.counters["merged"] - merged == 3 and rig.served - served == 6
        # R R R | R at a gap | R R adjacent again: runs of 3, then 3 (the gap starts a new run)
        runs = [(T_IN, 100), (T_IN, 108), (T_IN, 116), (T_IN, 400), (T_IN, 408), (T_IN, 416)]
        assert await served_batch(rig, runs) == [(0, 4097)] * 6
        for i, (_, sector) in enumerate(runs):
            assert d.read(DATA + 0x10000 + 0x1000 * i, 4096) == image[sector * 512:sector * 512 + 4096], i
        assert rig.device.counters["merged"] - merged == 3 + 4 and rig.served - served == 12
        # a run reaching the disk's end: the chain past it is not merged and Python answers IOERR
        last = DISK // 512 - 8
        assert await served_batch(rig, [(T_IN, last - 8), (T_IN, last), (T_IN, last + 8)]) == \
            [(0, 4097), (0, 4097), (1, 1)]
        assert d.read(DATA + 0x11000, 4096) == image[-4096:]
        assert rig.device.counters["merged"] - merged == 3 + 4 + 1


def indirect_chain(d: FakeDriver, head: int, rtype: int, sector: int, buf: int, segs: int, slot: int) -> None:
    """Header, ``segs`` data buffers of 512 bytes from ``buf`` on, status: in an indirect table."""
    hdr, status, table = HEADER + 0x40 * slot, HEADER + 0x1000 + slot, DATA + 0x100000 + 0x2000 * slot
    d.write(hdr, struct.pack("<IIQ", rtype, 0, sector))
    d.write(status, b"\xee")
    d.desc(0, hdr, 16, F_NEXT, 1, table=table)
    for i in range(segs):
        d.desc(1 + i, buf + 512 * i, 512, F_NEXT | (F_WRITE if rtype == T_IN else 0), 2 + i, table=table)
    d.desc(1 + segs, status, 1, F_WRITE, table=table)
    d.desc(head, table, 16 * (segs + 2), F_INDIRECT)


async def test_a_run_beyond_iov_max_segments_is_split(tmp_path):
    """4 chains of 300 segments each: 3 fit in one pwritev of <= 1024 segments, the 4th is the
    next I/O; every byte lands and reads back."""
    async with Rig(tmp_path) as rig:
        d = rig.driver
        await d.request(T_IN, 0, length=4096)
        rig.device.counters                                              # noqa: B018
        merged, served = rig.device.counters["merged"], rig.served
        segs, size = 300, 300 * 512
        pattern = os.urandom(4 * size)
        d.write(DATA + 0x10000, pattern)
        for i in range(4):
            indirect_chain(d, i, T_OUT, 200 + i * segs, DATA + 0x10000 + i * size, segs, i + 1)
        base = d.used_idx()
        publish(d, [0, 1, 2, 3])
        await d.wait_used((base + 4) & 0xFFFF, patience(5))
        assert [d.used_elem(base + i) for i in range(4)] == [(i, 1) for i in range(4)]
        assert all(d.read(HEADER + 0x1000 + i + 1, 1) == b"\x00" for i in range(4))
        assert rig.disk.read_bytes()[200 * 512:200 * 512 + 4 * size] == pattern
        assert rig.device.counters["merged"] - merged == 2 and rig.served - served == 4
        d.write(DATA + 0x10000, bytes(4 * size))
        for i in range(4):
            indirect_chain(d, i, T_IN, 200 + i * segs, DATA + 0x10000 + i * size, segs, i + 1)
        base = d.used_idx()
        publish(d, [0, 1, 2, 3])
        await d.wait_used((base + 4) & 0xFFFF, patience(5))
        assert [d.used_elem(base + i) for i in range(4)] == [(i, size + 1) for i in range(4)]
        assert d.read(DATA + 0x10000, 4 * size) == pattern
        assert rig.device.counters["merged"] - merged == 4


async def test_an_io_error_of_a_merged_run_gives_each_request_its_status_through_python(tmp_path):
    """The disk fd turned read-only under the device: the merged pwritev fails, the first chain
    goes to Python (nothing of the run pushed), which answers each write IOERR in order; the
    reads after them are one merged preadv again."""
    async with Rig(tmp_path) as rig:
        d = rig.driver
        image = rig.disk.read_bytes()
        await d.request(T_IN, 0, length=4096)
        rig.device.counters                                              # noqa: B018
        merged, errors = rig.device.counters["merged"], rig.device.counters["errors"]
        fd = rig.device.fd
        saved = os.dup(fd)
        readonly = os.open(rig.disk, os.O_RDONLY)
        try:
            os.dup2(readonly, fd)
            runs = [(T_OUT, 100), (T_OUT, 108), (T_OUT, 116), (T_IN, 200), (T_IN, 208)]
            assert await served_batch(rig, runs) == [(1, 1), (1, 1), (1, 1), (0, 4097), (0, 4097)]
        finally:
            os.dup2(saved, fd)
            os.close(saved)
            os.close(readonly)
        assert rig.disk.read_bytes() == image
        assert d.read(DATA + 0x13000, 8192) == image[200 * 512:200 * 512 + 8192]
        c = rig.device.counters
        assert c["errors"] - errors == 3 and c["merged"] - merged == 1
        assert await served_batch(rig, [(T_OUT, 100), (T_OUT, 108)]) == [(0, 1), (0, 1)]
