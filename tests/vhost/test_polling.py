"""Polling of the compiled dataplane (``poll-max-ns``, native/vhost_dp.c): after the ring runs
empty a queue thread watches it for the driver's next request, which then needs no kick; the
window adapts (it grows while requests come within ``poll-max-ns``, drops to nothing when they
come later), an idle queue costs no CPU, a stop ends a window at once, and bad values are refused
with one line."""

from __future__ import annotations

import asyncio
import os
import struct
import time

import pytest

from fake_driver import DATA
from helpers import patience
from qemu_mktme.qemu.devices import POLL_MAX_NS_LIMIT, DiskSpec
from qemu_mktme.vhost import native
from qemu_mktme.vhost.blk import VhostUserBlk
from qemu_mktme.vhost.protocol import Req
from test_dataplane import Rig, chain

T_IN = 0

pytestmark = pytest.mark.skipif(native.library() is None, reason=f"no compiled dataplane: {native.status()}")


def _thread_cpu(rig: Rig) -> float:
    """CPU seconds of queue 0's dataplane thread."""
    dp = rig.device.queues[0].dp
    assert dp is not None and dp.thread.ident is not None
    return time.clock_gettime(time.pthread_getcpuclockid(dp.thread.ident))


async def _unkicked(rig: Rig, head: int, slot: int, seconds: float) -> bool:
    """Make a read available without a kick: whether the device completes it within ``seconds``
    (if not, it is kicked and completed, so the ring stays in step)."""
    d = rig.driver
    before = d.used_idx()
    chain(d, head, T_IN, 8, DATA + 0x2000, 4096, slot)
    d.make_available(head, kick=False)
    try:
        await d.wait_used((before + 1) & 0xFFFF, seconds)
        return True
    except AssertionError:
        os.eventfd_write(d.kick, 1)
        await d.wait_used((before + 1) & 0xFFFF, patience(5))
        return False


async def _grow(rig: Rig, n: int = 16) -> None:
    """Requests in quick succession: each comes within poll-max-ns, so the window grows."""
    for i in range(n):
        await rig.driver.request(T_IN, 8 * i, length=4096)


async def test_a_request_made_available_without_a_kick_is_found_by_the_watching_thread(tmp_path):
    async with Rig(tmp_path, poll_max_ns=POLL_MAX_NS_LIMIT) as rig:
        await _grow(rig)
        found = 0
        for attempt in range(20):                 # the window is 10 ms: a slow test process may miss one,
            head = 30 + 3 * (attempt % 10)        # and a long yield (this process on the thread's CPU)
            found += await _unkicked(rig, head, attempt % 60 + 1, patience(0.5))   # shuts it for 50 ms
            if found >= 2:
                break
            await asyncio.sleep(0.06)
            await _grow(rig)
        assert found >= 2, "no request without a kick was found by polling"
        c = rig.device.counters
        assert c["poll_hits"] >= found and c["polls"] >= c["poll_hits"] and c["poll_us"] > 0


async def test_without_polling_a_request_waits_for_its_kick(tmp_path):
    async with Rig(tmp_path, poll_max_ns=0) as rig:
        await _grow(rig)
        assert not await _unkicked(rig, 30, 1, 0.2)
        assert rig.device.counters["polls"] == 0


async def test_requests_further_apart_than_the_bound_are_never_watched(tmp_path):
    async with Rig(tmp_path, poll_max_ns=1_000_000) as rig:
        await _grow(rig, 4)                        # may grow a window
        await asyncio.sleep(0.05)                  # 50 ms > 1 ms: whatever window there was drops to nothing
        await rig.driver.request(T_IN, 0, length=4096)
        polls = rig.device.counters["polls"]
        for i in range(5):
            await asyncio.sleep(0.02)               # 20 ms > 1 ms: the window stays at nothing
            await rig.driver.request(T_IN, 8 * i, length=4096)
        assert rig.device.counters["polls"] == polls


async def test_an_idle_queue_costs_no_cpu(tmp_path):
    async with Rig(tmp_path, poll_max_ns=POLL_MAX_NS_LIMIT) as rig:
        await _grow(rig)                           # the window at its largest: 10 ms
        await asyncio.sleep(0.1)                   # the last window ends, the thread sleeps on its kick fd
        cpu = _thread_cpu(rig)
        await asyncio.sleep(0.5)
        assert _thread_cpu(rig) - cpu < 0.005
        assert (await rig.driver.request(T_IN, 0, length=4096))[0] == 0     # and wakes for a kick


async def test_a_stop_ends_a_window_at_once(tmp_path):
    async with Rig(tmp_path, poll_max_ns=POLL_MAX_NS_LIMIT) as rig:
        await _grow(rig)
        await rig.driver.request(T_IN, 0, length=4096)     # the thread watches the ring now
        start = time.monotonic()
        await rig.driver.send(Req.GET_VRING_BASE, struct.pack("<II", 0, 0), reply=True)
        assert time.monotonic() - start < patience(0.5)
        assert rig.device.queues[0].dp is None


def test_bad_bounds_are_refused_with_one_line(tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    for bad in (-1, POLL_MAX_NS_LIMIT + 1):
        with pytest.raises(ValueError, match="poll-max-ns must be in"):
            VhostUserBlk(disk, object, poll_max_ns=bad)
    for text, message in ((f"{disk},poll-max-ns=ten", "a number of nanoseconds"),
                          (f"{disk},poll-max-ns=-5", "a number of nanoseconds"),
                          (f"{disk},poll-max-ns={10**12}", "must be in"),
                          (f"{disk},dma=qemu,poll-max-ns=1000", "our backend's")):
        with pytest.raises(ValueError, match=message):
            DiskSpec.parse(text)
    assert DiskSpec.parse(f"{disk},dma=vhost,poll-max-ns=0").poll_max_ns == 0
    assert DiskSpec.parse(f"{disk}").poll_max_ns is None


async def test_a_busy_thread_on_the_cpu_shuts_the_window(tmp_path):
    """A yield that lasts (a CPU-bound process got the CPU) means polling would take CPU from
    someone: the window shuts (``poll_backoffs``), and the requests are still served."""
    import subprocess
    import sys
    async with Rig(tmp_path, poll_max_ns=POLL_MAX_NS_LIMIT) as rig:
        dp = rig.device.queues[0].dp
        assert dp is not None and dp.thread.native_id is not None
        os.sched_setaffinity(dp.thread.native_id, {0})
        hog = subprocess.Popen([sys.executable, "-c", "import os; os.sched_setaffinity(0, {0})\nwhile True: pass"])
        try:
            await asyncio.sleep(0.2)
            for _ in range(6):
                await _grow(rig, 12)
                if rig.device.counters["poll_backoffs"]:
                    break
            assert rig.device.counters["poll_backoffs"] >= 1
        finally:
            hog.kill()
            hog.wait()
