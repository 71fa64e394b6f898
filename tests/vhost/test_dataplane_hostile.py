"""A hostile review of the compiled dataplane (qemu_mktme/vhost/native): a driver rewriting its
rings under the C thread, domain changes racing a stream, stop racing a hand-off, the counters
against the Python path's, a cached library that is not ours, and no thread, fd or mapping left
after a reset, a new memory table or a killed front end."""

from __future__ import annotations

import asyncio
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fake_driver import DATA, F_INDIRECT, F_NEXT, F_WRITE, HEADER, UVA_BASE, FakeDriver
from helpers import patience
from qemu_mktme.vhost import dataplane, native
from qemu_mktme.vhost.protocol import Req
from test_dataplane import Rig, chain, dp_threads

T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"no compiled dataplane: {native.status()}")


async def _sequence(d: FakeDriver) -> None:
    """IN, OUT, FLUSH, an indirect IN: what both paths serve alike."""
    await d.request(T_IN, 8, length=8192)
    await d.request(T_OUT, 16, os.urandom(4096))
    await d.request(T_FLUSH, 0)
    await d.request(T_IN, 8, length=4096, indirect=True)


async def _counted(tmp_path, monkeypatch, select: str) -> tuple[dict[str, int], dict[str, int], int]:
    monkeypatch.setenv(native.ENV_SELECT, select)
    monkeypatch.setattr(native, "_state", {})
    tmp = tmp_path / select
    tmp.mkdir()
    async with Rig(tmp, poll_max_ns=0) as rig:      # polling reads the avail index as it likes: see test_polling
        await _sequence(rig.driver)                  # first touches: the IOTLB and the mirror learn
        before = rig.assigned.counters.as_dict()
        requests = rig.device.counters["requests"]
        await _sequence(rig.driver)
        after = rig.assigned.counters.as_dict()
        served = rig.served
        return ({k: after[k] - before[k] for k in after}, {"requests": rig.device.counters["requests"] - requests},
                served)


async def test_dma_counters_are_the_python_paths(tmp_path, monkeypatch):
    """``run --trace`` prints these: the same requests count the same DMA on both paths."""
    python, python_req, _ = await _counted(tmp_path, monkeypatch, "python")
    compiled, compiled_req, served = await _counted(tmp_path, monkeypatch, "native")
    assert served >= 4
    assert compiled_req == python_req
    assert compiled == python


class _SlowClearEvent(threading.Event):
    """An Event whose clear() lingers when asked: widens the window between the queue thread's
    look at ``stopping`` and its wait for the loop."""

    slow = False
    hung: list[str] = []

    def clear(self) -> None:
        if _SlowClearEvent.slow:
            time.sleep(0.3)
        super().clear()

    def wait(self, timeout: float | None = None) -> bool:
        if super().wait(patience(2)):
            return True
        _SlowClearEvent.hung.append(threading.current_thread().name)
        return True                                  # let it go: the test fails, not hangs


async def test_a_stop_racing_a_hand_off_never_hangs_the_loop(tmp_path, monkeypatch):
    class Threading:
        Event = _SlowClearEvent
        Thread = threading.Thread
    monkeypatch.setattr(dataplane, "threading", Threading)
    _SlowClearEvent.hung = []
    async with Rig(tmp_path) as rig:
        d = rig.driver
        await d.request(T_IN, 0, length=4096)
        await d.request(T_IN, 0, length=4096)
        _SlowClearEvent.slow = True
        try:
            chain(d, 10, T_GET_ID, 0, DATA + 0x1000, 20, 1)    # C hands it to Python
            d.make_available(10)
            await asyncio.sleep(0.1)                         # the thread is in clear() now
            await d.send(Req.GET_VRING_BASE, struct.pack("<II", 0, 0), reply=True)
        finally:
            _SlowClearEvent.slow = False
        assert not dp_threads()
    assert _SlowClearEvent.hung == [], "the queue thread waited for a hand-off after stop() let it go"


