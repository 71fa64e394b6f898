"""``qemu-mktme host query``: ask a running host for its encryption state (old name: ``query``)."""

from __future__ import annotations

import argparse
from typing import Any

from ..live import control
from .options import pid, print_json


async def query(args: argparse.Namespace) -> int:
    if args.libvirt:
        from .libvirt import query_libvirt
        return query_libvirt(args.libvirt)
    result = await control.request("query", pid=args.pid, **({"name": args.vm_name} if args.vm_name else {}))
    print_json(result)
    return 0


def register(sub: Any) -> None:
    q = sub.add_parser("query", help="the encryption state of a running host and its VMs (JSON)",
                       description="Ask a running 'qemu-mktme run' for its host's KeyID table and every "
                                   "VM's encryption state (like QEMU's query-sev).")
    q.add_argument("vm_name", nargs="?", metavar="VM", help="only this VM")
    q.add_argument("--pid", type=pid, help="the 'qemu-mktme run' process, when several run")
    q.add_argument("--libvirt", metavar="URI", help="libvirt's domains at URI with their KeyID, key handle and "
                                                    "tagging state from this machine's host model "
                                                    "('host --libvirt')")
    q.set_defaults(func=query)
