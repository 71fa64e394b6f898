"""A standalone vhost-user-blk backend with its own host model: ``python -m qemu_mktme.vhost
--socket PATH --disk FILE [--readonly] [--keyid-bits N]``.

When the front end passes its memory table, each memfd region is bound to this process's
emulated host as one VM's RAM (a fresh CPU-type key), and the device reaches it through that
VM's IOMMU domain, exactly as in the live layer. Used by tests that must kill the backend (a
completed FLUSH survives kill -9) and by anyone driving a QEMU started elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import mmap
import signal
import sys

from ..arch.guestmap import GuestRange
from ..host.dma import AssignedDevice
from ..host.host import Host
from .blk import VhostUserBlk
from .memory import IommuMemory
from .protocol import MemRegion, ProtocolError, Server

log = logging.getLogger("qemu_mktme.vhost")


class StandaloneMemory:
    """Binds the front end's memory regions to a private host model; one VM per memory table."""

    def __init__(self, keyid_bits: int = 6, key_payload: str = "type=cpu") -> None:
        self.host = Host(keyid_bits=keyid_bits)
        self.serial = self.host.keys.add("vhost-standalone", key_payload, tenant="vhost")
        self.devices: list[AssignedDevice] = []
        self._maps: list[mmap.mmap] = []
        self._n = 0

    def __call__(self, regions: list[MemRegion]) -> IommuMemory:
        for name in list(self.host.guests):
            self.host.remove_guest(name)
        if len(regions) != 1:
            raise ProtocolError(f"the standalone backend takes one memory region, got {len(regions)}")
        r = regions[0]
        try:
            m = mmap.mmap(r.fd, r.memory_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                          offset=r.mmap_offset)
        except (OSError, ValueError) as err:
            raise ProtocolError(f"cannot map the memory region: {err}") from None
        self._maps.append(m)
        self._n += 1
        guest = self.host.add_guest(f"vm{self._n}", m, [GuestRange(r.guest_phys_addr, r.memory_size, 0)],
                                    key_serial=self.serial, tenant="vhost")
        self.devices.append(AssignedDevice(guest, "vhost-blk"))
        return IommuMemory(self.devices[-1])


async def serve(args: argparse.Namespace) -> None:
    device = VhostUserBlk(args.disk, StandaloneMemory(args.keyid_bits), readonly=args.readonly)
    server = Server(args.socket, device, name="vhost-blk")
    await server.start()
    print(f"listening on {args.socket}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close()
    device.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qemu_mktme.vhost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--socket", required=True)
    ap.add_argument("--disk", required=True)
    ap.add_argument("--readonly", action="store_true")
    ap.add_argument("--keyid-bits", type=int, default=6)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        asyncio.run(serve(args))
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