def test_a_foreign_cached_library_is_rebuilt_not_a_crash(tmp_path, monkeypatch):
    """A shared object at the cache path that is not the dataplane (no dp_api_version)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("QEMU_MKTME_CACHE", str(cache))
    monkeypatch.delenv(native.ENV_SELECT, raising=False)
    path = native.build()
    other = tmp_path / "other.c"
    other.write_text("int something_else(void) { return 1; }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(path), str(other)], check=True)
    monkeypatch.setattr(native, "_state", {})
    lib = native.library()
    assert lib is not None and lib.dp_api_version() == native.API_VERSION
    path.unlink()                                        # and a truncated one, in a new process
    path.write_bytes(b"\x7fELF garbage")
    probe = "from qemu_mktme.vhost import native; print(native.library() is not None, native.status())"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         timeout=patience(30)).stdout
    assert out.startswith("True native dataplane"), out


LEAF = 2 << 20
CANARY = b"\xaa"


def _chains(d: FakeDriver, rtype: int, count: int, size: int, first_sector: int = 0, gap: int = 0) -> list[int]:
    """``count`` chains of ``size`` bytes in the data leaf (buffers filled with the canary), made
    available at once with one kick, ``gap`` bytes apart on the disk (0: adjacent, which the
    dataplane merges into one I/O); their buffer addresses."""
    bufs = []
    for i in range(count):
        buf = DATA + i * size
        d.write(buf, CANARY * size)
        chain(d, 3 * i, rtype, first_sector + i * (size + gap) // 512, buf, size, i + 1)
        d.make_available(3 * i, kick=False)
        bufs.append(buf)
    os.eventfd_write(d.kick, 1)
    return bufs


@pytest.mark.parametrize("gap", [1, 0], ids=["apart", "adjacent"])
@pytest.mark.parametrize("change", ["unmap", "retag"])
async def test_a_domain_change_mid_stream_binds_the_very_next_request(tmp_path, change, gap):
    """Twenty reads (cache=none: the disk is slow enough) in flight in C; the data leaf is
    unmapped (or re-tagged) meanwhile. Each read C completed before the change returned read the
    disk; every later one took the Python path (a fault: IOERR, the buffer untouched; a foreign
    KeyID: another key's bytes, the sanitizer saw it). Rounds until one cut a stream in two (reads
    apart on the disk); adjacent ones are merged runs, each one read-lock hold: all before the
    change or all after it, never a run's I/O through the old domain completed after it."""
    async with Rig(tmp_path, direct=True) as rig:
        d, host = rig.driver, rig.memory.host
        image = rig.disk.read_bytes()
        other = host.keys.use(host.keys.add("other", "type=cpu", tenant="vhost"), "test", tenant="vhost")
        cut = 0
        for _ in range(12):
            guest = rig.guest
            guest.iommu.unmap(DATA, LEAF)
            guest.iommu.map(DATA, guest.hpa_of(DATA), LEAF, int(guest.keyid))
            guest.iommu.flush()
            await d.request(T_IN, 0, length=4096)             # the leaf in the mirror again
            base, count, size = d.used_idx(), 20, 64 << 10
            bufs = _chains(d, T_IN, count, size, gap=gap * size)
            await asyncio.sleep(0.001)                        # the thread wakes up, the stream starts
            if change == "unmap":
                guest.iommu.unmap(DATA, LEAF)
                guest.iommu.flush()
            else:
                guest.set_iommu_keyid(other, DATA, LEAF)
            done_in_c = (d.used_idx() - base) & 0xFFFF
            served, seen = rig.served, rig.assigned.sanitizer.count
            del guest
            await d.wait_used((base + count) & 0xFFFF, patience(10))
            assert rig.served == served, "C served a request after the domain changed"
            for i, buf in enumerate(bufs):
                status = d.read(HEADER + 0x1000 + i + 1, 1)[0]
                got = d.read(buf, size)
                if i < done_in_c:
                    assert (status, got) == (0, image[(1 + gap) * i * size:][:size]), i
                elif change == "unmap":
                    assert (status, got) == (1, CANARY * size), i
                else:
                    assert status == 0 and got != image[(1 + gap) * i * size:][:size], i    # another key's bytes
            if change == "retag":
                assert rig.assigned.sanitizer.count - seen >= count - done_in_c
            cut += 0 < done_in_c < count
        assert cut or not gap, "no round changed the domain mid-stream"
        assert gap or rig.device.counters["merged"] > 0, "no adjacent reads were merged"


