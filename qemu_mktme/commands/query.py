"""``qemu-mktme host query``: ask a running host for its encryption state (old name: ``query``)."""

from __future__ import annotations

import argparse
from typing import Any

from ..live import control
from .libvirt import add_socket_option, without_libvirt
from .options import UsageError, pid, print_json


async def query(args: argparse.Namespace) -> int:
    without_libvirt(args)
    if getattr(args, "libvirt", None):
        from .libvirt import query_libvirt
        if args.pid is not None:
            raise UsageError("--pid names a 'qemu-mktme run' host; with --libvirt the host model is this machine's")
        return query_libvirt(args.libvirt, getattr(args, "socket", None))
    result = await control.request("query", pid=args.pid, **({"name": args.vm_name} if args.vm_name else {}))
    print_json(result)
    return 0


def register(sub: Any) -> None:
    q = sub.add_parser("query", help="the encryption state of a running host and its VMs (JSON)",
                       description="Ask a running 'qemu-mktme run' for its host's KeyID table and every "
                                   "VM's encryption state (like QEMU's query-sev).")
    q.add_argument("vm_name", nargs="?", metavar="VM", help="only this VM")
    q.add_argument("--pid", type=pid, help="the 'qemu-mktme run' process, when several run")
    q.add_argument("--libvirt", metavar="URI", default=argparse.SUPPRESS,
                   help="libvirt's domains at URI with their KeyID, key handle and tagging state from this "
                        "machine's host model ('host --libvirt')")
    add_socket_option(q)
    q.set_defaults(func=query)
