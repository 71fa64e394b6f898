"""The tenant's commands: ``keyserver start|stop|status``, ``tenant init|add-key|policy|show``,
``image encrypt|verify``, and ``run``'s ``--tenant-server`` options. Thin: parse, call, print.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from ..errors import TenantError
from . import admin, keyserver
from . import image as image_mod
from .launch import DEFAULT_KEY, TenantLaunch
from .store import TenantDir


def _tenant(args: argparse.Namespace) -> TenantDir:
    return TenantDir(args.tenant_dir)


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def _tenant_dir_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tenant-dir", metavar="DIR",
                   help="the tenant's state directory (default: $QEMU_MKTME_TENANT_DIR or ~/.local/share/qemu-mktme/tenant)")


# ---------------------------------------------------------------------------------- keyserver


def keyserver_cmd(args: argparse.Namespace) -> int:
    tenant = _tenant(args)
    if args.action == "start":
        info = keyserver.start(tenant, args.listen, kmip_port=args.kmip_port)
        print(f"key server running (pid {info.pid}): KMIP on {info.address}:{info.kmip_port}, broker on "
              f"{info.address}:{info.broker_port}")
        names = tenant.pki.server_names()
        if info.address not in ("0.0.0.0", *names):
            print(f"  note: its certificate names {', '.join(names)}, not {info.address}: hosts dialling "
                  f"{info.address} will refuse it (tenant init --server-name)")
        print(f"  run a VM with:  qemu-mktme run --tenant-server {info.url} --tenant-ca {tenant.pki.ca} ...")
        return 0
    if args.action == "stop":
        print("key server stopped" if keyserver.stop(tenant) else "no key server was running")
        return 0
    info = keyserver.status(tenant)
    if args.json:
        _print(info.to_json() if info else {"running": False})
    elif info is None:
        print(f"no key server runs for the tenant in {tenant.path}")
    else:
        print(f"running (pid {info.pid}): KMIP on {info.address}:{info.kmip_port}, broker {info.url}")
    return 0 if info else 3


# ---------------------------------------------------------------------------------- tenant


def tenant_cmd(args: argparse.Namespace) -> int:
    tenant = _tenant(args)
    if args.action == "init":
        tenant.init(args.name, args.server_name)
        print(f"tenant {args.name}: PKI and manifest-signing key in {tenant.path}; the key server's certificate "
              f"names {', '.join(tenant.pki.server_names())}")
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
        boot = images.guest_boot(args.guest)
        policy = admin.make_policy(tenant, boot, hosts=args.host, keyid_bits=args.keyid_bits, integrity=args.integrity)
        print(f"policy: {len(policy.reference)} reference events over PCRs {list(policy.pcrs)}, "
              f"{len(policy.hosts)} enrolled host(s): {', '.join(policy.hosts.values())}, each with its own client "
              "certificate in its host directory's tls/")
        for e in policy.reference:
            print(f"  PCR {e.pcr:2}  {e.digest.hex()[:16]}...  {e.description}")
    else:
        tenant.require()
        pol = None
        try:
            pol = tenant.policy().to_json()
        except TenantError:
            pass
        _print({"directory": str(tenant.path), "client_cn": tenant.pki.client_cn(), "keys": tenant.keys(),
                "policy": pol, "keyserver": (keyserver.status(tenant) or None) and keyserver.status(tenant).to_json()})
    return 0


# ---------------------------------------------------------------------------------- image


def image_cmd(args: argparse.Namespace) -> int:
    tenant = _tenant(args)
    if args.action == "encrypt":
        manifest = admin.encrypt_image(tenant, args.source, args.target, key_name=args.key_name)
        info = image_mod.info(args.target)
        enc = info.get("format-specific", {}).get("data", {}).get("encrypt", {})
        print(f"{args.target}: LUKS in qcow2 ({enc.get('cipher-alg', '?')} {enc.get('cipher-mode', '?')}), "
              f"signed manifest {manifest}")
        return 0
    verified = image_mod.verify(args.image, tenant.require().verify_key())
    os.close(verified.fd)
    print(f"{args.image}: manifest signature and digest verified (sha256 {verified.sha256}, disk key {verified.disk_key!r})")
    return 0


# ---------------------------------------------------------------------------------- parsers


def add_tenant_parsers(sub: Any) -> None:
    ks = sub.add_parser("keyserver", help="the tenant's key server (PyKMIP) and key broker",
                        description="Start, stop or show the tenant's PyKMIP server (mutual TLS 1.2) and the key "
                                    "broker that releases keys only to attested hosts, as one background process.")
    ks.add_argument("action", choices=("start", "stop", "status"))
    ks.add_argument("--json", action="store_true", help="status as JSON")
    ks.add_argument("--listen", default="127.0.0.1", metavar="ADDR[:PORT]",
                    help="address for KMIP and the broker, PORT the broker's (default: 127.0.0.1, any free port)")
    ks.add_argument("--kmip-port", type=int, default=0, metavar="N", help="KMIP's port (default: any free port)")
    _tenant_dir_option(ks)
    ks.set_defaults(func=keyserver_cmd)

    tn = sub.add_parser("tenant", help="the tenant's PKI, keys and reference values")
    tn_sub = tn.add_subparsers(dest="action", metavar="ACTION", required=True)
    init = tn_sub.add_parser("init", help="create the tenant's CA, certificates and manifest-signing key")
    init.add_argument("name", help="the tenant (the client certificate's CN, owner of its KMIP keys)")
    init.add_argument("--server-name", action="append", default=[], metavar="NAME_OR_ADDR",
                      help="a name or address hosts dial the key server by (repeatable; default: localhost, 127.0.0.1)")
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
    pol.add_argument("--keyid-bits", type=int, default=6, metavar="N")
    pol.add_argument("--integrity", choices=("mac",), default=None,
                     help="the hosts run with per-line memory integrity (run --integrity mac)")
    show = tn_sub.add_parser("show", help="the tenant's state (JSON; no key material)")
    for p in (init, ak, pol, show):
        _tenant_dir_option(p)
    tn.set_defaults(func=tenant_cmd)

    im = sub.add_parser("image", help="encrypt a disk image at rest (LUKS in qcow2) and verify it")
    im_sub = im.add_subparsers(dest="action", metavar="ACTION", required=True)
    enc = im_sub.add_parser("encrypt", help="SOURCE (raw or qcow2) -> TARGET (LUKS qcow2) under a new disk key")
    enc.add_argument("source")
    enc.add_argument("target")
    enc.add_argument("--key-name", help="name of the disk key in the key server (default: disk-TARGETSTEM)")
    ver = im_sub.add_parser("verify", help="check an image against its signed manifest")
    ver.add_argument("image")
    for p in (enc, ver):
        _tenant_dir_option(p)
    im.set_defaults(func=image_cmd)


def add_run_options(run: argparse.ArgumentParser) -> None:
    g = run.add_argument_group("tenant (attested launch)")
    g.add_argument("--tenant-server", metavar="URL",
                   help="get the VM's key from this key broker after attesting the host (https://127.0.0.1:PORT)")
    g.add_argument("--tenant-ca", metavar="PATH",
                   help="the tenant's CA certificate (default: ca-cert.pem of the tenant directory)")
    g.add_argument("--tenant-key", default=DEFAULT_KEY, metavar="NAME", help=f"the memory key's name (default: {DEFAULT_KEY})")
    g.add_argument("--image", metavar="DISK.qcow2", help="the tenant's encrypted image (needs --tenant-server)")
    g.add_argument("--host-name", default="host0", metavar="NAME", help="this emulated host's identity (default: host0)")


def launch_from_args(args: argparse.Namespace) -> TenantLaunch | None:
    """The attested launch ``run``'s options ask for, or None; ``ValueError`` for what cannot work."""
    if not args.tenant_server:
        if args.image:
            raise ValueError("--image needs --tenant-server (its key comes from the tenant's broker)")
        return None
    if args.key != "cpu":
        raise ValueError("--key and --tenant-server exclude each other: the key comes from the tenant server")
    if args.vm:
        raise ValueError("--tenant-server runs one VM (no --vm)")
    ca = Path(args.tenant_ca) if args.tenant_ca else TenantDir().pki.ca
    if not ca.is_file():
        raise ValueError(f"tenant CA certificate {ca} does not exist (give --tenant-ca)")
    image = Path(args.image) if args.image else None
    if image is not None and not image.is_file():
        raise ValueError(f"image {image} does not exist or is not a regular file")
    return TenantLaunch(args.tenant_server, ca, key=args.tenant_key, image=image, host=args.host_name)
