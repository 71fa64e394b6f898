"""Probe: a hostile vhost-user front end clears O_NONBLOCK on the call eventfd it shares with the
backend (a file status flag of the one open file description) and fills its counter to the
maximum; the next interrupt the backend sends would block. Prints what the backend did within
``--seconds``: ``served-and-stopped`` (good) or ``hung`` (its loop stalled: every connection).

    PYTHONPATH=. python scripts/probe_dataplane.py [--seconds 10] [--path native|python]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import os
import struct
import sys
import tempfile
import threading
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / "tests" / "vhost"),
                str(Path(__file__).resolve().parent.parent / "tests")]

from fake_driver import FakeDriver  # noqa: E402
from qemu_mktme.vhost.__main__ import StandaloneMemory  # noqa: E402
from qemu_mktme.vhost.blk import VhostUserBlk  # noqa: E402
from qemu_mktme.vhost.protocol import Req, Server  # noqa: E402

T_IN = 0
MAX = 0xFFFFFFFFFFFFFFFE


async def probe(tmp: Path, kind: str) -> str:
    disk = tmp / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    device = VhostUserBlk(disk, StandaloneMemory())
    server = Server(tmp / "s.sock", device)
    await server.start()
    d = FakeDriver(str(tmp / "s.sock"))
    try:
        await d.setup()
        await d.request(T_IN, 0, length=4096)
        await d.request(T_IN, 0, length=4096)
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(d.call)
        os.eventfd_write(d.call, MAX)                  # the counter is full: a write of 1 blocks
        fcntl.fcntl(d.call, fcntl.F_SETFL, fcntl.fcntl(d.call, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        d.write(0x11000 + 4 + 2 * d.num, struct.pack("<H", d.used_idx()))   # used_event: interrupt me
        if kind == "python":
            d.write(0x20000, struct.pack("<IIQ", 8, 0, 0))                 # GET_ID: the Python path
        await d.request(T_IN, 0, length=4096)
        reply = await d.send(Req.GET_VRING_BASE, struct.pack("<II", 0, 0), reply=True)
        return "served-and-stopped" if reply else "no reply"
    finally:
        os.set_blocking(d.call, False)
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(d.call)                    # let a blocked writer go, so we can exit
        d.close()
        await server.close()
        device.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--path", choices=["native", "python"], default="native")
    args = ap.parse_args()
    result: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        t = threading.Thread(target=lambda: result.append(asyncio.run(probe(Path(tmp), args.path))), daemon=True)
        t.start()
        t.join(args.seconds)
        print(result[0] if result else "hung")
        sys.stdout.flush()
        os._exit(0 if result == ["served-and-stopped"] else 1)


if __name__ == "__main__":
    main()
