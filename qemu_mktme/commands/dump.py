"""``qemu-mktme host dump``: capture a running host's DRAM image (old name: ``dump``)."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path
from typing import Any

from ..attend import ProgressBar
from ..live import control
from .libvirt import add_socket_option, without_libvirt
from .options import UsageError, pid

DUMP_TIMEOUT = 600.0


async def dump(args: argparse.Namespace) -> int:
    twice = sorted({n for n in args.vm_names if args.vm_names.count(n) > 1})
    if twice:
        raise UsageError(f"--vm {twice[0]} given twice")
    without_libvirt(args)
    if getattr(args, "libvirt", None):                 # this machine's host model, following libvirtd
        from ..virt.fleet import host_request
        from .libvirt import HOOK_SOCKET
        if args.pid is not None:
            raise UsageError("--pid names a 'qemu-mktme run' host; with --libvirt the host model is this machine's")
        result = await asyncio.to_thread(host_request, "dump", socket=Path(getattr(args, "socket", HOOK_SOCKET)),
                                         timeout=DUMP_TIMEOUT, path=os.path.abspath(args.path), vms=args.vm_names)
    else:
        bar = ProgressBar("dumping DRAM")
        try:
            result = await control.request("dump", pid=args.pid, progress=bar, path=os.path.abspath(args.path),
                                           vms=args.vm_names)
        finally:
            bar.close()
    for r in result["regions"]:
        print(f"{r['vm']}: KeyID {r['keyid']} ({r['key_type']}), HPA {r['hpa']}+{r['nbytes'] >> 20} MiB")
    print(f"dump written to {result['path']}")
    return 0


def register(sub: Any) -> None:
    d = sub.add_parser("dump", help="write the DRAM image of a running host's VMs (what a bus probe reads)",
                       description="Capture the host-physical DRAM image (ciphertext per KeyID) of the VMs "
                                   "of a running 'qemu-mktme run', with a manifest. The VMs are paused for "
                                   "the capture and resumed. Never writes key material.")
    d.add_argument("path", help="dump directory to create")
    d.add_argument("--vm", dest="vm_names", action="append", default=[], metavar="NAME",
                   help="only this VM (repeatable; default: all)")
    d.add_argument("--pid", type=pid, help="the 'qemu-mktme run' process, when several run")
    d.add_argument("--libvirt", metavar="URI", default=argparse.SUPPRESS,
                   help="dump through this machine's host model following libvirt at URI ('host --libvirt')")
    add_socket_option(d)
    d.set_defaults(func=dump)
