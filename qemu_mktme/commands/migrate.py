"""``qemu-mktme host migrate VM --to NAME``: live-migrate a VM between two running hosts (old name: ``migrate``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..attend import ProgressBar
from ..live.p2p import migrate_between
from .options import pid


async def migrate_vm(args: argparse.Namespace) -> int:
    """Ask the source host to move the VM: it drives the destination itself (live/p2p.py), so this
    process may be interrupted or killed at any point and the VM still ends up on one host."""
    from ..tenant.store import TenantDir
    tls = Path(args.tls).absolute() if args.tls else None if args.insecure else TenantDir().pki.directory
    bar = ProgressBar(f"migrating {args.vm_name} to {args.to}")
    try:
        r = await migrate_between(args.vm_name, source=args.source, pid=args.pid, to=args.to, tls=tls,
                                  insecure=args.insecure, progress=bar)
    finally:
        bar.close()
    print(f"{args.vm_name}: on {args.to} with KeyID {r.dest_keyid} (was KeyID {r.source_keyid}, now free); "
          f"{r.transferred >> 20} MiB {'over TLS' if r.tls else 'IN THE CLEAR (--insecure)'} in "
          f"{r.total_ms / 1000:.2f} s, downtime {r.downtime_ms} ms, {r.mbps:.0f} Mb/s")
    return 0


def register(sub: Any) -> None:
    m = sub.add_parser("migrate", help="live-migrate a VM to another running host over TLS",
                       description="Move a running VM to host NAME: the destination attests to the tenant's broker "
                                   "and gets the key, picks its own KeyID, and QEMU's migration stream goes over TLS "
                                   "(tls-creds-x509, both ends verified). On any failure the VM runs on here. The "
                                   "source host does the work: interrupting or killing this command neither stops "
                                   "nor undoes it (the VM ends up on exactly one host).")
    m.add_argument("vm_name", metavar="VM")
    m.add_argument("--to", required=True, metavar="NAME", help="the destination host ('host start NAME')")
    m.add_argument("--from", dest="source", metavar="NAME", help="the source host's name (default: the only one / --pid)")
    m.add_argument("--pid", type=pid, help="the source host's process")
    m.add_argument("--tls", metavar="DIR", help="QEMU TLS credentials directory (default: the tenant's PKI)")
    m.add_argument("--insecure", action="store_true", help="migrate without TLS: guest RAM crosses in the clear")
    m.set_defaults(func=migrate_vm)
