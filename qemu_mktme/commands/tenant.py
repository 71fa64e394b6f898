"""``qemu-mktme tenant init|add-key|policy|show``: the tenant's PKI, keys and reference values."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import TenantError
from ..tenant import admin, keyserver
from ..attest.launch import DEFAULT_KEY
from ..tenant.store import TenantDir
from .options import print_json
import contextlib


def tenant_dir(args: argparse.Namespace) -> TenantDir:
    return TenantDir(args.tenant_dir)


def add_tenant_dir_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tenant-dir", metavar="DIR",
                   help="the tenant's state directory (default: $QEMU_MKTME_TENANT_DIR or ~/.local/share/qemu-mktme/tenant)")


def tenant_cmd(args: argparse.Namespace) -> int:
    tenant = tenant_dir(args)
    if args.action == "init":
        tenant.init(args.name)
        print(f"tenant {args.name}: PKI and manifest-signing key in {tenant.path}")
    elif args.action == "add-key":
        uid = admin.add_key(tenant, args.name, args.kind)
        print(f"key {args.name!r} ({args.kind}, AES-256) created in the key server: KMIP id {uid}")
    elif args.action == "policy":
        from .. import images
        boot = images.guest_boot(args.guest)
        policy = admin.make_policy(tenant, boot, hosts=args.host, keyid_bits=args.keyid_bits, integrity=args.integrity)
        print(f"policy: {len(policy.reference)} reference events over PCRs {list(policy.pcrs)}, "
              f"{len(policy.hosts)} enrolled host(s): {', '.join(policy.hosts.values())}")
        for e in policy.reference:
            print(f"  PCR {e.pcr:2}  {e.digest.hex()[:16]}...  {e.description}")
    else:
        tenant.require()
        pol = None
        with contextlib.suppress(TenantError):
            pol = tenant.policy().to_json()
        running = keyserver.status(tenant)
        print_json({"directory": str(tenant.path), "client_cn": tenant.pki.client_cn(), "keys": tenant.keys(),
                    "policy": pol, "keyserver": running.to_json() if running else None})
    return 0


def register(sub: Any) -> None:
    tn = sub.add_parser("tenant", help="the tenant's PKI, keys and reference values")
    tn_sub = tn.add_subparsers(dest="action", metavar="ACTION", required=True)
    init = tn_sub.add_parser("init", help="create the tenant's CA, certificates and manifest-signing key")
    init.add_argument("name", help="the tenant (the client certificate's CN, owner of its KMIP keys)")
    ak = tn_sub.add_parser("add-key", help="create an AES-256 key in the key server")
    ak.add_argument("name", help=f"key name (the VM memory key is {DEFAULT_KEY!r} by default)")
    ak.add_argument("--kind", choices=admin.KINDS, default="memory")
    pol = tn_sub.add_parser("policy", help="record reference values from this known-good machine and enrol hosts")
    pol.add_argument("--host", action="append", default=[], metavar="NAME", required=True,
                     help="emulated host whose TPM attestation key to enrol (repeatable)")
    pol.add_argument("--guest", default="baremetal", metavar="baremetal|linux|PATH")
    pol.add_argument("--keyid-bits", type=int, default=6, metavar="N")
    pol.add_argument("--integrity", choices=("mac",), default=None,
                     help="the hosts run with per-line memory integrity (run --integrity mac)")
    show = tn_sub.add_parser("show", help="the tenant's state (JSON; no key material)")
    for p in (init, ak, pol, show):
        add_tenant_dir_option(p)
    tn.set_defaults(func=tenant_cmd)
