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
        started = keyserver.start(tenant)
        print(f"key server running (pid {started.pid}): KMIP on 127.0.0.1:{started.kmip_port}, broker {started.url}")
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
        print(f"running (pid {info.pid}): KMIP on 127.0.0.1:{info.kmip_port}, broker {info.url}")
    return 0 if info else 3


def register(sub: Any) -> None:
    ks = sub.add_parser("keyserver", help="the tenant's key server (PyKMIP) and key broker",
                        description="Start, stop or show the tenant's PyKMIP server (mutual TLS 1.2) and the key "
                                    "broker that releases keys only to attested hosts, as one background process.")
    ks.add_argument("action", choices=("start", "stop", "status"))
    ks.add_argument("--json", action="store_true", help="status as JSON")
    add_tenant_dir_option(ks)
    ks.set_defaults(func=keyserver_cmd)