async def test_a_driver_rewriting_its_chains_under_the_thread_never_leaves_the_domain(tmp_path):
    """A CPU thread of the guest flips descriptor addresses between a mapped and an unmapped
    leaf, lengths, flags, header types and avail entries while the C thread serves: the
    unmapped leaf is never written, never read onto the disk, and the device serves on."""
    hole = 0x400000                                       # a leaf taken out of the domain
    async with Rig(tmp_path) as rig:
        d, guest = rig.driver, rig.guest
        secret = os.urandom(LEAF)
        d.write(hole, secret)
        guest.iommu.unmap(hole, LEAF)
        guest.iommu.flush()
        await d.request(T_IN, 0, length=4096)
        stop = threading.Event()

        def rewrite() -> None:
            import random
            rnd = random.Random(7)
            while not stop.is_set():
                i = rnd.randrange(8)
                addr = rnd.choice([DATA + 0x1000 * i, hole + 0x1000 * i, hole - 0x800, DATA + LEAF - 0x800,
                                   (1 << 64) - 0x800, 0])
                d.desc(3 * i + 1, addr, rnd.choice([512, 4096, 0, 1 << 31, 0x1000]),
                       F_NEXT | rnd.choice([0, F_WRITE, F_INDIRECT]), 3 * i + 2)
                d.write(HEADER + 0x40 * (i + 1), struct.pack("<I", rnd.choice([T_IN, T_OUT, T_FLUSH])))
                if rnd.random() < 0.1:
                    d.write(0x11000 + 4 + 2 * rnd.randrange(d.num), struct.pack("<H", 3 * rnd.randrange(8)))
                time.sleep(0)

        writer = threading.Thread(target=rewrite)
        writer.start()
        try:
            for _ in range(40):
                base = d.used_idx()
                for i in range(8):
                    chain(d, 3 * i, T_IN, 8 * i, DATA + 0x1000 * i, 4096, i + 1)
                    d.make_available(3 * i, kick=False)
                os.eventfd_write(d.kick, 1)
                await d.wait_used((base + 8) & 0xFFFF, patience(5))
        finally:
            stop.set()
            writer.join()
        assert d.read(hole, LEAF) == secret
        disk = rig.disk.read_bytes()
        assert all(disk.find(secret[k:k + 512]) < 0 for k in range(0, LEAF, 64 << 10))
        assert not rig.device.status & 0x40 or rig.device.queues[0].broken   # a bad avail entry: reset
        assert rig.served > 0


def _resources() -> tuple[int, int, int]:
    """Open fds, threads, mappings of the driver's guest RAM in this process."""
    with open("/proc/self/maps") as f:
        maps = sum("fake-guest-ram" in line for line in f)
    return len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task")), maps


