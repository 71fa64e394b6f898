"""A standalone vhost-user-blk backend with its own host model: ``python -m qemu_mktme.vhost
--socket PATH --disk FILE [--readonly] [--keyid-bits N]``; give QEMU's ``vhost-user-blk-pci``
``queue-size=256`` (the device offers queue size - 2 segments per request, as QEMU's virtio-blk).

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
from ..errors import MktmeError
from ..host.dma import AssignedDevice
from ..host.host import Host
from .blk import POLL_MAX_NS, VhostUserBlk
from .memory import IommuMemory, map_region, unmap
from .protocol import IDLE_DEADLINE, MAX_CONNECTIONS, MESSAGE_DEADLINE, MemRegion, ProtocolError, Server

log = logging.getLogger("qemu_mktme.vhost")


class StandaloneMemory:
    """Binds the front end's memory region to a private host model; one VM per memory table.

    A new table replaces the old: the old VM is unbound and its mapping unmapped when the device
    lets go of it (``IommuMemory.close``), so address space stays flat over any number of tables.
    Regions must be memfds sealed against shrinking (:func:`.memory.check_region`)."""

    def __init__(self, keyid_bits: int = 6, key_payload: str = "type=cpu") -> None:
        self.host = Host(keyid_bits=keyid_bits)
        self.serial = self.host.keys.add("vhost-standalone", key_payload, tenant="vhost")
        self.devices: list[AssignedDevice] = []
        self._n = 0

    def __call__(self, regions: list[MemRegion]) -> IommuMemory:
        if len(regions) != 1:
            raise ProtocolError(f"the standalone backend takes one memory region, got {len(regions)}")
        r = regions[0]
        m = map_region(r)
        self._n += 1
        name = f"vm{self._n}"
        try:
            guest = self.host.add_guest(name, m, [GuestRange(r.guest_phys_addr, r.memory_size, 0)],
                                        key_serial=self.serial, tenant="vhost")
        except BaseException:
            unmap(m, name)
            raise
        device = AssignedDevice(guest, "vhost-blk")
        self.devices.append(device)
        memory = IommuMemory(device, on_close=lambda: self._release(name, m))
        del guest, device                           # the views of m live only in the host model now
        return memory

    def _release(self, name: str, m: mmap.mmap) -> None:
        self.devices = [d for d in self.devices if d.guest.name != name]
        self.host.remove_guest(name)
        unmap(m, f"memory table of {name}")


async def serve(args: argparse.Namespace) -> None:
    device = VhostUserBlk(args.disk, StandaloneMemory(args.keyid_bits), readonly=args.readonly,
                          poll_max_ns=args.poll_max_ns)
    server = Server(args.socket, device, name="vhost-blk", max_connections=args.max_connections,
                    message_deadline=args.message_deadline, idle_deadline=args.idle_deadline)
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
    ap.add_argument("--poll-max-ns", type=int, default=POLL_MAX_NS, metavar="NS",
                    help="how long a queue thread may watch a ring that ran empty for the next request "
                         "(QEMU's iothread option; adaptive below it; 0: never; default %(default)s)")
    ap.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS,
                    help="connections served at once (default %(default)s)")
    ap.add_argument("--message-deadline", type=float, default=MESSAGE_DEADLINE, metavar="SECONDS",
                    help="time a peer has to finish a message or take a reply (default %(default)s)")
    ap.add_argument("--idle-deadline", type=float, default=IDLE_DEADLINE, metavar="SECONDS",
                    help="silence allowed to a connection that does not own the device (default %(default)s)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        asyncio.run(serve(args))
    except (OSError, ValueError, MktmeError) as err:       # MktmeError: QEMU_MKTME_VHOST=garbage
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
