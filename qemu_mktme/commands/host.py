"""``qemu-mktme host start|migrate|query|dump``: the verbs of a running emulated host.

``start`` is here; ``migrate``, ``query`` and ``dump`` live in their own modules and register under
this noun (and, unlisted, under their old top-level names: ``cli.ALIASES``)."""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
from pathlib import Path
from typing import Any

from ..live.session import HostSession
from . import dump, migrate, query
from .options import PROG, UsageError, keyid_bits, packages, vm_name


async def host_start(args: argparse.Namespace) -> int:
    """A host with no VM yet, named, taking incoming migrations with keys from the tenant's broker."""
    from ..attest.launch import TenantLaunch
    from ..attest.migrate import broker_key_source
    from ..tenant.store import TenantDir
    ca = Path(args.tenant_ca) if args.tenant_ca else TenantDir().pki.ca
    if not ca.is_file():
        raise UsageError(f"tenant CA certificate {ca} does not exist (give --tenant-ca)")
    async with HostSession([], keyid_bits=getattr(args, "keyid_bits", 6), packages=args.packages, name=args.name) as session:
        broker_key_source(session, TenantLaunch(args.tenant_server, ca, key=args.tenant_key, host=args.name))
        print(f"{PROG}: host {args.name} ready (pid {os.getpid()}); migrate VMs here with "
              f"'{PROG} host migrate VM --to {args.name}'; Ctrl-C stops it and its VMs", file=sys.stderr, flush=True)
        await asyncio.Event().wait()
    return 0


def register(sub: Any) -> None:
    h = sub.add_parser("host", help="a running emulated host: start one, migrate its VMs, query it, dump its DRAM",
                       description="The verbs of a running emulated host ('run' starts one with VMs, 'host start' "
                                   "one that waits for migrations). Old spellings that still work: 'migrate', "
                                   "'query', 'dump'.")
    h_sub = h.add_subparsers(dest="action", metavar="ACTION")
    from .libvirt import add_host_options, host_libvirt
    add_host_options(h)
    h.add_argument("--keyid-bits", type=keyid_bits, default=argparse.SUPPRESS, metavar="N", help=argparse.SUPPRESS)

    def follow(args: argparse.Namespace) -> Any:
        if not args.libvirt:
            raise UsageError("give an ACTION (start, migrate, query, dump) or --libvirt URI")
        return host_libvirt(args)
    h.set_defaults(func=follow)
    st = h_sub.add_parser("start", help="run host NAME in the foreground (no VM yet) until Ctrl-C",
                          description="Start an emulated MKTME host that VMs migrate to: each incoming VM's key is "
                                      "released by the tenant's broker after this host attests.")
    st.add_argument("name", type=vm_name, help="the host's name (its TPM state and the 'host migrate --to' address)")
    st.add_argument("--tenant-server", required=True, metavar="URL", help="the tenant's key broker")
    st.add_argument("--tenant-ca", metavar="PATH", default=argparse.SUPPRESS,
                    help="the tenant's CA certificate (default: the tenant directory's)")
    st.add_argument("--tenant-key", default="vm", metavar="NAME", help="the memory key's name (default: vm)")
    st.add_argument("--keyid-bits", type=keyid_bits, default=argparse.SUPPRESS, metavar="N", help="(default: 6)")
    st.add_argument("--packages", type=packages, default=1, metavar="N", help=argparse.SUPPRESS)
    st.set_defaults(func=host_start)
    for verb in (migrate, query, dump):
        verb.register(h_sub)
    for name, parser in h_sub.choices.items():      # host options before the verb: kept (the verb's are SUPPRESS)
        parser.set_defaults(func=_checked(name, parser.get_default("func")))


FOLLOWING = {"libvirt": ("query", "dump"), "socket": ("query", "dump"), "host_name": (), "host_dir": (),
             "tenant_ca": ("start",), "keyid_bits": ("start",)}
"""``host`` options and the verbs they go with besides ``host --libvirt URI`` alone."""


def _checked(verb: str, func: Any) -> Any:
    """``func`` of ``host VERB``, refusing a ``host`` option that VERB would otherwise ignore."""
    @functools.wraps(func)
    def checked(args: argparse.Namespace) -> Any:
        for dest, verbs in FOLLOWING.items():
            if getattr(args, dest, None) and verb not in verbs:
                option = "--" + dest.replace("_", "-")
                places = "".join(f"'host {v}', " for v in verbs)
                raise UsageError(f"{option} does not go with 'host {verb}' (it goes with {places}"
                                 "'host --libvirt URI' alone)")
        return func(args)
    return checked
