"""Random ring contents (hypothesis) in front of the backend: it never crashes, never reaches
memory except through the IOMMU domain, and serves the next front end."""

from __future__ import annotations

import asyncio
import os
import struct

import pytest
from hypothesis import given, settings, strategies as st

from fake_driver import AVAIL, FakeDriver
from helpers import patience
from qemu_mktme.vhost.__main__ import StandaloneMemory
from qemu_mktme.vhost.blk import STATUS_NEEDS_RESET, VhostUserBlk
from qemu_mktme.vhost.protocol import Server

NUM = 64
RAM = 8 << 20
descriptor = st.tuples(st.one_of(st.integers(0, RAM + 4096), st.integers(0, (1 << 64) - 1)),
                       st.one_of(st.integers(0, 8192), st.integers(0, (1 << 32) - 1)),
                       st.integers(0, 7), st.integers(0, NUM + 4))


RINGS = given(descs=st.lists(descriptor, min_size=1, max_size=NUM),
              heads=st.lists(st.integers(0, NUM + 2), min_size=1, max_size=8),
              headers=st.lists(st.binary(min_size=16, max_size=16), min_size=1, max_size=4),
              jump=st.sampled_from([0, 0, 0, 70, 0xFFFF]))
SUITE, LONG = 10, 200
"""Examples per run: ``make test`` (bounded), ``make verify`` (the long trial)."""


@settings(max_examples=SUITE)
@RINGS
def test_random_rings_never_crash_or_escape(tmp_path_factory, descs, heads, headers, jump):
    asyncio.run(_random_ring(tmp_path_factory.mktemp("ring"), descs, heads, headers, jump))


@settings(max_examples=SUITE)
@RINGS
def test_random_rings_in_front_of_the_compiled_dataplane(tmp_path_factory, descs, heads, headers, jump):
    """No observer (it would send every request to Python) and the whole of RAM in the
    dataplane's translation mirror: the C side judges the chains first."""
    asyncio.run(_random_ring(tmp_path_factory.mktemp("ring"), descs, heads, headers, jump, observe=False))


@pytest.mark.verify
@settings(max_examples=LONG)
@RINGS
def test_many_random_rings_on_both_paths(tmp_path_factory, descs, heads, headers, jump):
    for observe in (True, False):
        asyncio.run(_random_ring(tmp_path_factory.mktemp("ring"), descs, heads, headers, jump, observe=observe))


async def _random_ring(tmp, descs, heads, headers, jump, *, observe: bool = True):
    disk = tmp / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    memory = StandaloneMemory()
    device = VhostUserBlk(disk, memory)
    server = Server(tmp / "s.sock", device)
    await server.start()
    d = FakeDriver(str(tmp / "s.sock"), RAM, NUM)
    touched = []
    try:
        await d.setup()
        if observe:
            memory.devices[-1].observers.append(touched.append)
        else:
            for leaf in range(0, RAM, 2 << 20):           # every leaf in the IOTLB, so in the mirror
                memory.devices[-1].translate(leaf)
        for i, (addr, length, flags, nxt) in enumerate(descs):
            d.desc(i, addr % (1 << 64), length, flags, nxt)
        for i, h in enumerate(headers):                   # some plausible headers at low addresses
            d.write(0x200000 + 64 * i, h)
        for h in heads:
            d.make_available(h, kick=False)
        if jump:
            d.avail_idx = (d.avail_idx + jump) & 0xFFFF
            d.write(AVAIL + 2, struct.pack("<H", d.avail_idx))
        os.eventfd_write(d.kick, 1)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience(5)
        # wait until the device has consumed everything or given up on the ring
        while not device.status & STATUS_NEEDS_RESET and d.used_idx() != d.avail_idx:
            assert loop.time() < deadline, "the device neither served the buffers nor asked for a reset"
            await asyncio.sleep(0.002)
        for t in touched:                                  # every access inside the VM's RAM
            assert t.iova >= 0 and t.iova + t.nbytes <= RAM
        assert server._task is not None and not server._task.done()
    finally:
        d.close()
    d2 = FakeDriver(str(tmp / "s.sock"), RAM, NUM)          # the backend serves the next front end
    try:
        await d2.setup()
        assert (await d2.request(4, 0, seconds=patience(5)))[0] == 0
    finally:
        d2.close()
        await server.close()
        device.close()
