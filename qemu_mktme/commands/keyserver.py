"""``qemu-mktme keyserver start|stop|status``: the tenant's key server (PyKMIP) and key broker."""

from __future__ import annotations

import argparse
from typing import Any

from ..tenant import keyserver
from .options import print_json
from .tenant import add_tenant_dir_option, tenant_dir


def keyserver_cmd(args: argparse.Namespace) -> int:
    tenant = tenant_dir(args)
    if args.action == "start":
        started = keyserver.start(tenant, args.listen, kmip_port=args.kmip_port)
        print(f"key server running (pid {started.pid}): KMIP on {started.address}:{started.kmip_port}, broker on "
              f"{started.address}:{started.broker_port}")
        names = tenant.pki.server_names()
        if started.address not in ("0.0.0.0", *names):
            print(f"  note: its certificate names {', '.join(names)}, not {started.address}: hosts dialling "
                  f"{started.address} will refuse it (tenant init --server-name)")
        print(f"  run a VM with:  qemu-mktme run --tenant-server {started.url} --tenant-ca {tenant.pki.ca} ...")
        return 0
    if args.action == "stop":
        print("key server stopped" if keyserver.stop(tenant) else "no key server was running")
        return 0
    info = keyserver.status(tenant)
    if args.json:
        print_json(info.to_json() if info else {"running": False})
    elif info is None:
        print(f"no key server runs for the tenant in {tenant.path}")
    else:
        print(f"running (pid {info.pid}): KMIP on {info.address}:{info.kmip_port}, broker {info.url}")
    return 0 if info else 3


def register(sub: Any) -> None:
    ks = sub.add_parser("keyserver", help="the tenant's key server (PyKMIP) and key broker",
                        description="Start, stop or show the tenant's PyKMIP server (mutual TLS 1.2) and the key "
                                    "broker that releases keys only to attested hosts, as one background process.")
    ks.add_argument("action", choices=("start", "stop", "status"))
    ks.add_argument("--json", action="store_true", help="status as JSON")
    ks.add_argument("--listen", default="127.0.0.1", metavar="ADDR[:PORT]",
                    help="address for KMIP and the broker, PORT the broker's (default: 127.0.0.1, any free port)")
    ks.add_argument("--kmip-port", type=int, default=0, metavar="N", help="KMIP's port (default: any free port)")
    add_tenant_dir_option(ks)
    ks.set_defaults(func=keyserver_cmd)
