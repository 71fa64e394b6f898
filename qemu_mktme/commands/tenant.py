"""``qemu-mktme tenant init|server-cert|add-key|policy|show``: the tenant's PKI, keys, reference
values, enrolled and revoked hosts."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from ..errors import TenantError
from ..tenant import admin, keyserver, pki
from ..attest.launch import DEFAULT_KEY
from ..tenant.store import TenantDir
from ..attest.hostid import ENV_HOSTS, host_dir, hosts_dir
from .options import keyid_bits, print_json
import contextlib


def tenant_dir(args: argparse.Namespace) -> TenantDir:
    return TenantDir(args.tenant_dir)


def hosts_parent(args: argparse.Namespace) -> Path:
    """Where ``tenant policy --host NAME`` makes host NAME's state: under ``--tenant-dir`` when it is
    given (``DIR/hosts``), unless ``$QEMU_MKTME_HOSTS_DIR`` names a place; else the default."""
    if args.tenant_dir and not os.environ.get(ENV_HOSTS):
        return TenantDir(args.tenant_dir).path.absolute() / "hosts"
    return hosts_dir()


def add_tenant_dir_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tenant-dir", metavar="DIR",
                   help="the tenant's state directory (default: $QEMU_MKTME_TENANT_DIR or ~/.local/share/qemu-mktme/tenant)")


def _key_hosts(text: str) -> tuple[str, list[str]]:
    key, sep, hosts = text.partition("=")
    names = [h for h in hosts.split(",") if h]
    if not sep or not key or not names:
        raise argparse.ArgumentTypeError(f"expected KEY=HOST[,HOST...], got {text!r}")
    return key, names


def tenant_cmd(args: argparse.Namespace) -> int:
    tenant = tenant_dir(args)
    if args.action == "init":
        tenant.init(args.name, args.server_name)
        print(f"tenant {args.name}: PKI and manifest-signing key in {tenant.path}; the key server's certificate "
              f"names {', '.join(tenant.pki.server_names())}")
    elif args.action == "server-cert":
        names = pki.reissue_server(tenant.require().pki, args.server_name)
        print(f"the key server's certificate now names {', '.join(names)} (a running key server uses it after "
              "'keyserver stop' and 'start')")
    elif args.action == "add-key":
        uid = admin.add_key(tenant, args.name, args.kind)
        print(f"key {args.name!r} ({args.kind}, AES-256) created in the key server: KMIP id {uid}")
    elif args.action == "policy" and args.revoke:
        for host in args.revoke:
            done = admin.revoke_host(tenant, host)
            print(f"host {host}: certificate(s) {', '.join(format(n, 'x') for n in done.serials)} revoked "
                  f"(the broker refuses it from its next connection), {len(done.unenrolled)} AK(s) unenrolled")
    elif args.action == "policy":
        if not args.host:
            raise TenantError("enrol at least one host (--host NAME) or revoke one (--revoke NAME)")
        from .. import images
        parent = hosts_parent(args)
        dirs = {h: host_dir(h, parent) for h in args.host}           # every name checked before any state is made
        boot = images.guest_boot(args.guest)
        policy = admin.make_policy(tenant, boot, hosts=args.host, keyid_bits=args.keyid_bits, integrity=args.integrity,
                                   key_hosts=dict(args.key_hosts), host_dirs=dirs)
        print(f"policy: {len(policy.reference)} reference events over PCRs {list(policy.pcrs)}, "
              f"{len(policy.hosts)} enrolled host(s): {', '.join(policy.hosts.values())}, each with its own client "
              "certificate in its host directory's tls/")
        for e in policy.reference:
            print(f"  PCR {e.pcr:2}  {e.digest.hex()[:16]}...  {e.description}")
        print(f"host state (TPM, tls/) in {parent}/NAME" + ("" if parent == hosts_dir() else
              f": run those hosts with {ENV_HOSTS}={parent} (or 'host --libvirt ... --host-dir {parent}/NAME')"))
    else:
        tenant.require()
        pol = None
        with contextlib.suppress(TenantError):
            pol = tenant.policy().to_json()
        running = keyserver.status(tenant)
        print_json({"directory": str(tenant.path), "client_cn": tenant.pki.client_cn(), "keys": tenant.keys(),
                    "policy": pol, "keyserver": running.to_json() if running else None,
                    "server_names": tenant.pki.server_names(), "host_certificates": pki.host_certificates(tenant.pki)})
    return 0


def register(sub: Any) -> None:
    tn = sub.add_parser("tenant", help="the tenant's PKI, keys and reference values")
    tn_sub = tn.add_subparsers(dest="action", metavar="ACTION", required=True)
    init = tn_sub.add_parser("init", help="create the tenant's CA, certificates and manifest-signing key")
    init.add_argument("name", help="the tenant (the client certificate's CN, owner of its KMIP keys)")
    init.add_argument("--server-name", action="append", default=[], metavar="NAME_OR_ADDR",
                      help="a name or address hosts dial the key server by (repeatable; default: localhost, 127.0.0.1)")
    sc = tn_sub.add_parser("server-cert", help="issue the key server a new certificate naming other names")
    sc.add_argument("--server-name", action="append", required=True, metavar="NAME_OR_ADDR",
                    help="a name or address hosts dial the key server by (repeatable)")
    ak = tn_sub.add_parser("add-key", help="create an AES-256 key in the key server")
    ak.add_argument("name", help=f"key name (the VM memory key is {DEFAULT_KEY!r} by default)")
    ak.add_argument("--kind", choices=admin.KINDS, default="memory")
    pol = tn_sub.add_parser("policy", help="record reference values from this known-good machine and enrol hosts")
    pol.add_argument("--host", action="append", default=[], metavar="NAME",
                     help="emulated host whose TPM attestation key to enrol, with its own client certificate "
                          "(repeatable)")
    pol.add_argument("--revoke", action="append", default=[], metavar="NAME",
                     help="revoke host NAME: its certificates and its AK (repeatable)")
    pol.add_argument("--guest", default="baremetal", metavar="baremetal|linux|PATH")
    pol.add_argument("--keyid-bits", type=keyid_bits, default=6, metavar="N")
    pol.add_argument("--integrity", choices=("mac",), default=None,
                     help="the hosts run with per-line memory integrity (run --integrity mac)")
    pol.add_argument("--key-hosts", type=_key_hosts, action="append", default=[], metavar="KEY=HOST[,HOST...]",
                     help="the only enrolled hosts key KEY is released to (repeatable; other keys: every host). "
                          "A VM with that key migrates to no other host")
    show = tn_sub.add_parser("show", help="the tenant's state (JSON; no key material)")
    for p in (init, sc, ak, pol, show):
        add_tenant_dir_option(p)
    tn.set_defaults(func=tenant_cmd)