@pytest.mark.parametrize("event", ["reset", "memtable", "kill"])
async def test_a_front_end_cutting_a_stream_leaves_nothing_behind(tmp_path, event):
    """Twenty writes in flight in C when the front end resets the device, sends a new memory
    table, or dies: the queue threads, eventfds, fds and guest-RAM mappings all go."""
    before = _resources()
    async with Rig(tmp_path, direct=True) as rig:
        d = rig.driver
        await d.request(T_IN, 0, length=4096)
        base = d.used_idx()
        _chains(d, T_OUT, 20, 64 << 10)
        await asyncio.sleep(0.001)
        if event == "reset":
            await d.send(Req.RESET_DEVICE)
        elif event == "memtable":
            await d.send(Req.SET_MEM_TABLE, struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, d.size, UVA_BASE, 0),
                         fds=(d.memfd,))
            await d.wait_used((base + 20) & 0xFFFF, patience(10))   # served on over the new table
            assert (await d.request(T_IN, 0, length=4096))[0] == 0
            assert len(rig.memory.devices) == 1
        else:
            d.sock.close()
            d.sock = None
        await d.send(Req.GET_FEATURES, reply=True) if d.sock else None
        deadline = time.monotonic() + patience(5)
        while (event != "memtable") and (dp_threads() or rig.device.memory is not None and event == "kill"):
            assert time.monotonic() < deadline, "threads outlived the front end's cut"
            await asyncio.sleep(0.01)
    assert not dp_threads()
    assert _resources() == before


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_the_mirror_of_a_big_guest_costs_what_it_holds():
    """A 512 GiB memory map has a 1 GiB mirror table: a domain change
    empties the entries filled, not the whole table (which would become resident each time)."""
    mirror = native.Mirror(native.library(), 512 << 30)
    try:
        before = _rss_mib()
        ram = np.zeros(8 << 20, np.uint8)
        mirror.window(0, ram)
        for leaf in range(0, 8 << 20, 2 << 20):
            mirror.fill(leaf, 2 << 20, leaf)
            mirror.fill((300 << 30) + leaf, 2 << 20, leaf)   # far apart: still only what was filled
        mirror.clear()
        assert not mirror.table[:4096].any() and not mirror.table[(300 << 18):(300 << 18) + 4096].any()
        assert _rss_mib() - before < 64, "the clear made the whole table resident"
    finally:
        mirror.close()


