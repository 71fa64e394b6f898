"""A completed FLUSH is durable: kill -9 of the backend process right after it loses no
acknowledged write (the standalone backend, ``python -m qemu_mktme.vhost``, as its own process)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from fake_driver import FakeDriver
from helpers import patience

T_OUT, T_FLUSH = 1, 4


async def test_kill_9_after_a_completed_flush_loses_no_acknowledged_write(tmp_path):
    disk, sock = tmp_path / "disk.img", tmp_path / "blk.sock"
    with open(disk, "wb") as f:
        f.truncate(4 << 20)
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "qemu_mktme.vhost", "--socket", str(sock),
                                                "--disk", str(disk), stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    d = FakeDriver(str(sock))
    try:
        while b"listening" not in await asyncio.wait_for(proc.stdout.readline(), patience(10)):
            assert proc.returncode is None
        await d.setup()
        written = {}
        for sector in (0, 8, 2048, 8000):
            data = os.urandom(4096)
            assert (await d.request(T_OUT, sector, data, seconds=patience(5)))[0] == 0
            written[sector] = data
        assert (await d.request(T_FLUSH, 0, seconds=patience(5)))[0] == 0
        proc.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(proc.wait(), patience(5)) == -signal.SIGKILL
    finally:
        d.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    with open(disk, "rb") as f:
        for sector, data in written.items():
            f.seek(sector * 512)
            assert f.read(4096) == data
