"""``qemu-mktme migrate VM --to NAME``: live-migrate a VM between two running hosts."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..attend import ProgressBar
from ..errors import logged
from ..live import control


async def migrate_vm(args: argparse.Namespace) -> int:
    """Drive two running hosts: the destination attests and listens, the source streams over TLS."""
    from ..tenant.store import TenantDir
    tls = Path(args.tls).absolute() if args.tls else None if args.insecure else TenantDir().pki.directory
    src: dict[str, Any] = {"pid": args.pid, "host": args.source}
    common = {"vm": args.vm_name, "tls": str(tls) if tls else None, "insecure": args.insecure}
    d = await control.request("migrate-describe", **src, **common)
    inc = await control.request("migrate-incoming", host=args.to, config=d["config"], tenant=d["tenant"],
                                tls=common["tls"])
    bar = ProgressBar(f"migrating {args.vm_name} to {args.to}")
    try:
        r = await control.request("migrate-send", progress=bar, port=inc["port"], dest_keyid=inc["keyid"],
                                  **src, **common)
        bar.close()
        q = await control.request("migrate-finish", host=args.to, vm=args.vm_name, resume=d["running"])
    except BaseException:
        bar.close()
        with logged(__name__, f"aborting on {args.to}"):
            await control.request("migrate-abort", host=args.to, vm=args.vm_name)
        with logged(__name__, "resuming the source"):
            await control.request("migrate-release", **src, vm=args.vm_name, done=False, resume=d["running"])
        raise
    await control.request("migrate-release", **src, vm=args.vm_name, done=True)
    print(f"{args.vm_name}: on {args.to} with KeyID {q['keyid']} (was KeyID {d['keyid']}, now free); "
          f"{r['transferred'] >> 20} MiB {'over TLS' if r['tls'] else 'IN THE CLEAR (--insecure)'} in "
          f"{r['total_ms'] / 1000:.2f} s, downtime {r['downtime_ms']} ms, {r['mbps']:.0f} Mb/s")
    return 0


def register(sub: Any) -> None:
    m = sub.add_parser("migrate", help="live-migrate a VM to another running host over TLS",
                       description="Move a running VM to host NAME: the destination attests to the tenant's broker "
                                   "and gets the key, picks its own KeyID, and QEMU's migration stream goes over TLS "
                                   "(tls-creds-x509, both ends verified). On any failure the VM runs on here.")
    m.add_argument("vm_name", metavar="VM")
    m.add_argument("--to", required=True, metavar="NAME", help="the destination host ('host start NAME')")
    m.add_argument("--from", dest="source", metavar="NAME", help="the source host's name (default: the only one / --pid)")
    m.add_argument("--pid", type=int, help="the source host's process")
    m.add_argument("--tls", metavar="DIR", help="QEMU TLS credentials directory (default: the tenant's PKI)")
    m.add_argument("--insecure", action="store_true", help="migrate without TLS: guest RAM crosses in the clear")
    m.set_defaults(func=migrate_vm)