def test_a_built_library_serves_without_gcc_on_the_path(tmp_path, monkeypatch):
    """Built once; later run where PATH has no gcc (a service's or a libvirt hook's minimal PATH):
    the cached library is used, nothing needs compiling."""
    monkeypatch.setenv("QEMU_MKTME_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(native.ENV_SELECT, raising=False)
    native.build()
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(native, "_state", {})
    assert native.library() is not None, native.status()


def test_concurrent_first_builds_and_a_read_only_cache(tmp_path, monkeypatch):
    """Four processes build into one empty cache at once: each loads a whole library, one stays,
    no temporary file is left. A read-only empty cache: the Python path, said in one line."""
    cache = tmp_path / "cache"
    env = dict(os.environ, QEMU_MKTME_CACHE=str(cache), QEMU_MKTME_VHOST="native")
    probe = "from qemu_mktme.vhost import native; native.library(); print(native.status())"
    procs = [subprocess.Popen([sys.executable, "-c", probe], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    outs = [p.communicate(timeout=patience(60))[0] for p in procs]
    assert all(p.returncode == 0 and o.startswith("native dataplane") for p, o in zip(procs, outs)), outs
    files = [f.name for f in cache.rglob("*") if f.is_file()]
    assert files == [native.LIBRARY_NAME], files
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    env = dict(os.environ, QEMU_MKTME_CACHE=str(ro))
    env.pop(native.ENV_SELECT, None)
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=patience(60))
    if os.geteuid() != 0:                                # root writes anyway
        assert out.stdout.startswith("Python path (cannot write to"), out
        assert out.stderr.count("vhost dataplane unavailable") == 1


@pytest.mark.parametrize("path", ["native", "python"])
def test_a_front_end_making_the_call_fd_blocking_stalls_nothing(path):
    """The front end clears O_NONBLOCK on the call eventfd (the open file description it shares
    with us) and fills its counter: the next interrupt must not block the queue thread or the
    loop (a stop then joined forever: every connection hung). scripts/probe_dataplane.py."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), QEMU_MKTME_VHOST=path)
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "probe_dataplane.py"), "--path", path,
                          "--seconds", str(patience(5))], env=env, capture_output=True, text=True,
                         timeout=patience(30))
    assert out.stdout.strip() == "served-and-stopped", out


def test_a_bad_dataplane_choice_is_one_line_from_the_standalone_backend(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    env = dict(os.environ, PYTHONPATH=str(ROOT), QEMU_MKTME_VHOST="garbage")
    out = subprocess.run([sys.executable, "-m", "qemu_mktme.vhost", "--socket", str(tmp_path / "s.sock"),
                          "--disk", str(disk)], env=env, capture_output=True, text=True, timeout=patience(30))
    errors = [line for line in out.stderr.splitlines() if "QEMU_MKTME_VHOST" in line or "Error" in line]
    assert out.returncode == 1 and errors == ["error: QEMU_MKTME_VHOST=garbage: expected python or native"], out.stderr


async def test_edges_of_segments_take_the_python_path_and_come_out_right(tmp_path):
    """Segments across two leaves, across the end of RAM, at IOVAs near 2^64, of length 0, and
    more of them than one preadv takes (1100 in an indirect table): C hands each such chain to
    Python, which serves it (or faults it) as always; the queue then serves on in C."""
    async with Rig(tmp_path) as rig:
        d = rig.driver
        image = rig.disk.read_bytes()
        await d.request(T_IN, 0, length=4096)
        table = 0x500000                                     # the indirect table, in its own leaf

        async def run(segments: list[tuple[int, int]]) -> tuple[int, int]:
            hdr, status = HEADER + 0x40, HEADER + 0x1001
            d.write(hdr, struct.pack("<IIQ", T_IN, 0, 16))
            d.write(status, b"\xee")
            entries = [(hdr, 16, 0)] + [(a, n, F_WRITE) for a, n in segments] + [(status, 1, F_WRITE)]
            for i, (a, n, f) in enumerate(entries):
                d.desc(i, a, n, f | (F_NEXT if i + 1 < len(entries) else 0), i + 1, table=table)
            d.desc(40, table, 16 * len(entries), F_INDIRECT)
            base = d.used_idx()
            d.make_available(40)
            await d.wait_used((base + 1) & 0xFFFF, patience(10))
            return d.read(status, 1)[0], d.used_elem(base)[1]

        want = image[16 * 512:16 * 512 + 8192]
        assert await run([(0x400000 - 4096, 8192)]) == (0, 8193)              # across two leaves
        assert d.read(0x400000 - 4096, 8192) == want
        assert await run([(DATA, 0), (DATA + 0x1000, 4096), (DATA, 0), (DATA + 0x3000, 4096)]) == (0, 8193)
        assert d.read(DATA + 0x1000, 4096) + d.read(DATA + 0x3000, 4096) == want
        assert (await run([(d.size - 2048, 4096)]))[0] == 1                    # past the end of RAM
        assert (await run([((1 << 64) - 2048, 4096)]))[0] == 1                  # near 2^64
        assert (await run([((1 << 64) - 512, 512), (0, 512)]))[0] == 1          # wrapping to 0
        many = [(DATA + 0x100000 + 512 * i, 512) for i in range(1100)]
        assert await run(many) == (0, 1100 * 512 + 1)
        assert d.read(DATA + 0x100000, 1100 * 512) == image[16 * 512:(16 + 1100) * 512]
        served = rig.served
        assert (await d.request(T_IN, 8, length=4096))[2] == image[4096:8192]
        assert rig.served == served + 1 and not rig.device.status & 0x40


def test_the_stop_wake_up_interrupts_a_blocked_read():
    """What QueueThread.stop sends a queue thread stuck in a read or write the front end made
    blocking: the call returns EINTR (a handler without SA_RESTART), the thread goes on."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    r, w = os.pipe()
    got: list[tuple[int, int]] = []

    def blocked() -> None:
        buf = ctypes.create_string_buffer(8)
        n = libc.read(r, buf, 8)
        got.append((n, ctypes.get_errno()))

    t = threading.Thread(target=blocked)
    t.start()
    try:
        time.sleep(0.1)
        while t.is_alive() and t.native_id is not None:
            assert native.library().dp_wake(t.native_id) == 0
            t.join(patience(1))
        assert got == [(-1, 4)]                                    # EINTR
    finally:
        os.close(w)
        t.join()
        os.close(r)
