"""``qemu-mktme host dump``: capture a running host's DRAM image (old name: ``dump``)."""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..attend import ProgressBar
from ..live import control
from .options import UsageError, pid


async def dump(args: argparse.Namespace) -> int:
    twice = sorted({n for n in args.vm_names if args.vm_names.count(n) > 1})
    if twice:
        raise UsageError(f"--vm {twice[0]} given twice")
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
    d.set_defaults(func=dump)
